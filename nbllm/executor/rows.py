"""The rows a run makes: one ``TurnRecord`` per turn, answered or not."""

from __future__ import annotations

from typing import Any

from nbllm.types import ChatResponse, Conversation, TurnRecord

__all__ = ["answered", "unanswered"]


def unanswered(conv: Conversation, turn: int, error: str, **fields: Any) -> TurnRecord:
    """Turn ``turn`` of ``conv`` without an answer: ``error`` says why."""
    return TurnRecord(
        conversation_id=conv.id,
        turn=turn,
        question=conv.questions[turn],
        reference=conv.references[turn],
        error=error,
        **fields,
    )


def answered(conv: Conversation, turn: int, response: ChatResponse, **fields: Any) -> TurnRecord:
    """Turn ``turn`` of ``conv`` answered by ``response``; ``fields`` name the engine that
    answered, the timings and the rest (a ``model`` there, the group a deployment list was
    asked for, stands over the model the engine names)."""
    model = fields.pop("model", None) or response.model
    return TurnRecord(
        conversation_id=conv.id,
        turn=turn,
        question=conv.questions[turn],
        answer=response.text,
        reference=conv.references[turn],
        model=model,
        prompt_tokens=response.prompt_tokens,
        completion_tokens=response.completion_tokens,
        finish_reason=response.finish_reason,
        **fields,
    )
