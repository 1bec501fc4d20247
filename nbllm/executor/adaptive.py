"""Find a provider's limit while running: ``rpm="auto"``, ``tpm="auto"``, ``concurrency="auto"``.

One ``AdaptiveLimit`` drives one budget. The router reports every answer from the
deployment (``on_success``) and every 429 (``on_rate_limited``), with the response's
headers where it has them; the controller moves ``limit`` and pushes it to its target:
a ``RateLimiter`` (through ``set_rate``) or any callable taking the new limit (for a
slot count). Interface::

    auto = AdaptiveLimit(limiter, ceiling=max_rpm, start=None, floor=1.0,
                         unit="requests", clock=loop.time)
    auto.on_success(headers=None, amount=1.0)        # an answer (amount: tokens, for "tokens")
    auto.on_rate_limited(headers=None, amount=1.0)   # a 429
    auto.limit -> float                  # the limit in force, units per ``period``
    auto.history -> list[tuple[float, float]]   # (clock time, limit) at start and each change
    auto.rate_limited -> int             # 429s seen
    auto.provider_limit -> float | None  # the last limit header read, if any

    # concurrency="auto": the same class on a slot count, whole numbers, no headers
    AdaptiveLimit(slots.set_capacity, ceiling=64, start=8, unit="slots", period=10.0)

**The rules**, in the order they apply:

1. *A limit header sets the rate.* ``x-ratelimit-limit-requests`` (``unit="requests"``) or
   ``x-ratelimit-limit-tokens`` (``"tokens"``) is read as the limit per ``period`` (the
   run's rate window, 60 s by default, the minute of OpenAI's RPM/TPM; a time-scaled run
   reads the scaled server's numbers per its scaled window). When the header first
   appears or its value changes, the limit becomes that value at once (capped by the
   ceiling; not raised within a period of a 429). A header that lowers the limit counts
   as a cut (rule 2). The header then stays the upper bound: after a 429 the limit grows
   back to it, never past it.
2. *A 429 cuts, once per period.* The first 429 cuts the limit; further 429s within
   ``period`` of that cut are counted but cut nothing (they answer requests sent before
   the cut, and a provider's window remembers a full period). The cut aims at what the
   provider really accepted: once the controller has watched a full period, the limit
   becomes 95 % of the answers of the last period (95 % of itself if the answers kept up
   with it), never below a quarter of the old limit. Before that (a provider's window
   may still hold an earlier run's requests, and so few answers would mislead) and for
   a slot count, the limit is multiplied by ``decrease`` (0.5). A 429 is blamed on the budget
   whose ``x-ratelimit-remaining-*`` header reads 0: a 429 that says requests remain but
   tokens do not is the token budget's, and the request budget does not cut (nor the
   other way round; a slot count cuts only when neither header reads 0). Without such
   headers every adaptive budget takes the cut.
3. *Growth while answers come.* Until the first 429 a rate budget starts slowly as TCP
   does: after each full period with no 429 and no change, the next answer doubles it
   (from 60 requests a minute, a provider's 10,000 is found within eight minutes, where
   steps of 5 % would take an hour). After a 429, a full clean period lets the next
   answer raise the limit by ``increase`` (5 %) of itself, at least one unit; each
   further clean period doubles that fraction (5, 10, 20, 40, 80, 100 %), so a provider
   that raised its limit is followed within a few periods, while right after a cut the
   first steps stay small. Any 429 resets the fraction to ``increase``. A rate budget
   grows only when it was used: at least half the limit went out in the last period
   (a run held back by something else would otherwise drift up to the ceiling and then
   burst). A slot count always grows.
4. *Bounds.* Never above ``ceiling`` (the user's ``max_rpm`` / ``max_tpm`` / maximum
   concurrency) nor below ``floor`` (1 unit per period).

``start`` is the first limit; without it, half the ceiling. One of the two is required.
``x-ratelimit-reset-*`` (OpenAI's durations: "1s", "6m0s", "20ms") is parsed into
``last_headers`` for whoever wants a retry hint; the controller does not act on it.

The clock is injected (``time.monotonic`` by default; pass ``loop.time`` in the executor,
a fake in tests). Nothing here sleeps or needs an event loop, except what the target does.
"""

from __future__ import annotations

import collections
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from nbllm.errors import ConfigError
from nbllm.executor.limiter import RateLimiter

__all__ = ["AdaptiveLimit", "RateLimitHeaders", "parse_duration", "parse_rate_limit_headers"]

