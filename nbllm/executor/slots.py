"""Request slots handed out by priority instead of arrival order.

A run keeps at most ``capacity`` requests in flight. When a slot frees, it goes to the
waiting turn with the highest priority (the smallest key), not to the one that asked
first: the executor gives it to the turn of the conversation with the most work left, so
the longest chains are not the ones left running alone at the end of a run.

A freed slot is handed over on the next pass of the event loop, not inside
``release()``: the conversation whose answer just freed it asks for its next turn's slot
in the same step, and must be weighed with the others rather than miss this hand-over.
Until then a newcomer queues like everyone else, so nothing jumps the order.

Waiters sleep on futures; nothing polls. A waiter cancelled while it waits leaves no
slot behind; one cancelled just as a slot was handed to it passes the slot on.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from typing import Any

from nbllm.errors import ConfigError

__all__ = ["RequestSlots"]

Priority = tuple[Any, ...]


class RequestSlots:
    """``capacity`` slots: ``await acquire(priority)`` takes one, ``release()`` gives it back.

    Among waiters, the smallest ``priority`` goes first; equal priorities go in arrival
    order.
    """

    def __init__(self, capacity: int) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            msg = f"concurrency= expected a whole number >= 1, got {capacity!r}"
            raise ConfigError(msg)
        self.capacity = capacity
        self._free = capacity
        # (priority, arrival, future); a cancelled waiter's entry stays until it is popped.
        self._heap: list[tuple[Priority, int, asyncio.Future[None]]] = []
        self._waiting = 0  # waiters not yet served nor cancelled
        self._arrivals = itertools.count()
        self._handover: asyncio.Handle | None = None

    def __repr__(self) -> str:
        return f"RequestSlots(capacity={self.capacity}, free={self._free}, waiting={self._waiting})"

    @property
    def free(self) -> int:
        """Slots nobody holds (a freed slot counts until it is handed over)."""
        return self._free

    @property
    def waiting(self) -> int:
        """Waiters still waiting for a slot."""
        return self._waiting

    async def acquire(self, priority: Priority = ()) -> None:
        """Wait for a slot and hold it; ``release()`` gives it back."""
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        heapq.heappush(self._heap, (priority, next(self._arrivals), fut))
        self._waiting += 1
        self._schedule(loop)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # handed over as the cancel came: pass it on
            else:
                self._waiting -= 1
                fut.cancel()  # the hand-over skips it
            raise

    def set_capacity(self, capacity: float) -> None:
        """Change the number of slots (``concurrency="auto"``). A raise lets waiters go at
        once; after a cut, slots held beyond the new count are not handed on when released."""
        capacity = max(1, int(capacity))
        self._free += capacity - self.capacity
        self.capacity = capacity
        if self._waiting and self._free > 0:
            self._schedule(asyncio.get_running_loop())

    def release(self) -> None:
        """Give a slot back; the most urgent waiter gets it on the next pass of the loop."""
        if self._free >= self.capacity:  # (after a cut _free is below zero until released)
            msg = "release() of a slot that was not held"
            raise RuntimeError(msg)
        self._free += 1
        if self._waiting:
            self._schedule(asyncio.get_running_loop())

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._handover is None and self._free > 0:
            self._handover = loop.call_soon(self._hand_over)

    def _hand_over(self) -> None:
        self._handover = None
        while self._free > 0 and self._heap:
            _, _, fut = heapq.heappop(self._heap)
            if fut.done():  # cancelled while waiting
                continue
            self._free -= 1
            self._waiting -= 1
            fut.set_result(None)
