"""A circuit breaker for one deployment: stop sending to an endpoint that keeps failing.

::

    CLOSED ──allowed_fails consecutive deployment failures──► OPEN
      ▲                                                        │ cooldown_s later, the next
      │ the probe succeeds                                     │ allow() lets one probe go
      └──────────────────────── HALF_OPEN ◄────────────────────┘
                                   │ the probe fails: OPEN again, for another cooldown_s
                                   │ the probe is released or times out: the next allow()
                                   └ sends another probe

To choose among deployments, ask ``available()``: it claims nothing, so a router may
ask it of every candidate (``Router(..., is_open=lambda d: not breakers[d.id].available())``).
Then ``allow()`` the one picked, which claims the probe where one is due, right before
the request goes (after its slot and limiter waits, so that the probe timeout measures
the request, not the queue); if it now says no, pick again. The executor reports the
outcome with ``record_success()``, ``record_failure(error)`` or, for a request that ends
with no outcome (cancelled, stopped), ``release_probe()``. A probe that never reports back
does not wedge the breaker: after ``probe_timeout_s`` the next ``allow()`` sends another.

Interface::

    breaker = CircuitBreaker(allowed_fails=3, cooldown_s=5.0, probe_timeout_s=60.0,
                             clock=loop.time, on_change=callback)
    breaker.allow() -> bool            # may a request go now? (OPEN -> HALF_OPEN happens here)
    breaker.available() -> bool        # what allow() would say, claiming nothing
    breaker.record_success() -> None
    breaker.record_failure(error) -> None   # ignored unless breaker.counts(error)
    breaker.release_probe() -> None    # an admitted request ended with no outcome
    breaker.counts(error) -> bool      # is this failure the deployment's fault?
    breaker.state -> BreakerState      # CLOSED / OPEN / HALF_OPEN
    breaker.trips -> int               # times it opened (from CLOSED or from HALF_OPEN)
    breaker.consecutive_failures -> int
    breaker.retry_in() -> float        # seconds until allow() may say yes; 0 when it would now
    on_change(old: BreakerState, new: BreakerState)   # called after each transition

**What counts** (``counts``): a failure that says the deployment cannot serve anyone —
``ServerError`` (5xx, 408, 409), ``RequestTimeout``, ``ConnectionFailed``,
``AuthenticationError`` (401 / 403: its key is wrong, every request there will fail), an
unclassified ``EngineError`` without a 4xx status, and ``TimeoutError`` / ``OSError`` that
escaped an engine unmapped. What does not count: ``RateLimitError`` (429: the deployment
works but is busy; the rate limiter and the retry's back-off handle it, and opening the
breaker would hide the deployment from the adaptive limit that is finding its rate),
``RequestRejected`` (400 / 404 / 413 / 422: the request's own fault, the next request may
well succeed), any other 4xx, and exceptions that are not request failures (a bug would
trip every deployment alike and is better raised). A failure that does not count is
neutral: it neither opens the breaker nor resets the count; from a half-open probe it
releases the probe, so that the next ``allow()`` sends another.

**Defaults** follow litellm's Router: ``allowed_fails=3`` (``litellm.allowed_fails``) and
``cooldown_s=5`` (``DEFAULT_COOLDOWN_TIME_SECONDS``). Two differences, on purpose:
litellm counts failures per minute and cools down on the one *after* ``allowed_fails``;
here ``allowed_fails`` *consecutive* failures open the breaker (a deployment that fails one
request in ten stays in use, and "3 fails" means the third opens it, as the option reads).
litellm also cools a deployment down on a 429 and a 404, which are left out here for the
reasons above. After the cooldown litellm sends normal traffic again; here one probe goes
first, so that a deployment still down costs one failed request per cooldown, not a burst.

Any success resets the consecutive count. A success while OPEN (a request sent before the
breaker opened, answered late) does not close it: only a probe after the cooldown does.
A counting failure while HALF_OPEN re-opens it even if it came from such a late request:
the deployment failed recently, which is what the probe was there to find out.

The clock is injected (a callable returning seconds, ``time.monotonic`` by default;
pass ``loop.time`` inside the executor, a fake in tests). Nothing here sleeps or needs
an event loop.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable

from nbllm.errors import (
    AuthenticationError,
    ConfigError,
    ConnectionFailed,
    EngineError,
    RateLimitError,
    RequestRejected,
    RequestTimeout,
    ServerError,
)

__all__ = ["BreakerState", "CircuitBreaker", "counts_against_deployment"]


class BreakerState(str, enum.Enum):
    """Where a deployment's breaker stands; the value is what the dashboard shows."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


