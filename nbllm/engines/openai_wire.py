"""The OpenAI chat-completions format as nbllm's servers and its lean client write and read it.

``nbllm serve`` and the test server (``nbllm.testing``) answer with ``completion_body`` and
``error_body`` and read requests with ``parse_chat_body``; ``OpenAIEngine`` reads answers
with ``read_completion``, ``error_message`` and ``error_code``. A worker's engine gives
``nbllm serve`` the request's timeout in ``TIMEOUT_HEADER``, a header of nbllm's own that
no OpenAI client sends; the server reads it with ``parse_timeout``, and answers a request
its engine timed out 504 with the code ``TIMEOUT_ERROR_CODE``.

A server run in the foreground stops on the signals ``on_stop_signals`` installs and prints
one line, a prefix then its ``/v1`` URL, once it listens: that line is how a parent process
(``Worker``) learns where it listens.

Plain JSON values and bytes only: no HTTP library here, so importing this costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import signal
import time
from collections.abc import Callable
from typing import Any

from nbllm.errors import RequestRejected
from nbllm.types import ChatRequest, ChatResponse, Message

__all__ = [
    "SERVE_API_KEY_ENV",
    "SERVE_URL_LINE_PREFIX",
    "TIMEOUT_ERROR_CODE",
    "TIMEOUT_HEADER",
    "BadChatRequest",
    "chat_body",
    "completion_body",
    "completion_of",
    "error_body",
    "error_code",
    "error_message",
    "error_type",
    "ignore_stop_signals",
    "on_stop_signals",
    "parse_chat_body",
    "parse_max_tokens",
    "parse_messages",
    "parse_timeout",
    "read_completion",
]

#: The one line ``nbllm serve`` prints to stdout starts with this, then the ``/v1`` URL.
SERVE_URL_LINE_PREFIX = "nbllm serve listening on "
#: The environment variable through which ``nbllm serve`` gets its API key: unlike a
#: command-line argument, other users cannot read it with ``ps``.
SERVE_API_KEY_ENV = "NBLLM_SERVE_API_KEY"
#: Seconds: the request's ``ChatRequest.timeout``, for the served engine to apply as it does
#: in a run (a local model: to the wait for a batch slot, never to a started generation).
TIMEOUT_HEADER = "X-Nbllm-Timeout"
#: The error code of the 504 that answers a request the served engine timed out.
TIMEOUT_ERROR_CODE = "request_timeout"

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class BadChatRequest(RequestRejected):
    """A request body that is not a chat completion request a server can answer (400)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=400)


# --------------------------------------------------------------------- what servers write


def error_body(message: str, type_: str, code: str | None = None) -> dict[str, Any]:
    """An OpenAI-shaped error, which OpenAI clients turn into their typed exceptions."""
    return {"error": {"message": message, "type": type_, "code": code}}


def error_type(status: int) -> str:
    """The OpenAI error ``type`` for an HTTP status."""
    if status in (401, 403):
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    return "invalid_request_error" if status < 500 else "server_error"


def completion_body(
    id_: str,
    model: str,
    text: str,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    finish_reason: str = "stop",
    cached_tokens: int | None = None,
) -> dict[str, Any]:
    """An OpenAI ``chat.completion`` object; token counts not known are null.

    ``finish_reason`` is why the answer ended: ``"stop"``, or ``"length"`` when
    ``max_tokens`` cut it (a server passes on what its engine said). ``cached_tokens``, the
    prompt tokens taken from a cache of earlier prompts, goes where OpenAI puts it
    (``usage.prompt_tokens_details.cached_tokens``); left out when not known.
    """
    total = None
    if prompt_tokens is not None and completion_tokens is not None:
        total = prompt_tokens + completion_tokens
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": total,
    }
    if cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return {
        "id": id_,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage,
    }


# --------------------------------------------------------------------- what servers read


def parse_messages(value: Any) -> list[Message]:
    """``messages`` of a request body, each reduced to its role and content."""
    if not isinstance(value, list) or not value:
        msg = "'messages' must be a non-empty list"
        raise BadChatRequest(msg)
    messages: list[Message] = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            msg = f"messages[{i}] must be an object with a string 'role'"
            raise BadChatRequest(msg)
        if not isinstance(m.get("content"), str):
            msg = f"messages[{i}].content must be a string (content parts are not supported)"
            raise BadChatRequest(msg)
        messages.append({"role": m["role"], "content": m["content"]})
    return messages


