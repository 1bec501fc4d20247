"""What the executor tells the world while it runs.

Small frozen dataclasses, delivered in order to every listener (any callable taking
one event) on the executor's loop. Progress bars, the notebook dashboard, logs and
metrics all subscribe here; the executor never calls into them otherwise.
A listener that raises is logged once and dropped, never allowed to stop the run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Protocol

from nbllm.engines.batch.lines import ENDED
from nbllm.types import TurnRecord

__all__ = [
    "Alert",
    "AttemptFinished",
    "BatchUpdated",
    "BreakerChanged",
    "EnginePhase",
    "Event",
    "LimitChanged",
    "Listener",
    "RequestSent",
    "RetryScheduled",
    "RunFinished",
    "RunStarted",
    "SharedQuota",
    "StopRequested",
    "TurnFinished",
]

log = logging.getLogger("nbllm")


@dataclass(frozen=True, slots=True)
class RunStarted:
    """``resumed`` turns were read back from the checkpoint and need no request."""

    conversations: int
    turns: int
    model: str
    engine: str
    t: float
    resumed: int = 0
    #: score= of the run: (metric name, row scorer), so live figures score as the summary.
    score: tuple[str, Callable[[str | None, str | None], float | None]] | None = None


@dataclass(frozen=True, slots=True)
class RequestSent:
    """One attempt left for the engine; ``in_flight`` counts it."""

    conversation_id: Hashable
    turn: int
    attempt: int
    in_flight: int
    t: float


@dataclass(frozen=True, slots=True)
class RetryScheduled:
    conversation_id: Hashable
    turn: int
    attempt: int
    error: str
    delay_s: float
    t: float


@dataclass(frozen=True, slots=True)
class AttemptFinished:
    """One request attempt ended: answered (``outcome`` "ok"), refused with a 429
    ("rate_limited"), failed ("error": ``error`` names the ``EngineError``'s class) or
    cancelled ("cancelled": a stop, or an ensemble's request withdrawn). ``model`` is the
    model or group the run names it by, ``deployment`` the deployment's id; ``latency_s``
    the seconds it spent in the engine, from ``sent_at`` to ``t`` (Unix seconds). An
    answer's model, tokens, finish reason and cost come with it (None otherwise), and the
    prompt tokens its engine took from a cache of earlier prompts (``cached_tokens``)."""

    conversation_id: Hashable
    turn: int
    attempt: int
    model: str
    deployment: str
    outcome: str
    error: str | None
    latency_s: float
    sent_at: float
    t: float
    response_model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    cost_usd: float | None = None
    cached_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Alert:
    """A rule of ``alerts=`` crossed (``nbllm.alerts``): ``rule`` ("error_rate", ...), a
    one-line ``message``, the ``value`` seen and the ``threshold`` it passed. Raised at most
    once per rule per cooldown."""

    rule: str
    message: str
    value: float
    threshold: float
    t: float


@dataclass(frozen=True, slots=True)
class TurnFinished:
    """A turn has its final row: answered, failed, or skipped because an earlier turn failed.

    ``conversation_done``: this was the conversation's last row.
    """

    record: TurnRecord
    in_flight: int
    t: float
    conversation_done: bool = False


@dataclass(frozen=True, slots=True)
class EnginePhase:
    """A local engine's preparation before the run starts: "converting", "exporting" or
    "loading". ``done`` / ``total`` count in the phase's own unit (e.g. tensors), or are
    None when unknown; ``detail`` is a short line for people (e.g. the model's name).
    While the run goes, "generating": ``done`` is the completion tokens the engine has
    generated so far, ``total`` None.
    """

    phase: str
    done: float | None
    total: float | None
    t: float
    detail: str = ""


@dataclass(frozen=True, slots=True)
class StopRequested:
    """A stop was first asked: no new request starts; the ``in_flight`` ones may finish
    within ``grace_s`` seconds (a second stop cancels them at once). Emitted once.
    """

    grace_s: float
    in_flight: int
    t: float


@dataclass(frozen=True, slots=True)
class RunFinished:
    """``stop_reason``: why the run ended early by itself (e.g. nothing could be reached);
    None when it ran to the end or was stopped by the user.
    """

    turns_ok: int
    turns_failed: int
    wall_s: float
    interrupted: bool
    t: float
    stop_reason: str | None = None


@dataclass(frozen=True, slots=True)
class SharedQuota:
    """The limits shared through Redis (``redis_url``) went away (``shared`` False: this run
    goes on with local limits at its fair share; ``reason`` says why, without a password)
    or came back (``shared`` True)."""

    shared: bool
    reason: str
    t: float


@dataclass(frozen=True, slots=True)
class LimitChanged:
    """An ``"auto"`` limit moved: ``kind`` ("rpm" or "tpm") is now ``limit`` per rate window,
    for ``deployment`` (the deployment's id; the run's one where it has one)."""

    kind: str
    limit: float
    t: float
    deployment: str = ""


@dataclass(frozen=True, slots=True)
class BreakerChanged:
    """A deployment's circuit breaker moved to ``state`` ("closed", "open" or "half-open");
    ``trips`` is how many times it has opened in this run. While every deployment a turn
    may go to is open, turns wait for a probe."""

    deployment: str
    state: str
    trips: int
    t: float


@dataclass(frozen=True, slots=True)
class BatchUpdated:
    """A provider's batch (``batch_api=True``) as last polled: ``status`` in OpenAI's words
    (validating, in_progress, finalizing, completed, failed, expired, cancelling,
    cancelled), its lines done and failed of ``total``, when it was created and when its
    completion window ends (Unix seconds), and how many of this run's requests wait on
    it. ``error``: the provider's message for a failed batch."""

    batch_id: str
    api: str
    status: str
    total: int
    completed: int
    failed: int
    created_at: float | None
    expires_at: float | None
    waiting: int
    t: float
    error: str | None = None

    @property
    def ended(self) -> bool:
        return self.status in ENDED


Event = (
    RunStarted
    | RequestSent
    | AttemptFinished
    | Alert
    | RetryScheduled
    | TurnFinished
    | RunFinished
    | StopRequested
    | EnginePhase
    | SharedQuota
    | LimitChanged
    | BreakerChanged
    | BatchUpdated
)


class Listener(Protocol):
    def __call__(self, event: Event) -> None: ...


class EventBus:
    """Delivers each event to the listeners that want its kind; one that raises is dropped.

    A listener takes every kind of event unless it has an ``event_types`` attribute (a
    tuple of event classes). The executor asks ``wants(kind)`` before building an event,
    so a kind nobody listens to costs nothing per request.
    """

    __slots__ = ("_by_kind", "_listeners")

    def __init__(self, listeners: Iterable[Callable[[Event], None]] = ()) -> None:
        self._listeners = list(listeners)
        self._by_kind: dict[type, list[Callable[[Event], None]]] = {}

    def _for(self, kind: type) -> list[Callable[[Event], None]]:
        found = self._by_kind.get(kind)
        if found is None:
            found = [
                listener
                for listener in self._listeners
                if kind in getattr(listener, "event_types", (kind,))
            ]
            self._by_kind[kind] = found
        return found

    def wants(self, kind: type) -> bool:
        return bool(self._for(kind))

    def emit(self, event: Event) -> None:
        for listener in self._for(type(event)):
            try:
                listener(event)
            except Exception:
                log.exception("nbllm: event listener %r failed and was removed", listener)
                self._listeners.remove(listener)
                self._by_kind.clear()
