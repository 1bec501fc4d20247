"""What a chat completion body sent to ``nbllm serve`` may hold, read into a ``ChatRequest``.

Bounds, each a 400 (``BadChatRequest``) with a message that says which: JSON nested deeper
than the interpreter's stack, more than ``MAX_MESSAGES`` messages, ``n`` other than 1, a
sampling parameter of the wrong JSON type, and a ``max_tokens`` (or
``max_completion_tokens``) beyond the model's context: the engine's ``context_length``
where it reports one (a local engine, once loaded), else ``MAX_TOKENS_CAP``.

Parsing is pure: the server runs it in a thread for large bodies.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nbllm.engines.base import Engine
from nbllm.engines.openai_wire import BadChatRequest, parse_chat_body
from nbllm.types import ChatRequest

__all__ = ["MAX_MESSAGES", "MAX_TOKENS_CAP", "context_length", "parse_chat"]

#: Messages one request may hold (fixed): far beyond any real conversation.
MAX_MESSAGES = 10_000
#: The largest ``max_tokens`` accepted where the engine reports no context length (an API
#: engine): no model has a context longer than this.
MAX_TOKENS_CAP = 1 << 20

# Sampling parameters passed on to the engine, with the JSON types each may have.
_SAMPLING_PARAMS: Mapping[str, tuple[type, ...]] = {
    "max_tokens": (int,),
    "temperature": (int, float),
    "top_p": (int, float),
    "seed": (int,),
    "stop": (str, list),
    "presence_penalty": (int, float),
    "frequency_penalty": (int, float),
}


def context_length(engine: Engine | None) -> int | None:
    """The model's context length in tokens, where the engine reports one (local engines
    do, once loaded)."""
    context = getattr(engine, "context_length", None)
    if isinstance(context, bool) or not isinstance(context, int):
        return None
    return context if context > 0 else None


def parse_chat(
    raw: bytes, model: str, timeout: float | None, context: int | None = None
) -> ChatRequest:
    """The engine request for an OpenAI chat completion body; ``model`` is the served one.

    ``context``: the model's context length, where the engine knows it; a ``max_tokens``
    beyond it (beyond ``MAX_TOKENS_CAP`` where it is None) is refused.
    """
    try:
        body, messages = parse_chat_body(raw)
    except RecursionError:  # JSON nested deeper than the interpreter's stack
        msg = "the request body is nested too deeply"
        raise BadChatRequest(msg) from None
    if len(messages) > MAX_MESSAGES:
        msg = f"a request may hold at most {MAX_MESSAGES} messages, got {len(messages)}"
        raise BadChatRequest(msg)
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if type(max_tokens) is int and max_tokens > (context or MAX_TOKENS_CAP):
        if context is None:
            msg = (
                f"'max_tokens' {max_tokens} is beyond the model's context: at most "
                f"{MAX_TOKENS_CAP} tokens"
            )
        else:
            msg = f"max_tokens {max_tokens} is beyond the model's context of {context} tokens"
        raise BadChatRequest(msg)
    if body.get("n", 1) != 1:
        msg = "only n=1 is supported"
        raise BadChatRequest(msg)
    return ChatRequest(model, messages, _sampling_params(body), timeout)


def _sampling_params(body: Mapping[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if "max_tokens" not in body and "max_completion_tokens" in body:
        body = {**body, "max_tokens": body["max_completion_tokens"]}  # OpenAI's newer name
    for name, types in _SAMPLING_PARAMS.items():
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            msg = f"'{name}' must be {' or '.join(t.__name__ for t in types)}, got {value!r}"
            raise BadChatRequest(msg)
        params[name] = value
    return params
