"""Timing one turn: a deadline around an answer, and where the turn's time went."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Sequence

from nbllm.types import ChatResponse

__all__ = ["time_split", "within"]


def time_split(ready: float, now: float, spent: Sequence[float]) -> dict[str, float]:
    """A turn's ``queue_s`` and ``service_s``: ``spent`` holds its attempts' seconds in the
    engine; the rest of the time from ``ready`` to ``now`` (the loop's clock) it waited."""
    service = sum(spent)
    return {"queue_s": max(0.0, now - ready - service), "service_s": service}


if sys.version_info >= (3, 11):

    async def within(seconds: float, answer: Awaitable[ChatResponse]) -> ChatResponse:
        """``answer``, or ``TimeoutError`` after ``seconds``."""
        async with asyncio.timeout(seconds):
            return await answer

else:  # 3.10 has no asyncio.timeout; wait_for runs the call in a task of its own

    async def within(seconds: float, answer: Awaitable[ChatResponse]) -> ChatResponse:
        """``answer``, or ``TimeoutError`` after ``seconds``."""
        return await asyncio.wait_for(answer, seconds)