def counts_against_deployment(error: BaseException) -> bool:
    """Whether ``error`` says the deployment failed (see the module docstring)."""
    if isinstance(error, RateLimitError):
        return False
    if isinstance(error, AuthenticationError):
        return True
    if isinstance(error, RequestRejected):
        return False
    if isinstance(error, (ServerError, RequestTimeout, ConnectionFailed)):
        return True
    if isinstance(error, EngineError):
        return error.status is None or not 400 <= error.status < 500
    return isinstance(error, (TimeoutError, OSError))


class CircuitBreaker:
    """One deployment's breaker: ``allow()`` before a request, ``record_*`` after it."""

    def __init__(
        self,
        *,
        allowed_fails: int = 3,
        cooldown_s: float = 5.0,
        probe_timeout_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState, BreakerState], object] | None = None,
    ) -> None:
        if (
            not isinstance(allowed_fails, int)
            or isinstance(allowed_fails, bool)
            or allowed_fails < 1
        ):
            msg = f"allowed_fails= expected a whole number >= 1, got {allowed_fails!r}"
            raise ConfigError(msg)
        self.allowed_fails = allowed_fails
        self.cooldown_s = _positive("cooldown_s", cooldown_s)
        self.probe_timeout_s = _positive("probe_timeout_s", probe_timeout_s)
        self._clock = clock
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._fails = 0
        self._trips = 0
        self._opened_at = 0.0
        self._probe_since: float | None = None  # when the outstanding probe went, if one is out

    def __repr__(self) -> str:
        return (
            f"CircuitBreaker(state={self._state.value}, failures={self._fails}/"
            f"{self.allowed_fails}, trips={self._trips})"
        )

    @property
    def state(self) -> BreakerState:
        """CLOSED, OPEN or HALF_OPEN. OPEN stays OPEN past the cooldown until ``allow()``."""
        return self._state

    @property
    def trips(self) -> int:
        """How many times the breaker opened (a failed probe re-opening it counts too)."""
        return self._trips

    @property
    def consecutive_failures(self) -> int:
        """Counting failures since the last success."""
        return self._fails

    @staticmethod
    def counts(error: BaseException) -> bool:
        """Whether ``error`` counts towards opening the breaker (the deployment's fault)."""
        return counts_against_deployment(error)

    def allow(self) -> bool:
        """May a request go to this deployment now? A yes while not CLOSED is the probe."""
        if self._state is BreakerState.CLOSED:
            return True
        now = self._clock()
        if self._state is BreakerState.OPEN:
            if now < self._opened_at + self.cooldown_s:
                return False
            self._probe_since = now
            self._move(BreakerState.HALF_OPEN)
            return True
        if self._probe_since is not None and now < self._probe_since + self.probe_timeout_s:
            return False
        # No probe out (released), or the last one was lost: send another.
        self._probe_since = now
        return True

    def available(self) -> bool:
        """What ``allow()`` would answer now, without moving state or claiming a probe."""
        if self._state is BreakerState.CLOSED:
            return True
        now = self._clock()
        if self._state is BreakerState.OPEN:
            return now >= self._opened_at + self.cooldown_s
        return self._probe_since is None or now >= self._probe_since + self.probe_timeout_s

    def retry_in(self) -> float:
        """Seconds until ``allow()`` may say yes; 0 when it would say yes now."""
        if self._state is BreakerState.CLOSED:
            return 0.0
        now = self._clock()
        if self._state is BreakerState.OPEN:
            return max(0.0, self._opened_at + self.cooldown_s - now)
        if self._probe_since is None:
            return 0.0
        return max(0.0, self._probe_since + self.probe_timeout_s - now)

    def record_success(self) -> None:
        """A request to this deployment was answered."""
        self._fails = 0
        if self._state is BreakerState.HALF_OPEN:
            self._probe_since = None
            self._move(BreakerState.CLOSED)

    def record_failure(self, error: BaseException) -> None:
        """A request to this deployment failed with ``error``; only ``counts(error)`` ones count."""
        if not self.counts(error):
            self.release_probe()
            return
        self._fails += 1
        if self._state is BreakerState.HALF_OPEN or (
            self._state is BreakerState.CLOSED and self._fails >= self.allowed_fails
        ):
            self._open()

    def release_probe(self) -> None:
        """An admitted request ended with no outcome (cancelled, stopped, failed neutrally).

        While HALF_OPEN the next ``allow()`` sends another probe; otherwise nothing changes.
        """
        if self._state is BreakerState.HALF_OPEN:
            self._probe_since = None

    # -- internals ---------------------------------------------------------------

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._probe_since = None
        self._trips += 1
        self._move(BreakerState.OPEN)

    def _move(self, new: BreakerState) -> None:
        old, self._state = self._state, new
        # Called last, so that a listener that raises leaves a consistent breaker behind.
        if self._on_change is not None and old is not new:
            self._on_change(old, new)


def _positive(option: str, value: object) -> float:
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if number is None or not math.isfinite(number) or number <= 0:
        msg = f"{option}= expected a number of seconds > 0, got {value!r}"
        raise ConfigError(msg)
    return float(number)
