"""A run's requests- and tokens-per-minute budgets: fixed or found while running, local or
shared through Redis.

``RunLimits`` is what the executor asks before each request (``acquire``) and tells after
it (``answered``, ``rate_limited``):

- ``rpm=N`` / ``tpm=N``: a ``RateLimiter`` of this process's own, or with ``redis_url`` a
  ``SharedRateLimiter`` keyed by the deployment's id, so every process running against the
  same deployment with the same Redis stays under the limit together. When the shared
  limiter falls back to local limits (Redis went away) or returns, the run's listeners get
  a ``SharedQuota`` event.
- ``rpm="auto"`` / ``tpm="auto"``: the limiter's rate is driven by an ``AdaptiveLimit``:
  it starts at half of ``max_rpm`` / ``max_tpm`` (or at ``AUTO_START`` per window without a
  ceiling), grows while requests succeed, and is cut on a 429, never above the ceiling.
  Each change is a ``LimitChanged`` event, so the dashboard shows the limit in force.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from nbllm.errors import ConfigError, RateLimitError
from nbllm.executor.adaptive import AdaptiveLimit
from nbllm.executor.events import Event, LimitChanged, SharedQuota
from nbllm.executor.limiter import Grant, RateLimiter
from nbllm.executor.shared_limit import SharedRateLimiter
from nbllm.executor.slots import RequestSlots
from nbllm.types import ChatResponse

__all__ = ["AUTO_CONCURRENCY", "AUTO_START", "Limiter", "RunLimits", "SlotControl", "run_wide"]

Limiter = RateLimiter | SharedRateLimiter

#: Where rpm / tpm "auto" start, per rate window, when no ceiling is given.
AUTO_START = {"rpm": 60.0, "tpm": 60_000.0}
#: concurrency="auto" (and a deployment's max_parallel_requests="auto"): the slot count it
#: starts at, its ceiling, and the seconds of answers without a 429 it waits to grow.
AUTO_CONCURRENCY = {"start": 8, "ceiling": 256, "period_s": 10.0}

_NAMES = ("rate_window_s", "burst")


def run_wide(limits: Mapping[tuple[str, str], float]) -> dict[str, float]:
    """The "auto" limits in force across a run, by kind, from each ``(kind, deployment)``'s
    own: a rate ("rpm", "tpm") summed over the deployments; "concurrency" the run's own
    slot count (deployment ""), a deployment's own "auto" cap being its alone. What the
    dashboard shows and ``result.limit_history`` records."""
    out: dict[str, float] = {}
    for (kind, deployment), limit in limits.items():
        if kind != "concurrency" or not deployment:
            out[kind] = out.get(kind, 0.0) + limit
    return out


class RunLimits:
    """The rpm and tpm budgets of one run against one deployment (see the module)."""

    def __init__(
        self,
        rpm: float | str | None,
        tpm: float | str | None,
        window_s: float,
        *,
        max_rpm: float | None = None,
        max_tpm: float | None = None,
        redis_url: str | None = None,
        deployment: str,
        emit: Callable[[Event], None],
    ) -> None:
        self._emit = emit
        self.deployment = deployment
        self.adaptive: dict[str, AdaptiveLimit] = {}
        self.rpm = self._make("rpm", rpm, max_rpm, window_s, redis_url, deployment)
        self.tpm = self._make("tpm", tpm, max_tpm, window_s, redis_url, deployment)

    def _make(
        self,
        kind: str,
        rate: float | str | None,
        ceiling: float | None,
        window_s: float,
        redis_url: str | None,
        deployment: str,
    ) -> Limiter | None:
        if rate is None:
            return None
        start = None
        if rate == "auto":
            if redis_url is not None:
                msg = (
                    f"{kind}='auto' cannot be shared through redis_url= yet: give {kind}= a number"
                )
                raise ConfigError(msg)
            start = ceiling / 2 if ceiling is not None else AUTO_START[kind]
        first: Any = rate if start is None else start  # RateLimiter checks it
        limiter = self._limiter(kind, first, window_s, redis_url, deployment)
        if start is not None:
            self.adaptive[kind] = AdaptiveLimit(
                limiter.set_rate if isinstance(limiter, RateLimiter) else None,
                ceiling=ceiling,
                start=start,
                period=window_s,
                unit="requests" if kind == "rpm" else "tokens",
                name=kind,
            )
        return limiter

    def _limiter(
        self, kind: str, rate: float, window_s: float, redis_url: str | None, deployment: str
    ) -> Limiter:
        names = (kind, *_NAMES)
        if redis_url is None:
            return RateLimiter(rate, window_s, names=names)

        def fell_back(reason: str) -> None:
            self._emit(SharedQuota(False, f"{kind} is local for now: {reason}", time.time()))

        def recovered() -> None:
            self._emit(SharedQuota(True, f"{kind} is shared again", time.time()))

        return SharedRateLimiter(
            redis_url,
            deployment,
            kind,
            rate,
            window_s,
            names=names,
            on_fallback=fell_back,
            on_recover=recovered,
        )

    async def acquire(self, estimate: int) -> Grant | None:
        """Wait for one request and ``estimate`` tokens; the tokens' grant, if counted."""
        if self.rpm is not None:
            await self.rpm.acquire(1)
        return await self.tpm.acquire(estimate) if self.tpm is not None else None

    def answered(self, grant: Grant | None, response: ChatResponse) -> None:
        """A request was answered: settle its tokens, and let "auto" limits grow."""
        used = (response.prompt_tokens or 0) + (response.completion_tokens or 0)
        if grant is not None and self.tpm is not None and used:
            self.tpm.settle(grant, used)
        self._adapt("on_success", {"rpm": 1.0, "tpm": float(used)}, response.rate_limits)

    def rate_limited(self, error: RateLimitError, estimate: int) -> None:
        """A 429: cut the "auto" limits (once per window, however many 429s it holds)."""
        self._adapt("on_rate_limited", {"rpm": 1.0, "tpm": float(estimate)}, error.rate_limits)

    def _adapt(
        self, how: str, amounts: dict[str, float], headers: Mapping[str, str] | None
    ) -> None:
        for kind, control in self.adaptive.items():
            before = control.limit
            getattr(control, how)(headers, amount=amounts[kind])
            if control.limit != before:
                self._emit(LimitChanged(kind, control.limit, time.time(), self.deployment))

    async def aclose(self) -> None:
        for limiter in (self.rpm, self.tpm):
            if isinstance(limiter, SharedRateLimiter):
                await limiter.aclose()


