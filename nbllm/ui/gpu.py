"""GPU gauges' source: samples NVIDIA devices through NVML (``nvidia-ml-py``) in a thread.

Without an NVIDIA driver nothing here fails: ``available()`` says False in milliseconds
and the monitor never starts. Each sensor may be missing on a device (no power reading on
some boards, no temperature in some VMs): that reading is ``None``, the rest still flow.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

__all__ = ["GpuMonitor", "GpuSample"]

_MIB = 1024 * 1024
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One reading of one device; ``t`` in Unix seconds, as executor events."""

    index: int
    name: str
    t: float
    utilization_pct: float | None = None
    memory_used_mib: float | None = None
    memory_total_mib: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None


def _load_nvml() -> ModuleType | None:
    """``pynvml``, initialised; ``None`` when the module, the driver or a device is missing."""
    try:
        with warnings.catch_warnings():
            # An old third-party "pynvml" wrapper warns on import; that says nothing about a GPU.
            warnings.simplefilter("ignore")
            import pynvml
        pynvml.nvmlInit()
    except Exception:
        return None
    return pynvml


def _reading(read: Callable[[], _T]) -> _T | None:
    try:
        return read()
    except Exception:
        return None


class GpuMonitor:
    """Samples every device each ``interval_s`` in a daemon thread named "nbllm-gpu".

    ``latest()`` is the newest sample per device; ``history()`` the samples per device
    since ``start()``, the last ``max_samples`` of each. ``stop()`` joins the thread and
    may be called any number of times; a stopped monitor can be started again.
    """

    def __init__(self, interval_s: float = 1.0, *, max_samples: int = 3600) -> None:
        if interval_s <= 0:
            msg = f"interval_s must be positive, got {interval_s!r}"
            raise ValueError(msg)
        self.interval_s = interval_s
        self.max_samples = max_samples
        self._available: bool | None = None
        self._nvml: Any = None
        self._handles: list[Any] = []
        self._names: list[str] = []
        self._lock = threading.Lock()
        self._history: list[deque[GpuSample]] = []
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def available(self) -> bool:
        """Whether NVML works here and sees at least one device (found once, then remembered)."""
        if self._available is None:
            nvml = _load_nvml()
            count = 0
            if nvml is not None:
                count = _reading(nvml.nvmlDeviceGetCount) or 0
                _reading(nvml.nvmlShutdown)
            self._available = count > 0
        return self._available

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> bool:
        """Take a first sample now and keep sampling in the background; False without a GPU."""
        if self._thread is not None:
            return True
        if not self.available():
            return False
        nvml = _load_nvml()
        if nvml is None:
            return False
        handles = []
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handles.append(nvml.nvmlDeviceGetHandleByIndex(index))
        except Exception:
            _reading(nvml.nvmlShutdown)
            return False
        self._nvml, self._handles = nvml, handles
        self._names = [self._name(index, handle) for index, handle in enumerate(handles)]
        with self._lock:
            self._history = [deque(maxlen=self.max_samples) for _ in handles]
        self._sample()
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(self._stopping,), name="nbllm-gpu", daemon=True
        )
        self._thread.start()
        return True

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        self._stopping.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        if self._nvml is not None:
            _reading(self._nvml.nvmlShutdown)
            self._nvml = None

    def latest(self) -> list[GpuSample]:
        with self._lock:
            return [samples[-1] for samples in self._history if samples]

    def history(self) -> list[list[GpuSample]]:
        with self._lock:
            return [list(samples) for samples in self._history]

    def _run(self, stopping: threading.Event) -> None:
        while not stopping.wait(self.interval_s):
            self._sample()

    def _name(self, index: int, handle: Any) -> str:
        name = _reading(lambda: self._nvml.nvmlDeviceGetName(handle))
        if isinstance(name, bytes):  # older NVML bindings return bytes
            name = name.decode(errors="replace")
        return str(name) if name else f"GPU {index}"

    def _sample(self) -> None:
        now = time.time()
        samples = [self._read(index, handle, now) for index, handle in enumerate(self._handles)]
        with self._lock:
            for history, sample in zip(self._history, samples, strict=True):
                history.append(sample)

    def _read(self, index: int, handle: Any, now: float) -> GpuSample:
        nvml = self._nvml
        used = total = None
        memory = _reading(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        if memory is not None:
            used = _reading(lambda: memory.used / _MIB)
            total = _reading(lambda: memory.total / _MIB)
        return GpuSample(
            index=index,
            name=self._names[index],
            t=now,
            utilization_pct=_reading(lambda: float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)),
            memory_used_mib=used,
            memory_total_mib=total,
            temperature_c=_reading(
                lambda: float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
            ),
            power_w=_reading(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000),
        )
