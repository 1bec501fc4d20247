"""Telling "the server cannot be reached at all" apart from a request that merely failed.

A refused connection, a host name that does not resolve or a TLS handshake that fails
will fail the same way on every retry, so a run whose first attempts all end like this
stops at once with one clear line instead of retrying for half a minute. A reset or
dropped connection, a timeout or any HTTP status means the server was there.
"""

from __future__ import annotations

import errno
import socket
import ssl

from nbllm.errors import ConnectionFailed, EngineError, RetryableError

__all__ = ["unreachable_reason"]

_ERRNO_REASONS = {
    errno.ECONNREFUSED: "connection refused",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.EADDRNOTAVAIL: "address not available",
}
# What backends say when their exception chain does not keep the OSError (litellm, httpx).
_TEXT_REASONS = (
    ("connection refused", "connection refused"),
    ("connect call failed", "connection refused"),
    ("name or service not known", "host name not found"),
    ("nodename nor servname", "host name not found"),
    ("temporary failure in name resolution", "host name not found"),
    ("getaddrinfo failed", "host name not found"),
    ("certificate verify failed", "TLS certificate not trusted"),
    ("network is unreachable", "network unreachable"),
    ("no route to host", "host unreachable"),
)
_CHAIN_DEPTH = 12


def _reason_of(exc: BaseException) -> str | None:
    if isinstance(exc, socket.gaierror):
        return "host name not found"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "TLS certificate not trusted"
    if isinstance(exc, ssl.SSLError):
        # aiohttp's own SSL errors subclass SSLError without its fields: the OpenSSL
        # reason (e.g. WRONG_VERSION_NUMBER) is on the error it wraps, if anywhere.
        inner = exc.__cause__ or exc.__context__
        detail = getattr(exc, "reason", None) or (inner and getattr(inner, "reason", None))
        return f"TLS handshake failed ({detail})" if detail else "TLS handshake failed"
    if isinstance(exc, OSError) and exc.errno in _ERRNO_REASONS:
        return _ERRNO_REASONS[exc.errno]
    return None


def unreachable_reason(error: EngineError) -> str | None:
    """A short reason ("connection refused") when ``error`` says no connection could be
    made at all; None when the server may well be there."""
    if not isinstance(error, RetryableError):
        return None
    # Backends wrap the OSError under their own errors (litellm even as an HTTP 500).
    seen: BaseException | None = error
    for _ in range(_CHAIN_DEPTH):
        if seen is None:
            break
        reason = _reason_of(seen)
        if reason is not None:
            return reason
        seen = seen.__cause__ or seen.__context__
    if not isinstance(error, ConnectionFailed):
        return None
    text = str(error).lower()
    for fragment, reason in _TEXT_REASONS:
        if fragment in text:
            return reason
    return None
