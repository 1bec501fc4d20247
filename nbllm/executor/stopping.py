"""Stopping a run: by its user (``stop()``, from any thread) or by itself (a budget cap,
an unreachable server). A mixin of ``Executor``, which owns the state these read: the
workers, the requests in flight, the grace timer, the loop, the reason.

The first ``stop()`` sends nothing new and lets the requests in flight finish for up to
``stop_grace_s``; a second one, or the grace running out, cancels them. A worker that is
waiting (for a slot, a budget, a retry) has nothing in flight and is cancelled at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from nbllm.engines.batch.engine import BatchEngine
from nbllm.executor.batch_runs import cancel_batches
from nbllm.executor.events import Event, StopRequested

__all__ = ["Stopping"]


class Stopping:
    """``stop()`` and the executor's own ways to end a run (see the module)."""

    stop_grace_s: float
    _stopping: bool
    _stops_asked: int
    _stop_loop: asyncio.AbstractEventLoop | None
    _loop: asyncio.AbstractEventLoop
    _finished_run: bool
    _stop_announced: bool
    _stop_reason: str | None
    _workers: list[asyncio.Task[None]]
    _sending: dict[asyncio.Task[Any], int]  # workers with requests in flight: how many
    _grace: asyncio.TimerHandle | None
    _in_flight: int
    _batch_engines: list[BatchEngine]

    def _emit(self, event: Event) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the run, keeping every answer that arrived; ``run`` then returns.

        The first call sends nothing new and lets the requests in flight finish, for up to
        ``stop_grace_s`` seconds; a second call cancels them at once. Safe to call from any
        thread, a signal handler or a listener, before or during the run.
        """
        self._stopping = True  # read by the workers before every send
        self._stops_asked += 1
        loop = self._stop_loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # a closed loop: the run is over
                loop.call_soon_threadsafe(self._on_stop)

    def _on_stop(self) -> None:
        """On the loop: the first stop lets requests in flight finish, a second cancels them."""
        if self._finished_run or not self._workers:
            return
        self._stopping = True
        if not self._stop_announced:
            self._stop_announced = True
            self._emit(StopRequested(self.stop_grace_s, self._in_flight, time.time()))
            if self._stop_reason is None:  # a user's stop cancels batch_api's batches;
                cancel_batches(self._batch_engines, self._loop)  # a budget cap lets them end
            # Nothing is in flight for a worker waiting for a slot, a budget or a retry.
            self._cancel_workers(idle_only=True)
            if self._stops_asked <= 1 and self._sending and self.stop_grace_s > 0:
                self._grace = self._loop.call_later(self.stop_grace_s, self._cancel_workers)
                return
        elif self._stops_asked <= 1:
            return  # the first stop, seen again
        self._cancel_workers()

    def _cancel_workers(self, *, idle_only: bool = False) -> None:
        me = asyncio.current_task()
        for worker in self._workers:
            if worker is not me and not (idle_only and worker in self._sending):
                worker.cancel()

    def _stop_for(self, reason: str) -> None:
        """End the run by itself as a stop does: nothing new starts, requests in flight
        finish (within ``stop_grace_s``)."""
        if self._stop_reason is None and not self._finished_run:
            self._stop_reason = reason
            self._stops_asked = max(self._stops_asked, 1)
            self._on_stop()

    def _give_up(self, reason: str) -> None:
        """End the whole run by itself, at once: nothing can be reached."""
        if self._stop_reason is None and not self._finished_run:
            self._stop_reason = reason
            self._stopping = True
            self._cancel_workers()
