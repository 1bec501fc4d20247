"""When to try a failed request again, and how long to wait first.

Only ``RetryableError`` is retried (429, 5xx, timeouts, dropped connections);
``RequestRejected`` (4xx input errors) never is, nor its ``AuthenticationError`` (401 / 403,
or no key at all): the same key would be refused again. The wait grows exponentially with
jitter and is never shorter than the server's ``Retry-After``. ``RetryPolicy(initial=0)``
turns backoff off, for tests that must not sleep.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from nbllm.errors import ConfigError, EngineError, RetryableError

__all__ = ["RetryPolicy"]


def _is_retryable(error: EngineError) -> bool:
    return isinstance(error, RetryableError)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Up to ``retries`` more attempts after the first, waiting ``initial * multiplier**n``
    seconds (capped at ``maximum``, jittered into its upper half) between them."""

    retries: int = 5
    initial: float = 1.0
    multiplier: float = 2.0
    maximum: float = 60.0
    retry_on: Callable[[EngineError], bool] = field(default=_is_retryable, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            msg = f"retries must be a whole number >= 0, got {self.retries!r}"
            raise ConfigError(msg)
        for name in ("initial", "maximum"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                msg = f"RetryPolicy.{name} must be a number of seconds >= 0, got {value!r}"
                raise ConfigError(msg)
        if not isinstance(self.multiplier, (int, float)) or self.multiplier < 1:
            msg = f"RetryPolicy.multiplier must be >= 1, got {self.multiplier!r}"
            raise ConfigError(msg)

    @property
    def attempts(self) -> int:
        """The most attempts one request gets, the first included."""
        return self.retries + 1

    def should_retry(self, error: EngineError, attempt: int) -> bool:
        """Whether to send again after ``attempt`` attempts (from 1) ended in ``error``."""
        return attempt <= self.retries and self.retry_on(error)

    def delay(self, error: EngineError, attempt: int) -> float:
        """Seconds to wait after attempt number ``attempt`` (from 1) failed with ``error``."""
        ceiling = min(self.maximum, self.initial * self.multiplier ** (attempt - 1))
        wait = ceiling / 2 + random.random() * ceiling / 2
        hint = getattr(error, "retry_after", None)
        if hint is not None and hint > wait:
            wait = float(hint)
        return wait
