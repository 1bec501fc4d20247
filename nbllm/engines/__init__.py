"""Engines: where requests are answered. One class per backend behind ``Engine.complete``.

``create_engine`` turns the user's ``engine=`` / ``model=`` / ``api_base=`` into one:

- an ``Engine`` instance is used as given;
- ``"openai"``: the lean aiohttp client, needs ``api_base``;
- ``"litellm"``: litellm, for any provider it knows;
- ``"vllm"``, ``"deepspeed"``, ``"onnx"``, ``"torch"``: that local engine on ``model``
  (a model directory, a GGUF file, or None for the embedded SmolLM2-135M-Instruct);
  ``EngineUnavailable`` with the reason when it cannot run here (``available()``);
- ``"auto"`` (default): with ``api_base``, ``openai`` when the model carries no
  provider prefix other than ``openai/`` (a prefix litellm does not know, as in
  ``meta-llama/Llama-3.1-8B`` served by vLLM, is a model name, not a provider), else
  ``litellm``; without ``api_base``, the best local engine when ``model`` is local
  (see ``nbllm.engines.local``), else ``litellm``.

``check_engine`` refuses a name that is none of these (with the closest one);
``check_credentials`` refuses a provider's model whose API key litellm finds nowhere.

``worker=True`` runs a local engine in an ``nbllm serve`` child process instead of in
this one (``nbllm.engines.worker``); it is the default on a CUDA GPU.

``on_phase(phase, done, total, detail)`` hears a local model being prepared before it
answers: "converting" (a GGUF file, once), "exporting" (to ONNX, once), "loading"
(``nbllm.engines.local.phases``). A worker reports "loading" when it starts and once its
model has loaded.
"""

from __future__ import annotations

import contextlib
from typing import Any

from nbllm.dataset import did_you_mean
from nbllm.engines.base import Engine, EngineState
from nbllm.engines.fake import FakeEngine
from nbllm.engines.hardware import GpuInfo, Hardware, hardware
from nbllm.engines.litellm import LiteLLMEngine, import_litellm, missing_credentials
from nbllm.engines.local import (
    LOCAL_ENGINE_NAMES,
    available,
    create_local_engine,
    is_local_model,
)
from nbllm.engines.local.models import (
    EMBEDDED_MODEL,
    conversion_time_text,
    is_converted,
    resolve_local_model,
)
from nbllm.engines.local.phases import PhaseCallback, PhaseReport
from nbllm.engines.openai import OpenAIEngine
from nbllm.errors import ConfigError, EngineUnavailable

__all__ = [
    "EMBEDDED_MODEL",
    "ENGINE_NAMES",
    "LOCAL_ENGINE_NAMES",
    "Engine",
    "EngineState",
    "FakeEngine",
    "GpuInfo",
    "Hardware",
    "LiteLLMEngine",
    "OpenAIEngine",
    "available",
    "check_credentials",
    "check_engine",
    "create_engine",
    "hardware",
    "is_local",
]

ENGINE_NAMES = ("auto", "openai", "litellm", *LOCAL_ENGINE_NAMES)
# What people call an engine by the package or project behind it.
_ENGINE_ALIASES = {
    "pytorch": "torch",
    "transformers": "torch",
    "onnxruntime": "onnx",
    "ort": "onnx",
    "llama.cpp": "llamacpp",
    "llama_cpp": "llamacpp",
    "llama-cpp": "llamacpp",
    "llama-cpp-python": "llamacpp",
}


def check_engine(engine: object) -> None:
    """Refuse a value of ``engine=`` that names no engine, with the closest name.

    Called first by ``create_engine`` and ``nbllm.run``: an unknown engine is the error to
    report, whatever else the options lack.
    """
    if isinstance(engine, Engine) or (isinstance(engine, str) and engine in ENGINE_NAMES):
        return
    hint = ""
    if isinstance(engine, str):
        alias = _ENGINE_ALIASES.get(engine.strip().lower())
        hint = f" (did you mean {alias!r}?)" if alias else did_you_mean(engine, ENGINE_NAMES)
    msg = (
        f"engine= expected one of {', '.join(ENGINE_NAMES)} or an Engine instance, "
        f"got {engine!r}{hint}"
    )
    raise ConfigError(msg)


def check_credentials(
    engine: str | Engine, model: str, api_base: str | None, api_key: str | None
) -> None:
    """Refuse a provider's model whose API key is nowhere, before any request.

    Sent without one, each request would fail (the OpenAI client says "Missing
    credentials", which litellm reports as a server error) and be retried. Only for
    litellm's providers: a server at ``api_base`` or a local model needs no provider key.
    """
    if api_key is not None or api_base is not None or engine not in ("auto", "litellm"):
        return
    if is_local(engine, model, api_base):
        return
    missing = missing_credentials(model)
    if not missing:
        return
    wanted = missing[0] if len(missing) == 1 else " or ".join(missing)
    msg = f"model={model!r} needs {wanted} in the environment (or pass api_key=)"
    raise ConfigError(msg)


def _prefers_openai(model: str) -> bool:
    prefix, sep, _ = model.partition("/")
    if not sep or prefix == "openai":
        return True
    # Only now pay for importing litellm: is the prefix one of its providers?
    return prefix not in set(import_litellm().provider_list)


def is_local(engine: str | Engine, model: str | None, api_base: str | None) -> bool:
    """Whether these options ask for a model on this machine rather than a server."""
    if isinstance(engine, Engine):
        return False
    if engine in LOCAL_ENGINE_NAMES:
        return True
    return engine == "auto" and api_base is None and is_local_model(model)


