"""Reading what an HTTP API said: status codes and retry hints, shared by the API engines."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping

from nbllm.errors import (
    AuthenticationError,
    EngineError,
    RateLimitError,
    RequestRejected,
    ServerError,
)
from nbllm.redact import public_url  # re-exported: engines import it from here

__all__ = ["error_for_status", "parse_retry_after", "public_url", "rate_limit_headers"]


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds to wait, from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    if not headers:
        return None
    lowered = {k.lower(): v for k, v in headers.items()}
    raw_ms = lowered.get("retry-after-ms")
    if raw_ms is not None:
        try:
            return max(0.0, float(raw_ms) / 1000)
        except ValueError:
            pass
    raw = lowered.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def rate_limit_headers(headers: Mapping[str, str] | None) -> dict[str, str] | None:
    """The provider's ``x-ratelimit-*`` headers (names in lower case); None without any."""
    if not headers:
        return None
    found = {k.lower(): v for k, v in headers.items() if k.lower().startswith("x-ratelimit-")}
    return found or None


def error_for_status(
    status: int, detail: str, headers: Mapping[str, str] | None = None
) -> EngineError:
    """The nbllm error for an HTTP error status, with the server's retry hint attached."""
    message = f"HTTP {status}: {detail}" if detail else f"HTTP {status}"
    if status == 429:
        limited = RateLimitError(message, status=status, retry_after=parse_retry_after(headers))
        limited.rate_limits = rate_limit_headers(headers)
        return limited
    if status >= 500 or status in (408, 409):
        return ServerError(message, status=status, retry_after=parse_retry_after(headers))
    if status in (401, 403):
        return AuthenticationError(message, status=status)
    if 400 <= status < 500:
        return RequestRejected(message, status=status)
    return EngineError(message, status=status)
