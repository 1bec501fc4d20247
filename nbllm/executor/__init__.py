"""Scheduling, limits, retries and events. Never imports IPython, ipywidgets or matplotlib."""

from __future__ import annotations

from nbllm.executor.events import (
    Alert,
    AttemptFinished,
    BreakerChanged,
    EnginePhase,
    Event,
    LimitChanged,
    Listener,
    RequestSent,
    RetryScheduled,
    RunFinished,
    RunStarted,
    SharedQuota,
    StopRequested,
    TurnFinished,
)
from nbllm.executor.limiter import RateLimiter
from nbllm.executor.runner import Executor
from nbllm.retry import RetryPolicy

__all__ = [
    "Alert",
    "AttemptFinished",
    "BreakerChanged",
    "EnginePhase",
    "Event",
    "Executor",
    "LimitChanged",
    "Listener",
    "RateLimiter",
    "RequestSent",
    "RetryPolicy",
    "RetryScheduled",
    "RunFinished",
    "RunStarted",
    "SharedQuota",
    "StopRequested",
    "TurnFinished",
]