Unit = Literal["requests", "tokens", "slots"]
_UNITS = ("requests", "tokens", "slots")
_HEADROOM = 0.95  # aim a measured cut this far under what the provider accepted
_DEEPEST_CUT = 0.25
_USED_TO_GROW = 0.5
_PREFIX = "x-ratelimit-"


@dataclass(frozen=True, slots=True)
class RateLimitHeaders:
    """What a response's ``x-ratelimit-*`` headers said; ``None`` where one was absent."""

    limit_requests: float | None = None
    remaining_requests: float | None = None
    reset_requests_s: float | None = None
    limit_tokens: float | None = None
    remaining_tokens: float | None = None
    reset_tokens_s: float | None = None


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|h|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration(text: str) -> float | None:
    """Seconds in an OpenAI reset header ("1s", "6m0s", "20ms", "1h2m3.5s", or "0.5").

    Anything else gives ``None``: a provider's odd header is ignored, not an error.
    """
    text = text.strip().lower()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    total = 0.0
    pos = 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _UNIT_S[match.group(2)]
        pos = match.end()
    return total if pos == len(text) and pos > 0 else None


def _count(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def parse_rate_limit_headers(headers: Mapping[str, str] | None) -> RateLimitHeaders:
    """The ``x-ratelimit-*`` headers of a response, in any letter case."""
    if not headers:
        return RateLimitHeaders()
    found = {k.lower(): v for k, v in headers.items() if k[:12].lower() == _PREFIX}
    if not found:
        return RateLimitHeaders()

    def get(name: str, parse: Callable[[str], float | None]) -> float | None:
        raw = found.get(_PREFIX + name)
        return parse(str(raw)) if raw is not None else None

    return RateLimitHeaders(
        limit_requests=get("limit-requests", _count),
        remaining_requests=get("remaining-requests", _count),
        reset_requests_s=get("reset-requests", parse_duration),
        limit_tokens=get("limit-tokens", _count),
        remaining_tokens=get("remaining-tokens", _count),
        reset_tokens_s=get("reset-tokens", parse_duration),
    )


class AdaptiveLimit:
    """Moves one budget's limit from what the provider answers (see the module docstring)."""

    def __init__(
        self,
        target: RateLimiter | Callable[[float], object] | None = None,
        *,
        ceiling: float | None = None,
        start: float | None = None,
        floor: float = 1.0,
        period: float | None = None,
        unit: Unit = "requests",
        decrease: float = 0.5,
        increase: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
        name: str = "rpm",
    ) -> None:
        if unit not in _UNITS:
            msg = f"unit= expected one of {', '.join(_UNITS)}, got {unit!r}"
            raise ConfigError(msg)
        self.unit: Unit = unit
        self.name = name
        self.floor = _positive("floor", floor)
        self.ceiling = math.inf if ceiling is None else _positive(f"max_{name}", ceiling)
        if period is None:
            period = target.period if isinstance(target, RateLimiter) else 60.0
        self.period = _positive("period", period)
        if not (isinstance(decrease, (int, float)) and 0 < decrease < 1):
            msg = f"decrease= expected a factor between 0 and 1, got {decrease!r}"
            raise ConfigError(msg)
        self.decrease = float(decrease)
        if not (isinstance(increase, (int, float)) and 0 < increase <= 1):
            msg = f"increase= expected a fraction > 0 and <= 1, got {increase!r}"
            raise ConfigError(msg)
        self.increase = float(increase)
        if start is None:
            if ceiling is None:
                msg = f"{name}='auto' needs a start value or a ceiling (max_{name}=)"
                raise ConfigError(msg)
            start = self.ceiling / 2
        start = _positive(f"{name}", start)
        if self.floor > self.ceiling:
            msg = f"floor= expected at most the ceiling {self.ceiling:g}, got {self.floor:g}"
            raise ConfigError(msg)
        self._target = target
        self._clock = clock
        self.provider_limit: float | None = None
        self.last_headers = RateLimitHeaders()
        self.rate_limited = 0
        now = clock()
        self._started = now
        self._quiet_since = now  # the last change or 429: growth waits a period from here
        self._last_cut = -math.inf
        self._last_429 = -math.inf
        self._doublings = 0
        self._slow_start = unit != "slots"  # doubling per clean period until the first 429
        # (time, amount, answered) over the last period, with running sums
        self._events: collections.deque[tuple[float, float, bool]] = collections.deque()
        self._answered = 0.0
        self._sent = 0.0
        self._limit = self._bounded(start)
        self.history: list[tuple[float, float]] = [(now, self._limit)]
        self._apply()

    def __repr__(self) -> str:
        ceiling = "none" if math.isinf(self.ceiling) else f"{self.ceiling:g}"
        return (
            f"AdaptiveLimit({self.name}={self._limit:g}, unit={self.unit}, ceiling={ceiling}, "
            f"429s={self.rate_limited})"
        )

    @property
    def limit(self) -> float:
        """The limit in force: units per ``period`` (a whole number of slots for ``"slots"``)."""
        return self._limit

    def on_success(self, headers: Mapping[str, str] | None = None, amount: float = 1.0) -> None:
        """An answer came back; ``amount`` is what it spent of this budget (its tokens)."""
        now = self._clock()
        self._record(now, amount, answered=True)
        self._read_headers(headers, now)
        if now - self._quiet_since >= self.period and self._in_use():
            self._grow(now)

    def on_rate_limited(
        self, headers: Mapping[str, str] | None = None, amount: float = 1.0
    ) -> None:
        """The provider answered 429; ``amount`` is what the request would have spent."""
        now = self._clock()
        self.rate_limited += 1
        self._record(now, amount, answered=False)
        seen = self._read_headers(headers, now)
        if not self._blames_me(seen):
            return
        self._last_429 = now
        self._quiet_since = now
        self._doublings = 0
        self._slow_start = False
        if now - self._last_cut >= self.period:
            self._cut(now)

    # -- internals ---------------------------------------------------------------

    def _record(self, now: float, amount: float, *, answered: bool) -> None:
        events = self._events
        events.append((now, amount, answered))
        self._sent += amount
        if answered:
            self._answered += amount
        horizon = now - self.period
        while events and events[0][0] <= horizon:
            _, old, ok = events.popleft()
            self._sent -= old
            if ok:
                self._answered -= old

    def _read_headers(self, headers: Mapping[str, str] | None, now: float) -> RateLimitHeaders:
        seen = parse_rate_limit_headers(headers)
        if headers:
            self.last_headers = seen
        header = {"requests": seen.limit_requests, "tokens": seen.limit_tokens}.get(self.unit)
        if header is None or header <= 0 or header == self.provider_limit:
            return seen
        self.provider_limit = header
        wanted = self._bounded(header)
        if now - self._last_429 < self.period:
            wanted = min(wanted, self._limit)  # a recent 429 says the header is not all ours
        if wanted < self._limit:
            self._last_cut = now  # the 429s of requests sent at the old rate cut no further
            self._slow_start = False
        self._set(wanted, now)
        return seen

    def _blames_me(self, seen: RateLimitHeaders) -> bool:
        requests_out = seen.remaining_requests == 0
        tokens_out = seen.remaining_tokens == 0
        if self.unit == "requests":
            return not (tokens_out and not requests_out and seen.remaining_requests is not None)
        if self.unit == "tokens":
            return not (requests_out and not tokens_out and seen.remaining_tokens is not None)
        return not (requests_out or tokens_out)

    def _in_use(self) -> bool:
        return self.unit == "slots" or self._sent >= _USED_TO_GROW * self._limit

    def _cut(self, now: float) -> None:
        self._last_cut = now
        old = self._limit
        measured = self.unit != "slots" and now - self._started >= self.period
        if measured:
            wanted = max(_HEADROOM * min(self._answered, old), _DEEPEST_CUT * old)
        else:
            wanted = old * self.decrease
        self._set(min(old, self._bounded(wanted)), now)

    def _grow(self, now: float) -> None:
        fraction = 1.0 if self._slow_start else min(1.0, self.increase * 2**self._doublings)
        wanted = self._bounded(self._limit + max(1.0, self._limit * fraction))
        if wanted > self._limit:
            self._doublings += 1
            self._set(wanted, now)

    def _bounded(self, value: float) -> float:
        top = self.ceiling
        if self.provider_limit is not None:
            top = min(top, max(self.floor, self.provider_limit))
        value = min(max(value, self.floor), top)
        if self.unit == "slots":
            value = float(max(math.floor(value), math.ceil(self.floor)))
        return value

    def _set(self, value: float, now: float) -> None:
        if value == self._limit:
            return
        self._limit = value
        self._quiet_since = now
        self.history.append((now, value))
        self._apply()

    def _apply(self) -> None:
        target = self._target
        if isinstance(target, RateLimiter):
            target.set_rate(self._limit)
        elif target is not None:
            target(int(self._limit) if self.unit == "slots" else self._limit)


def _positive(option: str, value: object) -> float:
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if number is None or not math.isfinite(number) or number <= 0:
        msg = f"{option}= expected a number > 0, got {value!r}"
        raise ConfigError(msg)
    return float(number)
