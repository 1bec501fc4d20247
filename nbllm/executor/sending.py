"""Sending one attempt of a turn. A mixin of ``Executor``.

``_attempt`` takes a request slot (by priority), then ``Lanes.admit``: the deployment (the
router, breakers), its slot, its pause and its budgets; ``_may_send``, asked right before
the request leaves, says whether the budget or a stop forbids it. ``_send_on`` sends it
on the lane as a task of its own, so that a cancel (a stop, or an ensemble's withdrawn
request) can cut the request short but never drop an answer that has arrived, and tells
the listeners: ``RequestSent`` as it leaves, ``AttemptFinished`` when it ends.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Mapping, Sequence
from typing import Any

from nbllm.engines.batch.lines import ASKING
from nbllm.errors import EngineError
from nbllm.executor.budget import Budget
from nbllm.executor.events import Event, RequestSent
from nbllm.executor.lanes import Attempts, Lane, Lanes, attempt_answered, attempt_failed
from nbllm.executor.limiter import Grant
from nbllm.executor.slots import RequestSlots
from nbllm.types import ChatResponse, Message

__all__ = ["SENT", "WORKER", "Sending"]

#: The worker a request is sent for (an ensemble sends from tasks of its own): what a stop
#: lets finish or cancels.
WORKER: contextvars.ContextVar[asyncio.Task[Any] | None] = contextvars.ContextVar(
    "worker", default=None
)

#: An ensemble's member task: the requests it sent (their lanes' ids), whatever became of them.
SENT: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("sent", default=None)


class Sending:
    """``_attempt`` and what it calls (see the module)."""

    timeout: float | None
    budget: Budget | None
    _slots: RequestSlots
    _stopping: bool
    _in_flight: int
    _sending: dict[asyncio.Task[Any], int]
    _wants_sent: bool
    _wants_attempt: bool
    _loop: asyncio.AbstractEventLoop

    def _emit(self, event: Event) -> None:
        raise NotImplementedError

    def _withdrawn(self) -> bool:
        raise NotImplementedError

    def _stop_for(self, reason: str) -> None:
        raise NotImplementedError

    async def _attempt(
        self,
        lanes: Lanes,
        messages: Sequence[Message],
        conversation_id: Any,
        turn: int,
        attempt: int,
        estimate: int,
        log: Attempts,
        priority: tuple[int, ...],
        extra: Mapping[str, Any],
    ) -> tuple[ChatResponse, float, Lane, float | None] | None:
        """Send once: the answer, its latency, the lane that answered and the answer's
        cost; None when stopped before it could go.

        ``log`` gathers the turn's attempts: when each left, the seconds each spent in the
        engine (answered or not) and the lane each went to. ``priority`` orders the wait
        for a request slot (smallest first).
        """
        await self._slots.acquire(priority)
        try:
            admitted = await lanes.admit(
                log.avoid(), estimate, priority, self.timeout, self._may_send
            )
            if admitted is None:
                return None
            lane = admitted[0]
            try:
                return await self._send_on(
                    *admitted, messages, conversation_id, turn, attempt, log, extra
                )
            finally:
                if lane.slots is not None:
                    lane.slots.release()
        finally:
            self._slots.release()

    def _may_send(self) -> bool:
        """Asked right before each request leaves: the budget, then a stop."""
        if self.budget is not None and (why := self.budget.reached()):
            self._stop_for(why)
        return not self._stopping

    async def _send_on(
        self,
        lane: Lane,
        grant: Grant | None,
        messages: Sequence[Message],
        conversation_id: Any,
        turn: int,
        attempt: int,
        log: Attempts,
        extra: Mapping[str, Any],
    ) -> tuple[ChatResponse, float, Lane, float | None] | None:
        self._in_flight += 1
        sent_at = time.time()
        log.sent(sent_at, lane)
        if (sent := SENT.get()) is not None:
            sent.append(lane.id)
        if self._wants_sent:
            self._emit(RequestSent(conversation_id, turn, attempt, self._in_flight, sent_at))
        t0 = self._loop.time()
        worker = WORKER.get() or asyncio.current_task()
        assert worker is not None
        # Its own task: a cancel of this worker can cut the request short but can never
        # drop an answer that has arrived (the task holds it).
        asking = ASKING.set((str(conversation_id), turn))  # who waits on a batch's line
        send = self._loop.create_task(lane.send(messages, extra))
        ASKING.reset(asking)
        self._sending[worker] = self._sending.get(worker, 0) + 1
        try:
            response = await send
        except asyncio.CancelledError:
            self._stopping = self._stopping or not self._withdrawn()
            if send.done() and not send.cancelled() and send.exception() is None:
                response = send.result()  # arrived as the cancel came: kept
            else:
                send.cancel()
                lane.abandoned()
                self._attempt_ended(lane, conversation_id, turn, attempt, sent_at, t0, None)
                return None
        except EngineError as error:
            log.failed_there = lane.failed(error)
            self._attempt_ended(lane, conversation_id, turn, attempt, sent_at, t0, error)
            raise
        except BaseException:
            lane.abandoned()
            raise
        finally:
            self._in_flight -= 1
            if (left := self._sending.pop(worker, 1) - 1) > 0:
                self._sending[worker] = left
            log.spent.append(self._loop.time() - t0)
        cost = lane.answered(log.spent[-1], response, self.budget, grant)
        if self._wants_attempt:
            self._emit(
                attempt_answered(lane, conversation_id, turn, attempt, sent_at, response, cost)
            )
        return response, log.spent[-1], lane, cost

    def _attempt_ended(
        self, lane: Lane, conversation_id: Any, turn: int, attempt: int, sent_at: float,
        t0: float, error: EngineError | None,
    ) -> None:  # fmt: skip
        """Tell the listeners an attempt ended with no answer (``error``; None: cancelled)."""
        if self._wants_attempt:
            seconds = self._loop.time() - t0
            self._emit(
                attempt_failed(lane, conversation_id, turn, attempt, sent_at, seconds, error)
            )
