"""The rows a run makes: one ``TurnRecord`` per turn, answered or not."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from nbllm.parsing import ParseFailed, Parser
from nbllm.types import ChatResponse, Conversation, Message, TurnRecord

__all__ = ["answered", "cached", "complete", "merged", "reparsed", "unanswered", "user"]

N = TypeVar("N", int, float)


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
        cached_tokens=response.cached_tokens,
        finish_reason=response.finish_reason,
        saved_usd=fields.pop("saved_usd", response.saved_usd),
        **fields,
    )


def cached(conv: Conversation, turn: int, hit: Any, model: str | None) -> TurnRecord:
    """Turn ``turn`` answered from the response cache (``hit``, a ``CachedResponse``):
    no request, no time, no cost; its engine is the one that answered it then."""
    now = time.time()
    return answered(
        conv, turn, hit, model=model, engine=hit.engine, latency_s=0.0, queue_s=0.0,
        service_s=0.0, cost_usd=0.0 if hit.cost_usd is not None else None, saved_usd=None,
        started_at=now,
        finished_at=now, cached=True,
    )  # fmt: skip


def user(text: str) -> Message:
    return {"role": "user", "content": text}


def _add(a: N | None, b: N | None) -> N | None:
    """Two asks' figures together; None only where neither has one."""
    if a is None:
        return b
    return a if b is None else a + b


def merged(first: TurnRecord, again: TurnRecord, parse_retries: int) -> TurnRecord:
    """A turn asked again because its answer did not parse: ``again``'s answer (or error),
    with both asks' attempts, tokens, cost and time; its start is ``first``'s."""
    return replace(
        again,
        attempts=first.attempts + again.attempts,
        prompt_tokens=_add(first.prompt_tokens, again.prompt_tokens),
        completion_tokens=_add(first.completion_tokens, again.completion_tokens),
        cached_tokens=_add(first.cached_tokens, again.cached_tokens),
        cost_usd=_add(first.cost_usd, again.cost_usd),
        saved_usd=_add(first.saved_usd, again.saved_usd),
        queue_s=_add(first.queue_s, again.queue_s),
        service_s=_add(first.service_s, again.service_s),
        started_at=first.started_at,
        parse_retries=parse_retries,
    )


def reparsed(record: TurnRecord, parser: Parser | None) -> TurnRecord:
    """A row read back from the checkpoint, its answer parsed again (parsing is a function
    of the answer, so the checkpoint keeps the answer only)."""
    if parser is None or record.answer is None:
        return record
    try:
        return replace(record, parsed=parser.parse(record.answer))
    except ParseFailed:
        return record  # stored under another parse=: kept as it was answered


def complete(
    conversations: Sequence[Conversation],
    offsets: Sequence[int],
    records: Sequence[TurnRecord | None],
    done: Mapping[tuple[int, int], TurnRecord],
    why: str,
) -> list[TurnRecord]:
    """Every turn's row, in input order: as recorded, else as stored by an earlier run (it
    counts even if the run stopped before it was read back), else not run (``why``)."""
    out: list[TurnRecord] = []
    for index, (conv, base) in enumerate(zip(conversations, offsets, strict=True)):
        for k in range(len(conv)):
            record = records[base + k] or done.get((index, k))
            out.append(record if record is not None else unanswered(conv, k, why))
    return out
