"""A lean client for any OpenAI-compatible ``/chat/completions`` endpoint.

vLLM's server, llama.cpp's server, ``nbllm serve`` and most gateways speak this API.
One pooled ``aiohttp`` session carries every request; nothing else sits between the
executor and the socket, which is why this path runs an order of magnitude more
requests per second than going through litellm.

A request's ``timeout`` bounds the whole answer here. ``ServeEngine``
(``nbllm.engines.worker``) changes that for ``nbllm serve``, whose engine applies the
timeout itself (a local model: to the wait for a batch slot only).
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections.abc import Mapping
from dataclasses import replace

import aiohttp

from nbllm.engines.base import Engine
from nbllm.engines.http_status import error_for_status, public_url, rate_limit_headers
from nbllm.engines.openai_wire import (
    TIMEOUT_ERROR_CODE,
    chat_body,
    error_code,
    error_message,
    read_completion,
)
from nbllm.errors import ConnectionFailed, EngineError, RequestRejected, RequestTimeout
from nbllm.types import ChatRequest, ChatResponse

__all__ = ["OpenAIEngine"]


class OpenAIEngine(Engine):
    """Sends chat requests to ``api_base`` (e.g. ``http://127.0.0.1:8000/v1``).

    The ``openai/`` prefix of a model name is dropped before sending. ``api_key`` is
    sent as a Bearer token and kept out of ``repr`` and every message.

    Redirects are not followed: a 3xx answer is a ``RequestRejected`` naming the status
    and the origin it pointed to, and is not retried. Following one would send the
    prompt and every header, keys included, to wherever the server points.
    """

    name = "openai"

    def __init__(
        self, api_base: str, *, api_key: str | None = None, max_connections: int = 256
    ) -> None:
        super().__init__()
        self._url = api_base.rstrip("/") + "/chat/completions"
        self.api_base = public_url(api_base.rstrip("/"))  # what messages and logs may show
        self._headers = {"Content-Type": "application/json"}
        self._api_key = api_key
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"OpenAIEngine(api_base={self.api_base!r})"

    def secrets(self) -> tuple[str, ...]:
        return (self._api_key,) if self._api_key else ()

    def describe(self) -> str:
        return f"openai @ {self.api_base}"

    def identity(self) -> str:
        return self.describe()

    def _get_session(self) -> aiohttp.ClientSession:
        # Created on first use so that it belongs to the loop that runs the requests.
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector, headers=self._headers, json_serialize=json.dumps
            )
        return self._session

    def _client_timeout(self, request: ChatRequest) -> aiohttp.ClientTimeout:
        """How long the HTTP client waits: for the whole answer, the request's timeout."""
        return aiohttp.ClientTimeout(total=request.timeout)

    def _timeout_headers(self, request: ChatRequest) -> dict[str, str]:
        """Headers that tell the server the request's timeout: none for a plain server."""
        return {}

    async def _complete(self, request: ChatRequest) -> ChatResponse:
        body = chat_body(request)
        model = body["model"]
        headers = {**(request.params.get("extra_headers") or {}), **self._timeout_headers(request)}
        timeout = self._client_timeout(request)
        session = self._get_session()
        try:
            async with session.post(
                self._url,
                data=json.dumps(body),
                timeout=timeout,
                headers=headers or None,
                allow_redirects=False,
            ) as resp:
                raw = await resp.read()
                limits = rate_limit_headers(resp.headers) if resp.status == 200 else None
                if 300 <= resp.status < 400:
                    raise self._redirected(resp.status, resp.headers.get("Location"))
                if resp.status != 200:
                    raise self._error(resp.status, raw, resp.headers)
        except asyncio.TimeoutError as exc:
            if timeout.total is None:  # only the connection had a deadline
                msg = f"no connection to {self.api_base} within {timeout.sock_connect} s"
                raise ConnectionFailed(msg) from exc
            msg = f"no answer from {self.api_base} within {request.timeout} s"
            raise RequestTimeout(msg) from exc
        except aiohttp.ClientError as exc:
            msg = f"connection to {self.api_base} failed: {type(exc).__name__}: {exc}"
            raise ConnectionFailed(msg) from exc
        response = self._parse(raw, model)
        return replace(response, rate_limits=limits) if limits else response

    def _error(self, status: int, raw: bytes, headers: Mapping[str, str]) -> EngineError:
        message = error_message(raw)
        if status == 504 and error_code(raw) == TIMEOUT_ERROR_CODE:
            # nbllm serve's engine timed the request out (a local model: it waited for a
            # batch slot too long), as the engine would have in process.
            return RequestTimeout(f"HTTP 504: {message}", status=status)
        return error_for_status(status, message, headers)

    def _redirected(self, status: int, location: str | None) -> RequestRejected:
        # Only the origin is shown: the path or query of a Location may carry a token.
        where = "no Location"
        if location:
            where = "an unreadable Location"
            try:
                parts = urllib.parse.urlsplit(urllib.parse.urljoin(self._url, location))
                port = f":{parts.port}" if parts.port else ""
            except ValueError:  # a port that is not a number
                parts, port = None, ""
            if parts is not None and parts.scheme and parts.hostname:
                where = f"{parts.scheme}://{parts.hostname}{port}"
        msg = (
            f"HTTP {status}: {self.api_base} redirected to {where}; nbllm does not follow "
            "redirects (they would send the prompt and the key there). Set api_base to "
            "the address that answers"
        )
        return RequestRejected(msg, status=status)

    def _parse(self, raw: bytes, model: str) -> ChatResponse:
        try:
            return read_completion(raw, model)
        except ValueError as exc:
            msg = f"{self.api_base} answered with something not a chat completion: {raw[:200]!r}"
            raise EngineError(msg) from exc

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        await super().aclose()
