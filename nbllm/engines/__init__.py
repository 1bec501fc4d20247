"""Engines: where requests are answered. One class per backend behind ``Engine.complete``.

``create_engine`` turns the user's ``engine=`` / ``model=`` / ``api_base=`` into one:

- an ``Engine`` instance is used as given;
- ``"openai"``: the lean aiohttp client, needs ``api_base``;
- ``"litellm"``: litellm, for any provider it knows;
- ``"auto"`` (default): ``openai`` when ``api_base`` is given and the model carries no
  provider prefix other than ``openai/`` (a prefix litellm does not know, as in
  ``meta-llama/Llama-3.1-8B`` served by vLLM, is a model name, not a provider);
  otherwise ``litellm``.
"""

from __future__ import annotations

from nbllm.engines.base import Engine, EngineState
from nbllm.engines.fake import FakeEngine
from nbllm.engines.litellm import LiteLLMEngine, import_litellm
from nbllm.engines.openai import OpenAIEngine
from nbllm.errors import ConfigError

__all__ = [
    "ENGINE_NAMES",
    "Engine",
    "EngineState",
    "FakeEngine",
    "LiteLLMEngine",
    "OpenAIEngine",
    "create_engine",
]

ENGINE_NAMES = ("auto", "openai", "litellm")


def _prefers_openai(model: str) -> bool:
    prefix, sep, _ = model.partition("/")
    if not sep or prefix == "openai":
        return True
    # Only now pay for importing litellm: is the prefix one of its providers?
    return prefix not in set(import_litellm().provider_list)


def create_engine(
    engine: str | Engine,
    *,
    model: str,
    api_base: str | None = None,
    api_key: str | None = None,
    max_connections: int = 256,
) -> Engine:
    """The engine for these options (see the module docstring for the rules)."""
    if isinstance(engine, Engine):
        return engine
    if engine == "auto":
        engine = "openai" if api_base and _prefers_openai(model) else "litellm"
    if engine == "openai":
        if not api_base:
            msg = (
                "engine='openai' needs api_base= (the server's URL, e.g. "
                "'http://127.0.0.1:8000/v1'); for OpenAI itself use engine='litellm' "
                "or api_base='https://api.openai.com/v1'"
            )
            raise ConfigError(msg)
        return OpenAIEngine(api_base, api_key=api_key, max_connections=max_connections)
    if engine == "litellm":
        return LiteLLMEngine(api_base=api_base, api_key=api_key)
    msg = f"engine must be one of {', '.join(ENGINE_NAMES)} or an Engine instance, got {engine!r}"
    raise ConfigError(msg)
