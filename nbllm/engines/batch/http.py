"""The HTTP side shared by the batch clients: one pooled session, errors mapped to nbllm's.

A batch client makes few, small calls (upload, create, poll, download), each bounded by
``CALL_TIMEOUT_S``; the provider's answers to the lines come hours later, through polls.
"""

from __future__ import annotations

import asyncio
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import aiohttp

from nbllm.engines.batch.lines import BatchInfo, fingerprint
from nbllm.engines.http_status import error_for_status, public_url
from nbllm.engines.openai_wire import error_message
from nbllm.errors import ConnectionFailed, EngineError, RequestTimeout
from nbllm.redact import redact
from nbllm.types import ChatRequest, ChatResponse

__all__ = ["CALL_TIMEOUT_S", "BatchClient"]

#: Seconds one call to a batch API may take (an upload of a large file included).
CALL_TIMEOUT_S = 300.0


class BatchClient(ABC):
    """A provider's batch API: build lines, create a batch, poll it, read its answers.

    ``api`` names the protocol ("openai", "anthropic"); ``max_requests`` and
    ``max_bytes`` are the provider's limits on one batch.
    """

    api: str
    max_requests: int
    max_bytes: int

    def __init__(self, api_base: str, headers: Mapping[str, str], secret: str | None) -> None:
        self.api_base = api_base.rstrip("/")
        self.where = public_url(self.api_base)  # what messages may show
        self._headers = dict(headers)
        self._secret = secret
        self._session: aiohttp.ClientSession | None = None

    @abstractmethod
    def body(self, request: ChatRequest) -> dict[str, Any]:
        """The request as this provider's batch line carries it (no ``custom_id``)."""

    @abstractmethod
    def line(self, custom_id: str, body: Mapping[str, Any]) -> bytes:
        """One line of the batch as sent (JSON, no newline)."""

    @abstractmethod
    async def create(self, lines: list[bytes]) -> BatchInfo: ...

    @abstractmethod
    async def retrieve(self, batch_id: str) -> BatchInfo: ...

    @abstractmethod
    async def cancel(self, batch_id: str) -> BatchInfo: ...

    @abstractmethod
    async def results(self, info: BatchInfo) -> dict[str, ChatResponse | EngineError]:
        """The answer (or the error) of each line that has one, by ``custom_id``."""

    def fingerprint(self, body: Mapping[str, Any]) -> str:
        return fingerprint(self.api, body)

    def secrets(self) -> tuple[str, ...]:
        return (self._secret,) if self._secret else ()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self._headers)
        return self._session

    async def call(
        self,
        method: str,
        path: str,
        *,
        payload: Any = None,
        data: Any = None,
        content_type: str | None = None,
    ) -> bytes:
        """One call; its body, or the nbllm error for its status (secrets masked)."""
        url = self.api_base + path
        kwargs: dict[str, Any] = {"allow_redirects": False}
        if payload is not None:
            kwargs["data"] = json.dumps(payload)
            kwargs["headers"] = {"Content-Type": "application/json"}
        elif data is not None:
            kwargs["data"] = data
            if content_type is not None:
                kwargs["headers"] = {"Content-Type": content_type}
        try:
            async with self._get_session().request(
                method, url, timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S), **kwargs
            ) as resp:
                raw = await resp.read()
                if resp.status >= 300:
                    detail = f"{method} {self.where}{path}: {error_message(raw)}"
                    raise error_for_status(resp.status, redact(detail, self.secrets()))
                return raw
        except asyncio.TimeoutError as exc:
            msg = f"no answer from {self.where}{path} within {CALL_TIMEOUT_S:g} s"
            raise RequestTimeout(msg) from exc
        except aiohttp.ClientError as exc:
            msg = f"connection to {self.where} failed: {type(exc).__name__}: {exc}"
            raise ConnectionFailed(redact(msg, self.secrets())) from exc

    async def call_json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        raw = await self.call(method, path, **kwargs)
        try:
            value = json.loads(raw)
        except ValueError as exc:
            msg = f"{self.where}{path} answered with something not JSON: {raw[:200]!r}"
            raise EngineError(msg) from exc
        if not isinstance(value, dict):
            msg = f"{self.where}{path} answered with {type(value).__name__}, not an object"
            raise EngineError(msg)
        return value

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def number(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
