"""Local engines: models that run on this machine, on its CPU or GPUs, with no API key.

=========  ===================================  =================  ==========================
engine     backend                              extra              batching
=========  ===================================  =================  ==========================
vllm       vLLM's async engine (GPU)            own environment    vLLM's continuous batching
deepspeed  ``deepspeed.init_inference``         ``deepspeed``      the dynamic batcher
onnx       ONNX Runtime, exported once          ``onnx``           continuous (CPU); dynamic
torch      a transformers model                 ``local``          continuous, prefix cache
llamacpp   llama.cpp on a GGUF file (CPU)       ``llamacpp``       one request at a time
=========  ===================================  =================  ==========================

``engine="auto"`` tries, in order, vllm → deepspeed → onnx → torch on a GPU, and the
fastest CPU engine first without one (``CPU_ORDER``); an engine that is not usable or
fails to load is skipped: a load failure is a warning on the ``nbllm`` logger, an engine
that is not installed only an info line.
``available()`` tells, as a DataFrame, which engines are installed and usable here, from
what is installed (nothing is imported, so probing prints nothing).

Every local engine applies a request's ``timeout`` to its wait for the model only, never to a
generation under way, says why each answer ended (``finish_reason``), and reports the tokens
it has generated as the "generating" phase (``nbllm.engines.local.base``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbllm.engines.hardware import hardware
from nbllm.engines.local.base import LocalEngine
from nbllm.engines.local.models import EMBEDDED_MODEL, is_local_model
from nbllm.engines.local.phases import PhaseCallback
from nbllm.errors import ConfigError, EngineUnavailable

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "CPU_ORDER",
    "GPU_ORDER",
    "LOCAL_ENGINE_NAMES",
    "EngineStatus",
    "LocalEngine",
    "available",
    "create_local_engine",
    "engine_status",
    "is_local_model",
]

_log = logging.getLogger("nbllm")

LOCAL_ENGINE_NAMES = ("vllm", "deepspeed", "onnx", "torch", "llamacpp")
GPU_ORDER = ("vllm", "deepspeed", "onnx", "torch")
#: Without a GPU: measured fastest first (benchmarks/local_engines.py).
CPU_ORDER = ("llamacpp", "onnx", "torch", "deepspeed")

# What each engine imports: (module, distribution for the version, extra that installs it).
_NEEDS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "vllm": (("vllm", "vllm", "vllm"),),
    "deepspeed": (
        ("deepspeed", "deepspeed", "deepspeed"),
        ("torch", "torch", "local"),
        ("transformers", "transformers", "local"),
    ),
    "onnx": (
        ("onnxruntime", "onnxruntime", "onnx"),
        ("torch", "torch", "local"),
        ("transformers", "transformers", "local"),
    ),
    "torch": (("torch", "torch", "local"), ("transformers", "transformers", "local")),
    "llamacpp": (("llama_cpp", "llama-cpp-python", "llamacpp"),),
}


@dataclass(frozen=True, slots=True)
class EngineStatus:
    """Whether one local engine can run here, and why not when it cannot."""

    engine: str
    installed: bool
    usable: bool
    device: str | None
    version: str | None
    reason: str | None = None


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _onnx_device(on_gpu: bool) -> str:
    if not on_gpu:
        return "cpu"
    import onnxruntime

    # onnxruntime-gpu lists CUDA even where its libraries cannot load; the engine checks
    # the providers its session really got when it loads.
    return "cuda" if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else "cpu"


def engine_status(name: str) -> EngineStatus:
    """Installed / usable / device / version of local engine ``name``, without loading a model."""
    if name not in _NEEDS:
        msg = f"unknown local engine {name!r}; expected one of {', '.join(LOCAL_ENGINE_NAMES)}"
        raise ConfigError(msg)
    needs = _NEEDS[name]
    version = _version(needs[0][1])
    missing = [(m, extra) for m, _, extra in needs if importlib.util.find_spec(m) is None]
    installed = importlib.util.find_spec(needs[0][0]) is not None
    if missing:
        what = ", ".join(m for m, _ in missing)
        extras = ",".join(sorted({extra for _, extra in missing}))
        how = (
            "its own environment (pip install vllm)"
            if name == "vllm"
            else (f"pip install 'nbllm[{extras}]'")
        )
        return EngineStatus(name, installed, False, None, version, f"{what} not installed: {how}")
    machine = hardware()
    if name == "vllm":
        if not machine.has_cuda:
            return EngineStatus(name, True, False, None, version, "needs a CUDA or ROCm GPU")
        return EngineStatus(name, True, True, "cuda", version)
    if name == "onnx":
        device = _onnx_device(machine.has_cuda)
    elif name == "llamacpp":
        device = "cpu"
    else:
        device = machine.device
    return EngineStatus(name, True, True, device, version)


def available() -> pd.DataFrame:
    """The local engines as a DataFrame: engine, installed, usable, device, version, reason."""
    import pandas as pd

    rows = [engine_status(name) for name in LOCAL_ENGINE_NAMES]
    return pd.DataFrame(
        [
            {
                "engine": s.engine,
                "installed": s.installed,
                "usable": s.usable,
                "device": s.device,
                "version": s.version,
                "reason": s.reason,
            }
            for s in rows
        ]
    )


def engine_class(name: str) -> type[LocalEngine]:
    """The class of local engine ``name`` (imports only that engine's module)."""
    if name == "torch":
        from nbllm.engines.local.torch import TorchEngine

        return TorchEngine
    if name == "deepspeed":
        from nbllm.engines.local.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine
    if name == "onnx":
        from nbllm.engines.local.onnx import OnnxEngine

        return OnnxEngine
    if name == "vllm":
        from nbllm.engines.local.vllm import VllmEngine

        return VllmEngine
    if name == "llamacpp":
        from nbllm.engines.local.llamacpp import LlamaCppEngine

        return LlamaCppEngine
    msg = f"unknown local engine {name!r}; expected one of {', '.join(LOCAL_ENGINE_NAMES)}"
    raise ConfigError(msg)


def create_local_engine(
    name: str,
    model: str | Path | None = None,
    *,
    on_skip: Callable[[str, str], None] | None = None,
    on_phase: PhaseCallback | None = None,
    **options: Any,
) -> LocalEngine:
    """Load local engine ``name`` ("auto" or one of ``LOCAL_ENGINE_NAMES``) for ``model``.

    A named engine that cannot run raises ``EngineUnavailable`` with the reason;
    "auto" falls through to the next engine and calls ``on_skip(engine, reason)`` for
    each one skipped. ``on_phase(phase, done, total, detail)`` hears the model being
    converted, exported and loaded (``nbllm.engines.local.phases``). ``options`` go to the
    engine (``batch_size``, ``batch_wait_s``, ``device``).
    """
    if name != "auto":
        status = engine_status(name)
        if not status.usable:
            msg = f"engine {name!r} is not usable here: {status.reason}"
            raise EngineUnavailable(msg)
        return engine_class(name)(model, on_phase=on_phase, **options)
    order = GPU_ORDER if hardware().has_cuda else CPU_ORDER
    reasons: list[str] = []
    for candidate in order:
        status = engine_status(candidate)
        reason = status.reason
        if status.usable:
            try:
                engine = engine_class(candidate)(model, on_phase=on_phase, **options)
            except EngineUnavailable as exc:
                reason = str(exc)
                _log.warning(
                    "nbllm: engine %s could not load, trying the next: %s", candidate, reason
                )
            else:
                _log.info("nbllm: auto chose %s", engine.describe())
                return engine
        else:
            # Not installed or not for this machine: expected, so only a quiet note.
            _log.info("nbllm: engine %s skipped: %s", candidate, reason)
        reason = reason or "not usable"
        reasons.append(f"{candidate}: {reason}")
        if on_skip is not None:
            on_skip(candidate, reason)
    what = EMBEDDED_MODEL if model is None else str(model)
    msg = (
        f"no local engine can run {what} here (pip install 'nbllm[local]' gives the torch "
        f"engine): " + "; ".join(reasons)
    )
    raise EngineUnavailable(msg)
