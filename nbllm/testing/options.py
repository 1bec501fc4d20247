"""The test server's options that need more than a number: faults and latency."""

from __future__ import annotations

import random
from enum import Enum

from nbllm.errors import ConfigError

__all__ = ["Fault", "Latency", "as_number", "refuse_unless"]


class Fault(str, Enum):
    """Failure kinds the server can inject; a ``str`` enum so CLI/JSON spellings map directly."""

    SERVER_ERROR = "server_error"  # 500 with an OpenAI-shaped error body
    UNAVAILABLE = "unavailable"  # 503 with Retry-After
    DROP = "drop"  # the connection is closed without any response
    HANG = "hang"  # held for hang_s, then answered normally (cut off by shutdown)

    @classmethod
    def parse(cls, value: Fault | str) -> Fault:
        """Accept a Fault, its value or its name, in any case (for CLI and dict keys)."""
        if isinstance(value, Fault):
            return value
        text = str(value).strip().lower().replace("-", "_")
        for kind in cls:
            if text in (kind.value, kind.name.lower()):
                return kind
        msg = f"faults: unknown fault {value!r}; expected one of {[k.value for k in cls]}"
        raise ConfigError(msg)


def refuse_unless(ok: bool, option: str, expected: str, value: object) -> None:
    """Refuse a bad option with one line naming it and what it must be."""
    if not ok:
        msg = f"TestServer {option} must be {expected}, got {value!r}"
        raise ConfigError(msg)


def as_number(option: str, value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        refuse_unless(False, option, "a number", value)
        raise


class Latency:
    """How long the server waits before each answer: ``latency`` seconds, a uniform
    draw from a (low, high) range, or with ``sigma`` > 0 a lognormal draw whose median
    is ``latency`` (``median * exp(sigma * N(0, 1))``: a long right tail, as a loaded
    provider's)."""

    def __init__(self, latency: float | tuple[float, float], sigma: float = 0.0) -> None:
        refuse_unless(as_number("latency_sigma", sigma) >= 0, "latency_sigma", ">= 0", sigma)
        self.sigma = float(sigma)
        if isinstance(latency, tuple):
            low, high = (as_number("latency", x) for x in latency)
            refuse_unless(0 <= low <= high, "latency", "a range with 0 <= low <= high", latency)
            refuse_unless(
                not self.sigma, "latency", "one number (the median) with latency_sigma", latency
            )
            self.low, self.high = low, high
        else:
            refuse_unless(as_number("latency", latency) >= 0, "latency", ">= 0", latency)
            self.low = self.high = float(latency)

    def draw(self, rng: random.Random) -> float:
        if self.sigma:
            return self.low * rng.lognormvariate(0.0, self.sigma)
        return rng.uniform(self.low, self.high) if self.high > self.low else self.low
