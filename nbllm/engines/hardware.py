"""What this machine has for local models: CPU cores, memory, CUDA / ROCm GPUs, Apple MPS.

``hardware()`` reads it once per process (GPUs through ``pynvml`` from the
``nvidia-ml-py`` package, falling back to torch when that is installed) and the local
engines take their default batch size from it. ``open_nvml()`` is the one place NVML is
opened: the GPU gauges (``nbllm.ui.gpu``) sample the devices it lists.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType, TracebackType
from typing import Any, TypeVar

__all__ = [
    "GpuInfo",
    "Hardware",
    "NvmlDevice",
    "NvmlDevices",
    "hardware",
    "nvml_reading",
    "open_nvml",
]

_T = TypeVar("_T")


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


def nvml_reading(read: Callable[[], _T]) -> _T | None:
    """``read()``, or None where NVML cannot say (a sensor this board or VM lacks)."""
    try:
        return read()
    except Exception:
        return None


@dataclass(frozen=True, slots=True)
class NvmlDevice:
    """One NVIDIA device as NVML lists it; ``handle`` is what ``pynvml`` reads it through."""

    index: int
    handle: Any
    name: str
    memory_total: int | None  # bytes; None where NVML cannot say


class NvmlDevices:
    """NVML, opened once, and the devices it lists; ``close()`` (or ``with``) shuts it down.

    ``nvml`` is the initialised ``pynvml`` module, for reading the devices' sensors.
    """

    def __init__(self, nvml: ModuleType, devices: tuple[NvmlDevice, ...]) -> None:
        self.nvml = nvml
        self.devices = devices
        self._open = True

    def __iter__(self) -> Iterator[NvmlDevice]:
        return iter(self.devices)

    def __len__(self) -> int:
        return len(self.devices)

    def close(self) -> None:
        """Shut NVML down (each ``open_nvml()`` has one); idempotent."""
        if self._open:
            self._open = False
            nvml_reading(self.nvml.nvmlShutdown)

    def __enter__(self) -> NvmlDevices:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _import_pynvml() -> ModuleType | None:
    try:
        with warnings.catch_warnings():
            # An old third-party "pynvml" wrapper warns on import; that says nothing about a GPU.
            warnings.simplefilter("ignore")
            import pynvml
    except Exception:
        return None
    return pynvml


def _nvml_device(nvml: ModuleType, index: int) -> NvmlDevice:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    name = nvml_reading(lambda: nvml.nvmlDeviceGetName(handle))
    if isinstance(name, bytes):  # older NVML bindings return bytes
        name = name.decode(errors="replace")
    memory = nvml_reading(lambda: int(nvml.nvmlDeviceGetMemoryInfo(handle).total))
    return NvmlDevice(index, handle, str(name) if name else f"GPU {index}", memory)


def open_nvml() -> NvmlDevices | None:
    """NVML and its devices, or None (in about a millisecond) where there is no GPU.

    None where ``pynvml``, the driver or every device is missing, or NVML cannot list them;
    NVML is then already shut down again.
    """
    nvml = _import_pynvml()
    if nvml is None:
        return None
    try:
        nvml.nvmlInit()
    except Exception:
        return None
    try:
        devices = tuple(_nvml_device(nvml, index) for index in range(nvml.nvmlDeviceGetCount()))
    except Exception:
        devices = ()
    if not devices:
        nvml_reading(nvml.nvmlShutdown)
        return None
    return NvmlDevices(nvml, devices)


def _nvml_gpus() -> list[GpuInfo]:
    """CUDA GPUs through NVML; none where there is no driver."""
    devices = open_nvml()
    if devices is None:
        return []
    with devices:
        return [
            GpuInfo(
                device.index,
                device.name,
                "cuda",
                device.memory_total,
                _compute_capability(devices.nvml, device.handle),
            )
            for device in devices
        ]


def _compute_capability(nvml: ModuleType, handle: Any) -> str | None:
    capability = nvml_reading(lambda: nvml.nvmlDeviceGetCudaComputeCapability(handle))
    return None if capability is None else f"{capability[0]}.{capability[1]}"


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