def _worker_engine(
    engine: str,
    model: str | None,
    max_connections: int,
    on_phase: PhaseCallback | None,
    local_options: dict[str, Any],
) -> Engine:
    """The shared worker's engine; "loading" while it starts (its child reports nothing)."""
    from nbllm.engines.worker import shared_worker

    loading = PhaseReport(on_phase, "loading")
    what = model or EMBEDDED_MODEL
    detail = f"starting a worker process for {what} ({engine})"
    if on_phase is not None and engine != "llamacpp":
        with contextlib.suppress(ConfigError, EngineUnavailable):
            local_model = resolve_local_model(model)
            if not is_converted(local_model):
                about = conversion_time_text(local_model.path)
                detail += f", which converts the model once first ({about})"
    loading(None, detail)
    worker = shared_worker(engine, model, **local_options)
    loading.total = 1
    loading(1, f"loaded: {worker.served_engine or engine} worker with {what}")
    return worker.engine(max_connections=max_connections)


def _replica_engine(
    engine: str,
    model: str | None,
    count: int,
    max_connections: int,
    on_phase: PhaseCallback | None,
    local_options: dict[str, Any],
) -> Engine:
    """``count`` shared workers of the model and the engine that spreads requests on them."""
    from nbllm.engines.replicas import shared_replicas
    from nbllm.engines.worker import local_option_args

    try:
        options = local_option_args(**local_options)
    except TypeError as exc:
        msg = f"a local engine does not take {sorted(local_options)}"
        raise ConfigError(msg) from exc
    loading = PhaseReport(on_phase, "loading")
    what = model or EMBEDDED_MODEL
    loading(None, f"starting {count} worker processes for {what} ({engine})")
    replicas = shared_replicas(engine, model, count, options)
    loading.total = 1
    loading(1, f"loaded: {count} x {replicas.workers[0].served_engine or engine} with {what}")
    return replicas.engine(max_connections=max_connections)


def _ray_engine(
    engine: str,
    model: str | None,
    count: int | str,
    address: str | None,
    oversubscribe: bool,
    on_phase: PhaseCallback | None,
    local_options: dict[str, Any],
) -> Engine:
    """``count`` shared Ray actors of the model and the engine that spreads requests on them."""
    from nbllm.engines.ray_replicas import shared_ray_replicas

    loading = PhaseReport(on_phase, "loading")
    loading(None, f"starting Ray replicas of {model or EMBEDDED_MODEL} ({engine})")
    found = shared_ray_replicas(
        address, engine, model, count, local_options, allow_oversubscribe=oversubscribe
    )
    loading.total = 1
    loading(1, f"loaded: {found.count} Ray replicas")
    return found.engine()


def create_engine(
    engine: str | Engine,
    *,
    model: str | None,
    api_base: str | None = None,
    api_key: str | None = None,
    max_connections: int = 256,
    worker: bool | None = None,
    on_phase: PhaseCallback | None = None,
    **local_options: Any,
) -> Engine:
    """The engine for these options (see the module docstring for the rules).

    ``local_options`` go to a local engine (``batch_size``, ``batch_wait_s``, ``device``,
    ``prefix_cache``, ``prefix_cache_bytes``); ``replicas`` (with ``allow_oversubscribe``)
    starts that many workers of it (``nbllm.engines.replicas``). ``on_phase`` hears its
    preparation (see the module docstring).
    """
    check_engine(engine)
    if isinstance(engine, Engine):
        return engine
    replicas = local_options.pop("replicas", None)
    oversubscribe = bool(local_options.pop("allow_oversubscribe", False))
    cluster = local_options.pop("cluster", None)
    ray_address = local_options.pop("ray_address", None)
    if cluster is not None or ray_address is not None:
        if not is_local(engine, model, api_base):
            msg = "cluster='ray' runs copies of a local model; it cannot be used with a server"
            raise ConfigError(msg)
        count = "auto" if replicas is None else replicas
        return _ray_engine(
            engine, model, count, ray_address, oversubscribe, on_phase, local_options
        )
    if replicas is not None:
        if not is_local(engine, model, api_base):
            msg = "replicas= runs copies of a local model; it cannot be used with a server"
            raise ConfigError(msg)
        if worker is False:
            msg = "replicas= runs each copy in a worker process; it cannot go with worker=False"
            raise ConfigError(msg)
        from nbllm.engines.replicas import resolve_replicas

        count = resolve_replicas(replicas, allow_oversubscribe=oversubscribe)
        return _replica_engine(engine, model, count, max_connections, on_phase, local_options)
    if is_local(engine, model, api_base):
        if worker is None:
            worker = hardware().has_cuda
        if worker:
            return _worker_engine(engine, model, max_connections, on_phase, local_options)
        return create_local_engine(engine, model, on_phase=on_phase, **local_options)
    if worker:
        msg = "worker=True runs a local model; it cannot be used with an API server or provider"
        raise ConfigError(msg)
    if local_options:
        msg = f"{', '.join(sorted(local_options))} only apply to local engines"
        raise ConfigError(msg)
    if model is None:
        msg = (
            "model= is required with api_base= or a provider: a litellm model string such "
            "as 'openai/gpt-4o-mini', or the model name a server at api_base= serves"
        )
        raise ConfigError(msg)
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
    return LiteLLMEngine(api_base=api_base, api_key=api_key)  # "litellm"
