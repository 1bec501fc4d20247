"""An engine built from a function, for tests and teaching notebooks: no server, no key."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import inspect
import types
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from nbllm.engines.base import Engine
from nbllm.images import content_text
from nbllm.types import ChatRequest, ChatResponse

__all__ = ["FakeEngine", "echo"]

HandlerResult = str | ChatResponse
Handler = Callable[[ChatRequest], HandlerResult | Awaitable[HandlerResult]]


def _code_digest(code: types.CodeType) -> str:
    """A digest of a function's code that is the same in every process."""
    digest = hashlib.sha256(code.co_code)
    for const in code.co_consts:
        part = _code_digest(const) if inspect.iscode(const) else repr(const)
        digest.update(part.encode())
    return digest.hexdigest()[:12]


def _count_tokens(text: str) -> int:
    return max(1, len(text) // 4)


def _max_tokens(params: Mapping[str, Any]) -> int | None:
    """The request's answer budget (``max_tokens``, or OpenAI's newer name), if a number."""
    value = params.get("max_tokens", params.get("max_completion_tokens"))
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def echo(request: ChatRequest) -> str:
    """The default handler: repeats the last message back."""
    last = content_text(request.messages[-1].get("content", ""))
    return f"You asked: {last}"


class FakeEngine(Engine):
    """Answers each request with ``handler(request)``.

    The handler may be sync or async and return a string or a full ``ChatResponse``;
    raising an ``nbllm.errors.EngineError`` subclass simulates a provider failure
    (e.g. ``RateLimitError("slow down", retry_after=1)``). ``latency`` adds a sleep
    per request. ``calls`` counts the requests seen.

    A string answer counts about 4 characters a token and, like a real model, is cut at
    the request's ``max_tokens``: then it is the first ``4 * max_tokens`` characters, with
    ``finish_reason="length"``; otherwise ``"stop"``. A ``ChatResponse`` is the answer as
    it is (say ``finish_reason="length"`` in it to simulate a cut answer); one that gives
    no finish reason gets ``"stop"``.
    """

    name = "fake"

    def __init__(self, handler: Handler = echo, *, latency: float = 0.0) -> None:
        super().__init__()
        self.handler = handler
        self.latency = latency
        self.calls = 0

    def identity(self) -> str:
        # The handler decides the answers: its name and code, so editing it starts a new run.
        code = getattr(self.handler, "__code__", None)
        digest = _code_digest(code) if code is not None else type(self.handler).__qualname__
        name = getattr(self.handler, "__qualname__", type(self.handler).__name__)
        return f"fake {name} {digest}"

    async def _complete(self, request: ChatRequest) -> ChatResponse:
        self.calls += 1
        if self.latency:
            await asyncio.sleep(self.latency)
        result = self.handler(request)
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, ChatResponse):
            if result.finish_reason is None:
                return dataclasses.replace(result, finish_reason="stop")
            return result
        text = str(result)
        finish_reason = "stop"
        limit = _max_tokens(request.params)
        if limit is not None and _count_tokens(text) > limit:
            text, finish_reason = text[: 4 * limit], "length"
        prompt = sum(_count_tokens(content_text(m.get("content", ""))) for m in request.messages)
        return ChatResponse(
            text=text,
            model=request.model,
            prompt_tokens=prompt,
            completion_tokens=_count_tokens(text),
            finish_reason=finish_reason,
        )
