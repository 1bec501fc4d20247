"""Plain data that flows along nbllm's one path: conversations in, turn records out.

Nothing here does I/O. ``Conversation`` is what the dataset layer produces,
``ChatRequest`` / ``ChatResponse`` cross the engine seam, ``TurnRecord`` is one
row of the result.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "NOT_RUN",
    "SKIPPED",
    "ChatRequest",
    "ChatResponse",
    "Conversation",
    "Message",
    "TurnRecord",
]

NOT_RUN = "not run"
"""How the error of a turn that never ran begins: the run stopped (asked to, or gave up)
before the turn was sent or before its answer came. Such a turn is neither ok nor failed."""

SKIPPED = "skipped"
"""How the error of a turn not sent because an earlier turn of its conversation failed
begins. Such a turn is failed; the earlier turn's error says why."""

Message = dict[str, Any]
"""One chat message as OpenAI-compatible APIs take it: ``{"role": ..., "content": ...}``."""


@dataclass(frozen=True, slots=True)
class Conversation:
    """One conversation: questions asked in order, each seeing every earlier answer.

    ``references`` holds a reference answer per turn (or ``None`` per turn when absent);
    it is never sent to the model. ``images`` holds, per turn, the URLs of the images sent
    with that turn's question (``nbllm.images``: a file is a base64 data URL), ``()`` for a
    turn without. ``messages`` are sent at the start of every turn's request, after the
    system message and before turn 0's question: few-shot examples, or an earlier
    transcript to continue. ``turn_params`` holds, per turn, sampling parameters for that
    turn alone (``params_for``).
    """

    id: Hashable
    questions: tuple[str, ...]
    references: tuple[str | None, ...] = ()
    system: str | None = None
    context: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    images: tuple[tuple[str, ...], ...] = ()
    messages: tuple[Message, ...] = ()
    turn_params: tuple[Mapping[str, Any], ...] = ()

    def __post_init__(self) -> None:
        n = len(self.questions)
        if not self.references:
            object.__setattr__(self, "references", (None,) * n)
        if not self.images:
            object.__setattr__(self, "images", ((),) * n)
        if not self.turn_params:
            object.__setattr__(self, "turn_params", ({},) * n)

    def __len__(self) -> int:
        return len(self.questions)

    def system_message(self, default_system: str | None = None) -> str | None:
        """The system message text: the system prompt, then the context, if either is set."""
        parts = [p for p in (self.system or default_system, self.context) if p]
        return "\n\n".join(parts) if parts else None

    def params_for(self, turn: int) -> Mapping[str, Any]:
        """Sampling parameters for ``turn`` alone; they override the run's for that turn."""
        return self.turn_params[turn]

    def sent_extras(self) -> list[Any]:
        """What is sent beyond the questions, system and context, for a fingerprint: ``[]``
        for a conversation of text alone (so its hash is what it was before images), else
        its opening messages, images (data URLs: the bytes) and per-turn parameters."""
        if not self.messages and not any(self.images) and not any(self.turn_params):
            return []
        return [list(self.messages), list(self.images), list(self.turn_params)]

    def start_messages(self, default_system: str | None = None) -> list[Message]:
        """What every turn's request starts with: the system message, then ``messages``."""
        system = self.system_message(default_system)
        head: list[Message] = [{"role": "system", "content": system}] if system else []
        head.extend(dict(m) for m in self.messages)  # a caller may edit its list
        return head

    def user_message(self, turn: int) -> Message:
        """Turn ``turn``'s question as a user message: its text, or OpenAI content parts
        (the text, then each image) when the turn has images."""
        question = self.questions[turn]
        images = self.images[turn]
        if not images:
            return {"role": "user", "content": question}
        parts: list[dict[str, Any]] = [{"type": "text", "text": question}]
        parts.extend({"type": "image_url", "image_url": {"url": url}} for url in images)
        return {"role": "user", "content": parts}

    def messages_for(
        self, turn: int, answers: Sequence[str], default_system: str | None = None
    ) -> list[Message]:
        """Messages for ``turn`` (from 0): ``start_messages``, earlier question/answer pairs,
        the question.

        ``answers`` are the model's actual answers to turns ``0..turn-1``.
        """
        if len(answers) < turn:
            msg = f"turn {turn} needs {turn} earlier answers, got {len(answers)}"
            raise ValueError(msg)
        messages = self.start_messages(default_system)
        for k, answer in enumerate(answers[:turn]):
            messages.append(self.user_message(k))
            messages.append({"role": "assistant", "content": answer})
        messages.append(self.user_message(turn))
        return messages


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """What crosses the engine seam: the model, the messages and sampling parameters.

    Credentials and the server address belong to the engine, never to a request,
    so a request can be logged, hashed or stored without leaking a secret.
    """

    model: str
    messages: Sequence[Message]
    params: Mapping[str, Any] = field(default_factory=dict)
    timeout: float | None = None


