"""The one exception tree of nbllm.

::

    NbllmError
    ├── DatasetError          bad input data: names the row / column and what was expected
    ├── ConfigError           a bad option value: names the option and what was expected
    ├── EngineUnavailable     a named engine cannot run here (missing package, no model, ...)
    ├── CheckpointError       a checkpoint or cache file cannot be used (corrupt, locked, other run)
    └── EngineError           one request failed; lands in a row's ``error`` column
        ├── RetryableError    worth trying again after a pause
        │   ├── RateLimitError    HTTP 429 (``retry_after`` holds the server's hint)
        │   ├── ServerError       HTTP 5xx, 408, 409
        │   ├── RequestTimeout    no answer within ``timeout`` seconds
        │   └── ConnectionFailed  refused, reset or dropped connection
        └── RequestRejected   HTTP 4xx input errors: never retried
            └── AuthenticationError   HTTP 401 / 403

Backend exceptions are mapped to this tree at the engine boundary
(``raise X(msg) from exc``), so the executor only ever sees these classes.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "AuthenticationError",
    "CheckpointError",
    "ConfigError",
    "ConnectionFailed",
    "DatasetError",
    "EngineError",
    "EngineUnavailable",
    "NbllmError",
    "RateLimitError",
    "RequestRejected",
    "RequestTimeout",
    "RetryableError",
    "ServerError",
]


class NbllmError(Exception):
    """Root of every error nbllm raises on purpose."""


class DatasetError(NbllmError, ValueError):
    """The input data cannot become conversations; raised before any request is sent."""


class ConfigError(NbllmError, ValueError):
    """An option has a value nbllm cannot use; raised before any request is sent."""


class EngineUnavailable(NbllmError):
    """A named engine is not installed or cannot run on this machine."""


class CheckpointError(NbllmError):
    """A checkpoint or cache file cannot be used; the message names the file and what to do.

    nbllm never deletes or overwrites such a file on its own.
    """


class EngineError(NbllmError):
    """One request to an engine failed.

    ``status`` is the HTTP status where there was one.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RetryableError(EngineError):
    """A failure that may go away if the same request is sent again later.

    ``retry_after`` is the pause in seconds the server asked for, if it said.
    """

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


class RateLimitError(RetryableError):
    """The provider answered 429 Too Many Requests. ``rate_limits``: its ``x-ratelimit-*``
    headers (names in lower case), where it sent any."""

    rate_limits: Mapping[str, str] | None = None


class ServerError(RetryableError):
    """The provider answered 5xx (or 408 / 409, which providers ask clients to retry)."""


class RequestTimeout(RetryableError):
    """No complete answer arrived within the per-request timeout."""


class ConnectionFailed(RetryableError):
    """The connection was refused, reset or dropped before a complete answer."""


class RequestRejected(EngineError):
    """The provider refused the request itself (4xx): sending it again cannot help."""


class AuthenticationError(RequestRejected):
    """The provider refused the credentials (401 / 403)."""