def parse_chat_body(raw: bytes) -> tuple[dict[str, Any], list[Message]]:
    """The JSON object of a chat completion request and its messages.

    Raises ``BadChatRequest`` for what no nbllm server answers: a body that is not a JSON
    object, messages that are not role and text content, and streaming.
    """
    try:
        body = json.loads(raw)
    except ValueError:
        msg = "the request body is not valid JSON"
        raise BadChatRequest(msg) from None
    if not isinstance(body, dict):
        msg = "the request body must be a JSON object"
        raise BadChatRequest(msg)
    if body.get("stream"):
        msg = "streaming is not supported"
        raise BadChatRequest(msg)
    return body, parse_messages(body.get("messages"))


def parse_max_tokens(body: dict[str, Any]) -> int | None:
    """The longest answer a request body allows, in tokens: ``max_tokens`` or OpenAI's
    newer ``max_completion_tokens``; None when it sets neither.

    Raises ``BadChatRequest`` for one that is not a whole number >= 1.
    """
    value = body.get("max_tokens", body.get("max_completion_tokens"))
    if value is None:
        return None
    if type(value) is not int or value < 1:
        msg = f"'max_tokens' must be a whole number >= 1, got {value!r}"
        raise BadChatRequest(msg)
    return value


def parse_timeout(value: str | None) -> float | None:
    """The seconds in a ``TIMEOUT_HEADER`` value; None when the request has none.

    Raises ``BadChatRequest`` for one that is not a finite number > 0.
    """
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:  # also refuses nan
        msg = f"the {TIMEOUT_HEADER} header must be a number of seconds > 0, got {value!r}"
        raise BadChatRequest(msg)
    return seconds


# --------------------------------------------------------------------- what clients read


def chat_body(request: ChatRequest) -> dict[str, Any]:
    """The ``/chat/completions`` body of ``request`` (no ``openai/`` prefix on the model),
    following the OpenAI client's conventions: ``extra_body`` is merged into the body, and
    ``extra_headers`` (headers, which the caller sends where it can) are left out."""
    body: dict[str, Any] = {
        "model": request.model.removeprefix("openai/"),
        "messages": list(request.messages),
        **request.params,
    }
    body.pop("extra_headers", None)
    body.update(body.pop("extra_body", None) or {})
    return body


def read_completion(raw: bytes, model: str) -> ChatResponse:
    """The answer in a ``chat.completion`` body; ``model`` where the body names none.

    ``finish_reason`` is the first choice's, None when the body has none (or not a string);
    ``cached_tokens`` is ``usage.prompt_tokens_details.cached_tokens``, None when absent.
    Raises ``ValueError`` when ``raw`` is not a chat completion.
    """
    try:
        payload = json.loads(raw)
    except ValueError as exc:
        msg = "not a chat completion"
        raise ValueError(msg) from exc
    return completion_of(payload, model)


def completion_of(payload: Any, model: str) -> ChatResponse:
    """``read_completion`` of a body already parsed."""
    try:
        choice = payload["choices"][0]
        text = choice["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        msg = "not a chat completion"
        raise ValueError(msg) from exc
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        usage = {}
    reason = choice.get("finish_reason")
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return ChatResponse(
        text=text if isinstance(text, str) else "",
        model=payload.get("model") or model,
        prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=usage.get("completion_tokens"),
        finish_reason=reason if isinstance(reason, str) and reason else None,
        cached_tokens=cached if isinstance(cached, int) else None,
    )


def error_message(raw: bytes) -> str:
    """The message of an error body (OpenAI-shaped or not), at most 500 characters."""
    try:
        payload = json.loads(raw)
        error = payload.get("error", payload)
        if isinstance(error, dict):
            return str(error.get("message") or error)[:500]
        return str(error)[:500]
    except (ValueError, AttributeError):
        return raw[:500].decode("utf-8", "replace")


def error_code(raw: bytes) -> str | None:
    """The ``code`` of an OpenAI-shaped error body; None when it has none."""
    try:
        error = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        return None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


# --------------------------------------------------------------------- a server in the foreground


def on_stop_signals(callback: Callable[[], None]) -> None:
    """Call ``callback`` on the running loop at each SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    for sig in _STOP_SIGNALS:
        try:
            loop.add_signal_handler(sig, callback)
        except (NotImplementedError, RuntimeError):  # Windows: no loop signal handlers
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(callback))


def ignore_stop_signals() -> None:
    """Ignore SIGINT and SIGTERM from now on: a stopped server only exits, whatever comes."""
    loop = asyncio.get_running_loop()
    for sig in _STOP_SIGNALS:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)
