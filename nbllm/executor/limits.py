"""A run's requests- and tokens-per-minute budgets: local, or shared through Redis.

With ``redis_url``, each budget is a ``SharedRateLimiter`` keyed by the deployment's id,
so every process running against the same deployment with the same Redis stays under the
limit together; without, a ``RateLimiter`` of this process's own. When the shared
limiter falls back to local limits (Redis went away) or returns, the run's listeners get
a ``SharedQuota`` event.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from nbllm.executor.events import Event, SharedQuota
from nbllm.executor.limiter import RateLimiter
from nbllm.executor.shared_limit import SharedRateLimiter

__all__ = ["Limiter", "run_limiter"]

Limiter = RateLimiter | SharedRateLimiter

_NAMES = ("rate_window_s", "burst")


def run_limiter(
    kind: str,
    rate: float | None,
    window_s: float,
    redis_url: str | None,
    deployment: str,
    emit: Callable[[Event], None],
) -> Limiter | None:
    """The budget ``kind`` ("rpm" or "tpm") of ``rate`` per ``window_s``; None without one."""
    if rate is None:
        return None
    names = (kind, *_NAMES)
    if redis_url is None:
        return RateLimiter(rate, window_s, names=names)

    def fell_back(reason: str) -> None:
        emit(SharedQuota(False, f"{kind} is local for now: {reason}", time.time()))

    def recovered() -> None:
        emit(SharedQuota(True, f"{kind} is shared again", time.time()))

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
