"""What the Redis-shared limits have in common: a client that fails fast, the start-up check,
Lua scripts sent by ``EVALSHA`` (``EVAL`` when the server does not know them), error text
without passwords, and the one-line-per-outage log.

- ``redis_client(url, timeout_s)``: a ``redis.asyncio`` client with no retries of its own
  (a failure means falling back, not waiting); ``ConfigError`` for a URL it cannot use, or
  when the ``redis`` package (``pip install 'nbllm[redis]'``) is missing;
- ``await check(url)``: ``ConfigError`` naming the URL without its password unless Redis
  answers a PING; the API calls it before any request is sent;
- ``Script(source)``: ``await script(client, keys, args)``;
- ``reason(exc, url)``: an exception as one line, the URL's password and anything shaped like
  a credential masked;
- ``report_down(url, why, then)`` / ``report_up(url)``: one WARNING when Redis at ``url`` is found
  unreachable and one INFO when it is back, however many limiters (deployments × rpm, tpm,
  slots) of this process notice it.

The ``redis`` package is imported only when a client is made.
"""

from __future__ import annotations

import hashlib
import logging
import urllib.parse
from typing import Any

from nbllm.errors import ConfigError
from nbllm.redact import public_url, redact

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "Script",
    "check",
    "close_quietly",
    "reason",
    "redis_client",
    "report_down",
    "report_up",
    "text",
]

log = logging.getLogger("nbllm")

DEFAULT_TIMEOUT_S = 2.0

# Public URLs reported unreachable and not yet back.
_reported_down: set[str] = set()


class Script:
    """A Lua script run by ``EVALSHA``, sent whole (``EVAL``) when the server lacks it
    (``NOSCRIPT``: after a restart or ``SCRIPT FLUSH``)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, client: Any, keys: list[str], args: list[Any]) -> Any:
        from redis.exceptions import NoScriptError

        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await client.eval(self.source, len(keys), *keys, *args)


def redis_client(url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
    """A ``redis.asyncio`` client for ``url`` that fails fast (see the module)."""
    try:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
    except ImportError as exc:
        msg = "redis_url= needs the redis package: pip install 'nbllm[redis]'"
        raise ConfigError(msg) from exc
    try:
        return Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
    except (ValueError, TypeError) as exc:
        msg = (
            f"redis_url= expected a redis://, rediss:// or unix:// URL, "
            f"got {public_url(str(url))!r}: {reason(exc, url)}"
        )
        raise ConfigError(msg) from None


async def check(url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Raise ``ConfigError`` (naming the URL without its password) unless Redis at ``url``
    answers a PING within ``timeout_s``."""
    client = redis_client(url, timeout_s)
    try:
        await client.ping()
    except Exception as exc:  # any failure to reach it is the user's option to fix
        msg = f"redis_url= cannot reach Redis at {public_url(url)}: {reason(exc, url)}"
        raise ConfigError(msg) from None
    finally:
        await close_quietly(client)
    _reported_down.discard(public_url(url))


async def close_quietly(client: Any) -> None:
    try:
        await client.aclose()
    except Exception:  # a broken connection is being dropped anyway
        log.debug("nbllm: closing a Redis client failed", exc_info=True)


def reason(exc: BaseException, url: str) -> str:
    """``exc`` as one line, with ``url``'s password and anything like a key masked."""
    line = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if not url:
        return redact(line)
    return redact(line.replace(url, public_url(url)), [_password(url)])


def report_down(url: str, why: str, then: str) -> None:
    """Log once that Redis at ``url`` (a public URL) is unreachable, ``why``, and what
    happens ``then``."""
    if url not in _reported_down:
        _reported_down.add(url)
        log.warning("nbllm: Redis at %s is unreachable (%s); %s", url, why, then)


def report_up(url: str) -> None:
    """Log once that Redis at ``url`` answers again, if it was reported down."""
    if url in _reported_down:
        _reported_down.discard(url)
        log.info("nbllm: Redis at %s is back; limits are shared again", url)


def text(value: Any) -> str:
    """A Redis reply (bytes) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _password(url: str) -> str | None:
    try:
        return urllib.parse.urlsplit(url).password
    except ValueError:
        return None
