"""GPU gauges' source: samples NVIDIA devices through NVML (``nvidia-ml-py``) in a thread.

Without an NVIDIA driver nothing here fails: ``available()`` says False in milliseconds
and the monitor never starts. Each sensor may be missing on a device (no power reading on
some boards, no temperature in some VMs): that reading is ``None``, the rest still flow.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from nbllm.engines.hardware import NvmlDevice, NvmlDevices, nvml_reading, open_nvml
from nbllm.errors import ConfigError

__all__ = ["GpuMonitor", "GpuSample"]

_MIB = 1024 * 1024


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

    def describe(self) -> str:
        """``"GPU 0 H100 · 87 % · 61,000 / 81,559 MiB · 64 °C · 310 W"``; ``-`` where a
        sensor gave nothing."""

        def number(value: float | None, unit: str) -> str:
            return "-" if value is None else f"{value:,.0f} {unit}"

        memory = "-"
        if self.memory_used_mib is not None and self.memory_total_mib is not None:
            memory = f"{self.memory_used_mib:,.0f} / {self.memory_total_mib:,.0f} MiB"
        return " · ".join(
            [
                f"GPU {self.index} {self.name}",
                number(self.utilization_pct, "%"),
                memory,
                number(self.temperature_c, "°C"),
                number(self.power_w, "W"),
            ]
        )


class GpuMonitor:
    """Samples every device each ``interval_s`` in a daemon thread named "nbllm-gpu".

    ``latest()`` is the newest sample per device; ``history()`` the samples per device
    since ``start()``, the last ``max_samples`` of each. ``stop()`` joins the thread and
    may be called any number of times; a stopped monitor can be started again.
    """

    def __init__(self, interval_s: float = 1.0, *, max_samples: int = 3600) -> None:
        if not interval_s > 0:
            msg = f"interval_s= expected seconds between GPU samples > 0, got {interval_s!r}"
            raise ConfigError(msg)
        if max_samples < 1:
            msg = f"max_samples= expected a whole number >= 1, got {max_samples!r}"
            raise ConfigError(msg)
        self.interval_s = interval_s
        self.max_samples = max_samples
        self._available: bool | None = None
        self._devices: NvmlDevices | None = None
        self._lock = threading.Lock()
        self._history: list[deque[GpuSample]] = []
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def available(self) -> bool:
        """Whether NVML works here and sees at least one device (found once, then remembered)."""
        if self._available is None:
            devices = open_nvml()
            if devices is not None:
                devices.close()
            self._available = devices is not None
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
        devices = open_nvml()
        if devices is None:
            return False
        self._devices = devices
        with self._lock:
            self._history = [deque(maxlen=self.max_samples) for _ in devices]
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
        if self._devices is not None:
            self._devices.close()
            self._devices = None

    def latest(self) -> list[GpuSample]:
        with self._lock:
            return [samples[-1] for samples in self._history if samples]

    def history(self) -> list[list[GpuSample]]:
        with self._lock:
            return [list(samples) for samples in self._history]

    def _run(self, stopping: threading.Event) -> None:
        while not stopping.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        devices = self._devices
        if devices is None:
            return
        now = time.time()
        samples = [self._read(devices.nvml, device, now) for device in devices]
        with self._lock:
            for history, sample in zip(self._history, samples, strict=True):
                history.append(sample)

    @staticmethod
    def _read(nvml: Any, device: NvmlDevice, now: float) -> GpuSample:
        handle = device.handle
        used = total = None
        memory = nvml_reading(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        if memory is not None:
            used = nvml_reading(lambda: memory.used / _MIB)
            total = nvml_reading(lambda: memory.total / _MIB)
        return GpuSample(
            index=device.index,
            name=device.name,
            t=now,
            utilization_pct=nvml_reading(
                lambda: float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            ),
            memory_used_mib=used,
            memory_total_mib=total,
            temperature_c=nvml_reading(
                lambda: float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
            ),
            power_w=nvml_reading(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000),
        )
