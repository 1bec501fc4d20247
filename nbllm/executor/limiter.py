"""Requests-per-minute and tokens-per-minute budgets.

A ``RateLimiter`` promises one thing that can be checked from the outside: no window
of ``period`` seconds ever holds more than ``rate`` units (requests, or tokens).
A log of recent acquisitions enforces that promise exactly; a token bucket with a
small burst (one second's worth) spreads acquisitions out so a limit of 600 per
minute does not go out as 600 requests in the first millisecond.

Waiters sleep on futures, served in arrival order and woken by one loop timer set
for the moment the first waiter can go; nothing polls.

``set_rate`` changes the budget while the limiter is in use (an adaptive limit does so
as it learns the provider's). The promise then reads: a grant is made only while the
window of ``period`` seconds that ends with it, the grant included, holds at most the
rate in force at that moment. Grants made before a cut stay in the window and count
against the new rate, so a cut is felt at once: nothing more goes until the window
holds less than the new rate. A raise lets waiters go as soon as the new budget allows.
Waiters keep their order and their place through a change; the timer is set again.
"""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nbllm.errors import ConfigError
from nbllm.images import prompt_tokens

__all__ = ["Grant", "RateLimiter", "estimate_tokens"]

_DEFAULT_COMPLETION_ESTIMATE = 256


@dataclass(slots=True, eq=False)
class Grant:
    """One acquisition: when it was granted and how many units it spent."""

    t: float
    amount: float


class RateLimiter:
    """At most ``rate`` units in any ``period`` seconds, smoothed to a burst of ``burst``.

    ``burst`` defaults to one second's worth of the rate (at least one unit).
    An acquisition larger than ``rate`` waits for an empty window and then goes alone.
    A bad value raises ``ConfigError`` naming the option; ``names`` gives the names the
    user knows the three by (the executor passes ``("rpm", "rate_window_s", ...)``).
    """

    def __init__(
        self,
        rate: float,
        period: float = 60.0,
        *,
        burst: float | None = None,
        names: tuple[str, str, str] = ("rate", "period", "burst"),
    ) -> None:
        self.rate = _positive(names[0], rate)
        self.period = _positive(names[1], period)
        self._names = names
        self._burst_given = burst is not None
        self.burst = (
            _positive(names[2], burst) if burst is not None else max(1.0, self.rate / self.period)
        )
        # Arrival on the server lags a send by a little; a small margin keeps a send
        # that is exactly one period after another from landing inside the server's window.
        self._margin = min(1.0, 0.02 * self.period)
        self._fill_per_s = self.rate / self.period
        self._level = self.burst
        self._stamp: float | None = None
        self._log: collections.deque[Grant] = collections.deque()
        self._in_window = 0.0
        self._waiters: collections.deque[tuple[float, asyncio.Future[Grant]]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"RateLimiter(rate={self.rate:g}, period={self.period:g}, burst={self.burst:g})"

    async def acquire(self, amount: float = 1.0) -> Grant:
        """Wait until ``amount`` units may be spent, spend them, and return the grant."""
        loop = asyncio.get_running_loop()
        if not self._waiters:
            grant = self._try_take(amount, loop.time())
            if grant is not None:
                return grant
        fut: asyncio.Future[Grant] = loop.create_future()
        self._waiters.append((amount, fut))
        self._schedule(loop)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.settle(fut.result(), 0.0)
            self._schedule(loop)
            raise

    def settle(self, grant: Grant, actual: float) -> None:
        """Replace a grant's estimated amount by what was really spent (e.g. real token usage)."""
        delta = actual - grant.amount
        if delta == 0:
            return
        grant.amount = actual
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._refill(now)
        self._level = min(self.burst, self._level - delta)
        if self._log and grant.t > now - self.period - self._margin:
            self._in_window += delta
        if delta < 0:
            self._schedule(loop)

    def set_rate(self, rate: float) -> None:
        """Change the budget to ``rate`` units per ``period``, effective for the next grant.

        The burst follows the rate (one second's worth) unless it was given explicitly.
        Tokens already accrued at the old rate are kept, up to the new burst. Waiters are
        served in the same order; their timer is set again for the new budget. A bad value
        raises ``ConfigError`` naming the option and changes nothing.
        """
        rate = _positive(self._names[0], rate)
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # set before the run starts: no waiter, nothing accrued yet
            loop = None
        if loop is not None:
            self._refill(loop.time())  # what accrued so far accrued at the old rate
        self.rate = rate
        self._fill_per_s = rate / self.period
        if not self._burst_given:
            self.burst = max(1.0, rate / self.period)
        self._level = min(self._level, self.burst)
        if loop is not None and self._waiters:
            self._schedule(loop)

    # -- internals ---------------------------------------------------------------

    def _refill(self, now: float) -> None:
        if self._stamp is not None:
            self._level = min(self.burst, self._level + (now - self._stamp) * self._fill_per_s)
        self._stamp = now
        horizon = now - self.period - self._margin
        while self._log and self._log[0].t <= horizon:
            self._in_window -= self._log.popleft().amount
        if not self._log:
            self._in_window = 0.0

    def _try_take(self, amount: float, now: float) -> Grant | None:
        self._refill(now)
        if self._in_window + min(amount, self.rate) > self.rate + 1e-9:
            return None
        if self._level + 1e-9 < min(amount, self.burst):
            return None
        self._level -= amount
        grant = Grant(now, amount)
        self._log.append(grant)
        self._in_window += amount
        return grant

    def _ready_at(self, amount: float, now: float) -> float:
        """The earliest time ``amount`` could be taken, if nothing else is taken first."""
        ready = now
        excess = self._in_window + min(amount, self.rate) - self.rate
        if excess > 1e-9:
            freed = 0.0
            for grant in self._log:
                freed += grant.amount
                if freed + 1e-9 >= excess:
                    ready = grant.t + self.period + self._margin + 1e-4
                    break
        shortfall = min(amount, self.burst) - self._level
        if shortfall > 1e-9:
            ready = max(ready, now + shortfall / self._fill_per_s)
        return ready

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._waiters and self._waiters[0][1].done():
            self._waiters.popleft()
        if not self._waiters:
            return
        now = loop.time()
        self._refill(now)
        when = self._ready_at(self._waiters[0][0], now)
        self._timer = loop.call_at(max(when, now), self._wake)

    def _wake(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._waiters:
            amount, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            grant = self._try_take(amount, now)
            if grant is None:
                break
            self._waiters.popleft()
            fut.set_result(grant)
        self._schedule(loop)


def _positive(option: str, value: object) -> float:
    """``value`` as a finite float > 0, else a ``ConfigError`` naming ``option``."""
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if number is None or not math.isfinite(number) or number <= 0:
        msg = f"{option}= expected a number > 0, got {value!r}"
        raise ConfigError(msg)
    return float(number)


def estimate_tokens(messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> int:
    """A pre-call token estimate for the TPM budget: ~4 characters a token, plus the answer budget.

    Reconciled with the real usage when the answer arrives.
    """
    completion = params.get("max_tokens") or params.get("max_completion_tokens")
    return prompt_tokens(messages) + int(completion or _DEFAULT_COMPLETION_ESTIMATE)
