"""A run's batch engines (``batch_api=True``): tied to its checkpoint and its events, and
cancelled by its stop.

Each ``BatchEngine`` of the run's lanes writes its batches to the checkpoint's journal
(none without a checkpoint: then nothing re-attaches) and reports each poll as a
``BatchUpdated`` event. A user's stop, or a budget cap, cancels the batches in flight;
an interrupt or a closed kernel does not (the next run of the same call collects them).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import replace

from nbllm.engines.base import Engine
from nbllm.engines.batch.engine import BatchEngine, BatchUpdate
from nbllm.executor.budget import Budget
from nbllm.executor.checkpoint import CheckpointStore
from nbllm.executor.events import BatchUpdated, Event
from nbllm.types import NOT_RUN, TurnRecord

__all__ = ["attach_batches", "cancel_batches", "pending_rows"]


def batch_engines(engines: Iterable[Engine]) -> list[BatchEngine]:
    return [e for e in dict.fromkeys(engines) if isinstance(e, BatchEngine)]


class _RunBudget:
    """The run's ``Budget`` for its batch engines: a batch that does not fit stops the run."""

    def __init__(self, budget: Budget, stop_for: Callable[[str], None]) -> None:
        self.budget = budget
        self.stop_for = stop_for

    def fit(self, worst: list[tuple[float | None, int]]) -> tuple[int, tuple[float, int]]:
        fits, held, why = self.budget.fit(worst)
        if why is not None:
            self.stop_for(why)
        return fits, held

    def release(self, cost: float, tokens: int) -> None:
        self.budget.release(cost, tokens)


def attach_batches(
    engines: Iterable[Engine],
    checkpoint: CheckpointStore | None,
    emit: Callable[[Event], None],
    budget: Budget | None = None,
    stop_for: Callable[[str], None] | None = None,
) -> list[BatchEngine]:
    """Tie the batch engines among ``engines`` to the run (its checkpoint, its events, its
    budget, which ``stop_for`` a reason when a batch does not fit); returns them."""
    found = batch_engines(engines)
    if not found:
        return found
    journal = checkpoint.journal() if checkpoint is not None else None
    held = None
    if budget is not None and budget.capped and stop_for is not None:
        held = _RunBudget(budget, stop_for)

    def on_update(update: BatchUpdate) -> None:
        info = update.info
        emit(
            BatchUpdated(
                info.id, update.api, info.status, info.total, info.completed, info.failed,
                info.created_at, info.expires_at, update.waiting, time.time(), info.error,
            )
        )  # fmt: skip

    for engine in found:
        engine.attach(journal, on_update, held)
    return found


def cancel_batches(engines: list[BatchEngine], loop: asyncio.AbstractEventLoop) -> None:
    """Ask each engine to cancel its batches in flight (on ``loop``, in the background)."""
    for engine in engines:
        task = loop.create_task(engine.cancel_batches())
        _KEEP.add(task)
        task.add_done_callback(_KEEP.discard)


_KEEP: set[asyncio.Task[int]] = set()  # cancelling tasks, held until done


def pending_rows(records: list[TurnRecord], engines: list[BatchEngine]) -> list[TurnRecord]:
    """``records`` with each turn not run whose request waits in a batch still in flight
    saying which batch, and how to collect it."""
    waits: dict[tuple[str, int], str] = {}
    for engine in engines:
        then = (
            "run the same call again (or nbllm.runs.resume) to collect it"
            if engine.journal is not None
            else "without a checkpoint, nbllm cannot collect it"
        )
        for asked, batch_id in engine.pending().items():
            waits[asked] = f"pending in batch {batch_id}, which goes on at the provider; {then}"
    if not waits:
        return records
    out = []
    for record in records:
        why = waits.get((str(record.conversation_id), record.turn))
        if why is not None and record.not_run:
            record = replace(record, error=f"{NOT_RUN}: {why}")
        out.append(record)
    return out