@dataclass(frozen=True, slots=True)
class ChatResponse:
    """An engine's answer: text, token usage, the model that actually answered, cost if known.

    ``finish_reason`` is why the answer ended, as the provider says it (``"stop"``,
    ``"length"`` when ``max_tokens`` cut it, ``"content_filter"``, ``"tool_calls"``);
    None when the engine does not say. ``rate_limits``: the provider's ``x-ratelimit-*``
    headers on this answer (names in lower case), where it sent any. ``cached_tokens``: how
    many of the ``prompt_tokens`` were not computed again but taken from a cache of earlier
    prompts (a local engine's prefix cache, or a provider's ``prompt_tokens_details``);
    None when the engine does not say.
    """

    text: str
    model: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None
    finish_reason: str | None = None
    rate_limits: Mapping[str, str] | None = None
    cached_tokens: int | None = None
    #: The engine that answered, where one engine stands for several (``"torch worker
    #: 2/4"``, a replica); None: the engine the run names.
    engine: str | None = None
    #: Dollars this answer cost less than it would have live (a batch API's discount);
    #: None when not known or not a batch answer.
    saved_usd: float | None = None


@dataclass(frozen=True, slots=True)
class TurnRecord:
    """One row of a run's result. ``turn`` counts from 0; times are Unix seconds.

    ``cached``: answered from the response cache, no request sent. ``resumed``: read back
    from the run's checkpoint, finished by an earlier (interrupted) run of the same call.
    ``finish_reason``: why the answer ended (``ChatResponse.finish_reason``); ``"length"``
    means ``max_tokens`` cut it short. ``cached_tokens``: how many of ``prompt_tokens`` the
    engine took from its cache of earlier prompts (``ChatResponse.cached_tokens``).
    ``saved_usd``: what a batch API's answer cost less than a live one
    (``ChatResponse.saved_usd``).
    Where the turn's time went, in seconds: ``service_s``, its requests themselves (every
    attempt's, summed); ``queue_s``, the rest of the time from when the turn was ready (its
    conversation's earlier turn answered) to its final answer or error: waiting for a
    request slot, a rate limit, a server's pause after a 429, and the backoff between
    attempts. Both are 0 for a cached row.
    A row is ``ok`` (answered), ``not_run`` (its error starts with ``NOT_RUN``), or failed.
    ``parsed``: the answer as ``response_format`` / ``parse`` read it (None without them, or
    when every try failed: then ``error`` starts with ``ParseError``); ``parse_retries``:
    the times the turn was asked again because its answer did not parse. ``votes``: with
    ``ensemble="vote"``, how many models gave the answer kept (None otherwise).
    """

    conversation_id: Hashable
    turn: int
    question: str
    answer: str | None = None
    reference: str | None = None
    model: str | None = None
    engine: str | None = None
    latency_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    cost_usd: float | None = None
    saved_usd: float | None = None
    attempts: int = 0
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    cached: bool = False
    resumed: bool = False
    finish_reason: str | None = None
    queue_s: float | None = None
    service_s: float | None = None
    deployment: str | None = None
    parsed: Any = None
    parse_retries: int = 0
    votes: int | None = None
    asked: int = 1

    @property
    def ok(self) -> bool:
        return self.error is None and self.answer is not None

    @property
    def not_run(self) -> bool:
        """The turn never ran: the run stopped first. A run again can still answer it."""
        return self.error is not None and self.error.startswith(NOT_RUN)
