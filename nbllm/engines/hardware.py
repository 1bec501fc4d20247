"""What this machine has for local models: CPU cores, memory, CUDA / ROCm GPUs, Apple MPS.

``hardware()`` reads it once per process (GPUs through ``pynvml`` from the
``nvidia-ml-py`` package, falling back to torch when that is installed) and the local
engines take their default batch size from it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import platform
from dataclasses import dataclass, field

__all__ = ["GpuInfo", "Hardware", "hardware"]


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """One accelerator: ``kind`` is "cuda", "rocm" or "mps"; memory in bytes (None if unknown)."""

    index: int
    name: str
    kind: str
    memory_total: int | None = None
    compute_capability: str | None = None


@dataclass(frozen=True, slots=True)
class Hardware:
    """This machine, as far as local models care."""

    cpu_count: int
    memory_total: int | None
    gpus: tuple[GpuInfo, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def has_cuda(self) -> bool:
        return any(g.kind in ("cuda", "rocm") for g in self.gpus)

    @property
    def device(self) -> str:
        """The torch device local engines use by default: "cuda", "mps" or "cpu"."""
        if self.has_cuda:
            return "cuda"
        if any(g.kind == "mps" for g in self.gpus):
            return "mps"
        return "cpu"

    @property
    def default_batch_size(self) -> int:
        """Requests a local engine generates together: more on a GPU, few on a small CPU."""
        if self.has_cuda:
            return 32
        return 8 if self.cpu_count <= 4 else 16

    def __str__(self) -> str:
        memory = f"{self.memory_total / 2**30:.1f} GiB" if self.memory_total else "? GiB"
        lines = [f"CPU: {self.cpu_count} cores, {memory} memory"]
        for gpu in self.gpus:
            gpu_memory = f"{gpu.memory_total / 2**30:.1f} GiB" if gpu.memory_total else "? GiB"
            cc = f", compute {gpu.compute_capability}" if gpu.compute_capability else ""
            lines.append(f"GPU {gpu.index} ({gpu.kind}): {gpu.name}, {gpu_memory}{cc}")
        if not self.gpus:
            lines.append("GPU: none found")
        lines.extend(self.notes)
        return "\n".join(lines)


def _memory_total() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _nvml_gpus() -> list[GpuInfo]:
    """CUDA GPUs through NVML; none (in about a millisecond) where there is no driver."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:
        return []
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            if isinstance(name, bytes):
                name = name.decode()
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total
            try:
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
                capability: str | None = f"{major}.{minor}"
            except Exception:
                capability = None
            gpus.append(GpuInfo(index, str(name), "cuda", int(memory), capability))
        return gpus
    except Exception:
        return []
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def _torch_gpus() -> list[GpuInfo]:
    """ROCm GPUs and Apple MPS (and CUDA where NVML is missing), through torch if installed."""
    if importlib.util.find_spec("torch") is None:
        return []
    import torch

    gpus = []
    try:
        if torch.cuda.is_available():
            kind = "rocm" if getattr(torch.version, "hip", None) else "cuda"
            for index in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(index)
                gpus.append(
                    GpuInfo(
                        index,
                        props.name,
                        kind,
                        int(props.total_memory),
                        f"{props.major}.{props.minor}",
                    )
                )
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            gpus.append(GpuInfo(0, f"Apple {platform.machine()} GPU", "mps"))
    except Exception:
        return []
    return gpus


@functools.lru_cache(maxsize=1)
def _probe() -> Hardware:
    gpus = _nvml_gpus()
    if not gpus:
        gpus = _torch_gpus()
    return Hardware(_cpu_count(), _memory_total(), tuple(gpus))


def hardware(*, refresh: bool = False) -> Hardware:
    """CPU cores, memory and GPUs of this machine (read once per process; ``refresh`` re-reads)."""
    if refresh:
        _probe.cache_clear()
    return _probe()
