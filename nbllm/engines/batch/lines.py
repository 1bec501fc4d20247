"""What a batch holds and what comes back, in nbllm's terms, whichever provider runs it.

A batch is a list of lines, each one chat request under a ``custom_id``; the provider
answers each line on its own. ``BatchInfo`` is a batch as a provider reports it, its
status in OpenAI's words (Anthropic's are mapped to them); ``BatchRecord`` is what a run's
checkpoint keeps of a batch the moment it is created, so that a re-run finds it again.
A line is known across runs by its ``fingerprint``: a hash of what is sent (model,
messages, parameters), never of the key.

``ASKING`` is set by the executor around each request: which conversation and turn asks,
so that the checkpoint and the live view can say who waits on a batch.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "ASKING",
    "ENDED",
    "BatchBudget",
    "BatchInfo",
    "BatchJournal",
    "BatchLine",
    "BatchRecord",
    "fingerprint",
]

#: (conversation id as text, turn) of the request being sent; None outside a run.
ASKING: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar(
    "asking", default=None
)

#: Statuses after which a batch changes no more.
ENDED = frozenset({"completed", "failed", "expired", "cancelled"})


def fingerprint(api: str, body: Mapping[str, Any]) -> str:
    """A line's identity across runs: the request body it sends, hashed."""
    text = json.dumps(
        [api, body], sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=repr
    )
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class BatchInfo:
    """A batch as its provider reports it. ``status``: validating, in_progress,
    finalizing, completed, failed, expired, cancelling or cancelled. ``completed`` and
    ``failed`` count lines; ``error`` is the provider's message for a failed batch.
    Times are Unix seconds."""

    id: str
    status: str
    total: int = 0
    completed: int = 0
    failed: int = 0
    created_at: float | None = None
    expires_at: float | None = None
    input_file_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    error: str | None = None

    @property
    def ended(self) -> bool:
        return self.status in ENDED


@dataclass(frozen=True, slots=True)
class BatchLine:
    """One request of a batch: its ``custom_id``, its fingerprint, and who asked it."""

    custom_id: str
    fingerprint: str
    conversation: str | None = None
    turn: int | None = None


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """What the checkpoint keeps of a batch from the moment it is created."""

    id: str
    api: str
    created_at: float
    expires_at: float | None
    input_file_id: str | None
    lines: tuple[BatchLine, ...]
    status: str = "validating"


class BatchBudget(Protocol):
    """A run's spending cap, as a batch engine sees it."""

    def fit(self, worst: list[tuple[float | None, int]]) -> tuple[int, tuple[float, int]]:
        """How many of these requests (each its worst-case dollars, None where unknown,
        and tokens) fit, and what was held for them (dollars, tokens) until ``release``."""
        ...

    def release(self, cost: float, tokens: int) -> None: ...


class BatchJournal(Protocol):
    """Where a batch engine writes its batches and their answers (a run's checkpoint).

    Every method commits before it returns: a kill just after ``created`` still leaves
    the batch known to the next run.
    """

    def open_batches(self) -> list[BatchRecord]:
        """Batches created and not yet collected, oldest first."""
        ...

    def created(self, record: BatchRecord) -> None: ...

    def updated(self, batch_id: str, status: str) -> None: ...

    def collected(self, batch_id: str, status: str, answers: Mapping[str, str]) -> None:
        """The batch has ended; ``answers`` holds each answered line's result (JSON text)
        by fingerprint."""
        ...

    def answer(self, fingerprint: str) -> str | None:
        """A collected answer of a line with this fingerprint (JSON text), if any."""
        ...


def custom_id(fingerprint: str, n: int) -> str:
    """The ``n``-th line's id: unique within a batch and valid for every provider
    (``[A-Za-z0-9_-]{1,64}``)."""
    return f"r{n}-{fingerprint[:16]}"
