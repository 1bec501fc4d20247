"""Providers' batch APIs behind the engine seam (``batch_api=True``): OpenAI's files and
batches (OpenAI, and any server with those endpoints) and Anthropic's Message Batches.

``batch_engine`` makes the ``BatchEngine`` for a model; ``batch_api_of`` says which batch
API a model or server has, and refuses one without any.
"""

from __future__ import annotations

from nbllm.engines.base import Engine
from nbllm.engines.batch.anthropic_batches import AnthropicBatches
from nbllm.engines.batch.engine import BatchEngine, BatchUpdate
from nbllm.engines.batch.http import BatchClient
from nbllm.engines.batch.lines import BatchInfo, BatchJournal, BatchLine, BatchRecord
from nbllm.engines.batch.openai_batches import OpenAIBatches
from nbllm.engines.batch.prices import prices_of
from nbllm.errors import ConfigError

__all__ = [
    "BatchEngine",
    "BatchInfo",
    "BatchJournal",
    "BatchLine",
    "BatchRecord",
    "BatchUpdate",
    "batch_api_of",
    "batch_engine",
]

#: Provider prefixes (litellm's) with a batch API nbllm drives, and which.
BATCH_APIS = {"openai": "openai", "anthropic": "anthropic"}


def batch_api_of(model: str, api_base: str | None) -> str:
    """ "openai" or "anthropic": the batch API that serves ``model`` (at ``api_base``).

    A server at ``api_base`` is taken to speak OpenAI's (``/v1/files``, ``/v1/batches``),
    unless the model is Anthropic's. A provider without a batch API is a ``ConfigError``.
    """
    prefix, sep, _ = model.partition("/")
    if sep and prefix in BATCH_APIS:
        return BATCH_APIS[prefix]
    if api_base is not None:
        return "openai"
    if not sep:  # a bare model name goes to OpenAI, as litellm sends it
        return "openai"
    msg = (
        f"batch_api=True: {prefix} has no batch API that nbllm can use (model={model!r}); "
        "it works with openai/... and anthropic/... models and with an OpenAI-compatible "
        "api_base= that serves /v1/files and /v1/batches. Drop batch_api=True to send live "
        "requests"
    )
    raise ConfigError(msg)


def batch_engine(
    model: str,
    api_base: str | None,
    api_key: str | None,
    *,
    live: Engine | None,
    fallback: str = "batch",
    max_batches: int = 4,
    max_requests: int | None = None,
    poll_s: float = 30.0,
) -> BatchEngine:
    """The engine that sends ``model``'s requests through its provider's batch API;
    ``live`` answers what a batch did not when ``fallback`` is "live"."""
    client: BatchClient
    if batch_api_of(model, api_base) == "anthropic":
        client = AnthropicBatches(api_base, api_key)
    else:
        client = OpenAIBatches(api_base, api_key)
    # A provider's model has a price (a bare name goes to OpenAI, as litellm sends it); a
    # server's own name at api_base ("my-model") is looked up only with a provider prefix.
    prices = prices_of(model) if api_base is None or "/" in model else None
    return BatchEngine(
        client, live=live, fallback=fallback, max_batches=max_batches,
        max_requests=max_requests, poll_s=poll_s, prices=prices,
    )  # fmt: skip