class SlotControl:
    """``concurrency="auto"``: a slot count found while running. Whole slots, cut by half
    on a 429 that the rpm / tpm headers do not blame on their own budgets, and grown
    while answers come (see ``AdaptiveLimit``); each change is a ``LimitChanged``
    ("concurrency") event."""

    def __init__(
        self,
        slots: RequestSlots,
        *,
        deployment: str,
        emit: Callable[[Event], None],
        ceiling: int = int(AUTO_CONCURRENCY["ceiling"]),
    ) -> None:
        self.slots = slots
        self.deployment = deployment  # "" for the run's own slots
        self._emit = emit
        self.adaptive = AdaptiveLimit(
            slots.set_capacity,
            ceiling=ceiling,
            start=min(AUTO_CONCURRENCY["start"], ceiling),
            unit="slots",
            period=AUTO_CONCURRENCY["period_s"],
            name="concurrency",
        )

    def answered(self, headers: Mapping[str, str] | None) -> None:
        self._moved(self.adaptive.on_success, headers)

    def rate_limited(self, headers: Mapping[str, str] | None) -> None:
        self._moved(self.adaptive.on_rate_limited, headers)

    def _moved(self, how: Callable[..., None], headers: Mapping[str, str] | None) -> None:
        before = self.adaptive.limit
        how(headers)
        if self.adaptive.limit != before:
            limit = self.adaptive.limit
            self._emit(LimitChanged("concurrency", limit, time.time(), self.deployment))
