"""GpuMonitor and the dashboard's GPU gauges, against a fake NVML (this machine has no GPU)."""

from __future__ import annotations

import sys
import threading
import time
import types

import pytest

from nbllm.engines.hardware import hardware
from nbllm.errors import ConfigError
from nbllm.executor.events import RunFinished, RunStarted
from nbllm.ui.dashboard import Dashboard
from nbllm.ui.gpu import GpuMonitor

MIB = 1024 * 1024


class NVMLError(Exception):
    pass


def fake_nvml(
    devices: int = 2, *, broken: frozenset[str] = frozenset(), init_fails: bool = False
) -> types.ModuleType:
    """A stand-in for ``pynvml``: device i is at 10*(i+1) % and 1000*(i+1) of 8000 MiB.

    ``broken`` names the calls that raise; ``calls`` counts utilisation reads, and
    ``sampled`` is set once there have been three per device.
    """
    nvml = types.ModuleType("pynvml")
    nvml.NVML_TEMPERATURE_GPU = 0
    nvml.calls = 0
    nvml.sampled = threading.Event()
    nvml.inits = 0
    nvml.shutdowns = 0

    def call(name, fn):
        def wrapper(*args):
            if name in broken:
                raise NVMLError(f"{name}: not supported")
            return fn(*args)

        setattr(nvml, name, wrapper)

    def init():
        if init_fails:
            raise NVMLError("NVML Shared Library Not Found")
        nvml.inits += 1

    def shutdown():
        nvml.shutdowns += 1

    def utilization(handle):
        nvml.calls += 1
        if nvml.calls >= 3 * devices:
            nvml.sampled.set()
        return types.SimpleNamespace(gpu=10 * (handle + 1), memory=5)

    call("nvmlInit", init)
    call("nvmlShutdown", shutdown)
    call("nvmlDeviceGetCount", lambda: devices)
    call("nvmlDeviceGetHandleByIndex", lambda i: i)
    call("nvmlDeviceGetName", lambda h: f"Fake H{h}00".encode() if h else f"Fake H{h}00")
    call("nvmlDeviceGetUtilizationRates", utilization)
    call(
        "nvmlDeviceGetMemoryInfo",
        lambda h: types.SimpleNamespace(used=1000 * (h + 1) * MIB, total=8000 * MIB, free=0),
    )
    call("nvmlDeviceGetTemperature", lambda h, sensor: 60 + h)
    call("nvmlDeviceGetPowerUsage", lambda h: 250_000 + 1000 * h)
    call("nvmlDeviceGetCudaComputeCapability", lambda h: (9, 0))
    return nvml


def gpu_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "nbllm-gpu"]


@pytest.mark.parametrize(
    ("fake", "expected"), [(fake_nvml(devices=1), True), (fake_nvml(init_fails=True), False)]
)
def test_whether_there_is_a_gpu_is_found_quickly(monkeypatch, fake, expected):
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    t0 = time.perf_counter()
    found = GpuMonitor().available()
    assert time.perf_counter() - t0 < 1.0
    assert found is expected
    assert fake.shutdowns == fake.inits


def test_hardware_lists_the_devices_nvml_lists(monkeypatch):
    fake = fake_nvml(devices=2)
    try:
        with monkeypatch.context() as patch:
            patch.setitem(sys.modules, "pynvml", fake)
            machine = hardware(refresh=True)
    finally:
        hardware(refresh=True)  # later tests see this machine again
    assert [(g.index, g.name, g.kind, g.memory_total) for g in machine.gpus] == [
        (0, "Fake H000", "cuda", 8000 * MIB),
        (1, "Fake H100", "cuda", 8000 * MIB),
    ]
    assert machine.has_cuda and machine.gpus[0].compute_capability == "9.0"
    assert "GPU 1 (cuda): Fake H100, 7.8 GiB, compute 9.0" in str(machine)
    assert fake.shutdowns == fake.inits == 1


@pytest.mark.parametrize("fake", [None, fake_nvml(init_fails=True), fake_nvml(devices=0)])
def test_without_nvml_or_a_device_there_is_no_gpu(monkeypatch, fake):
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monitor = GpuMonitor()
    t0 = time.perf_counter()
    assert monitor.available() is False
    assert time.perf_counter() - t0 < 0.1
    assert monitor.start() is False
    assert monitor.latest() == []
    assert not gpu_threads()
    monitor.stop()


def test_without_a_gpu_the_dashboard_has_no_gpu_row(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(init_fails=True))
    for gpu in (None, True):
        dash = Dashboard(gpu=gpu)
        assert not dash.gpu_found and dash.gpu_box.children == ()
        dash(RunStarted(1, 1, "m", "fake", 0.0))
        assert dash.gpu_gauges == [] and not gpu_threads()
        dash(RunFinished(0, 1, 0.1, False, 0.1))
        assert dash.gpu_box.children == ()
        assert "GPU" not in dash.html()


def test_monitor_samples_every_device(monkeypatch):
    fake = fake_nvml(devices=2)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monitor = GpuMonitor(interval_s=0.001)
    assert monitor.available()
    assert monitor.start()
    try:
        first = monitor.latest()  # taken by start() itself, before the thread's first tick
        assert [s.index for s in first] == [0, 1]
        assert [t.daemon for t in gpu_threads()] == [True]
        assert fake.sampled.wait(timeout=5)
    finally:
        monitor.stop()
    assert not gpu_threads()
    a, b = monitor.latest()
    assert (a.name, b.name) == ("Fake H000", "Fake H100")  # bytes names are decoded
    assert (a.utilization_pct, b.utilization_pct) == (10.0, 20.0)
    assert (a.memory_used_mib, a.memory_total_mib) == (1000.0, 8000.0)
    assert b.memory_used_mib == 2000.0
    assert (a.temperature_c, b.temperature_c) == (60.0, 61.0)
    assert (a.power_w, b.power_w) == (250.0, 251.0)
    history = monitor.history()
    assert len(history) == 2 and len(history[0]) >= 3
    assert all(x.t <= y.t for x, y in zip(history[0], history[0][1:], strict=False))
    assert fake.shutdowns == fake.inits  # every nvmlInit has its nvmlShutdown


def test_history_is_bounded(monkeypatch):
    fake = fake_nvml(devices=1)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monitor = GpuMonitor(interval_s=0.001, max_samples=2)
    monitor.start()
    try:
        assert fake.sampled.wait(timeout=5)
    finally:
        monitor.stop()
    assert [len(samples) for samples in monitor.history()] == [2]


def test_a_failing_sensor_reads_none(monkeypatch):
    broken = frozenset(
        {"nvmlDeviceGetPowerUsage", "nvmlDeviceGetTemperature", "nvmlDeviceGetMemoryInfo"}
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(devices=1, broken=broken))
    monitor = GpuMonitor()
    assert monitor.start()
    monitor.stop()
    (sample,) = monitor.latest()
    assert sample.utilization_pct == 10.0
    assert sample.power_w is None and sample.temperature_c is None
    assert sample.memory_used_mib is None and sample.memory_total_mib is None


def test_a_device_without_a_name_is_named_by_its_index(monkeypatch):
    fake = fake_nvml(devices=1, broken=frozenset({"nvmlDeviceGetName"}))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monitor = GpuMonitor()
    monitor.start()
    monitor.stop()
    assert monitor.latest()[0].name == "GPU 0"


def test_stop_is_idempotent_and_the_monitor_restarts(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(devices=1))
    monitor = GpuMonitor(interval_s=10.0)  # stop() must not wait for the next tick
    monitor.stop()
    t0 = time.perf_counter()
    assert monitor.start()
    assert monitor.start()  # already running: still one thread
    assert len(gpu_threads()) == 1
    monitor.stop()
    monitor.stop()
    assert time.perf_counter() - t0 < 2.0
    assert not gpu_threads() and not monitor.running
    assert monitor.start()
    assert monitor.running
    monitor.stop()
    assert not gpu_threads()


def test_bad_interval_is_refused():
    with pytest.raises(ConfigError, match=r"^interval_s= expected .* got 0$"):
        GpuMonitor(interval_s=0)
    with pytest.raises(ConfigError, match=r"^max_samples= expected .* got 0$"):
        GpuMonitor(max_samples=0)


def test_dashboard_gauges_follow_the_monitor(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(devices=2))
    dash = Dashboard(gpu=None)
    assert dash.gpu_found
    dash(RunStarted(1, 1, "m", "fake", 0.0))
    try:
        assert len(gpu_threads()) == 1
        assert len(dash.gpu_gauges) == 2
        first, second = dash.gpu_gauges
        assert [g.row for g in dash.gpu_gauges] == list(dash.gpu_box.children)
        assert (first.utilization.value, first.utilization.max) == (10.0, 100.0)
        assert (first.memory.value, first.memory.max) == (1000.0, 8000.0)
        assert (second.utilization.value, second.memory.value) == (20.0, 2000.0)
        assert first.label.value == "GPU 0 Fake H000 · 10 % · 1,000 / 8,000 MiB · 60 °C · 250 W"
    finally:
        dash(RunFinished(1, 0, 0.1, False, 0.1))
    assert not gpu_threads()
    assert len(dash.gpu_gauges) == 2  # the last readings stay on show
    assert "GPU 1 Fake H100 · 20 %" in dash.html()  # and in the static HTML


def test_dashboard_gauges_with_missing_sensors(monkeypatch):
    broken = frozenset({"nvmlDeviceGetPowerUsage", "nvmlDeviceGetMemoryInfo"})
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(devices=1, broken=broken))
    dash = Dashboard()
    dash(RunStarted(1, 1, "m", "fake", 0.0))
    dash(RunFinished(1, 0, 0.1, False, 0.1))
    (gauges,) = dash.gpu_gauges
    assert gauges.memory.value == 0.0
    assert gauges.label.value == "GPU 0 Fake H000 · 10 % · - · 60 °C · -"


def test_close_stops_the_monitor(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(devices=1))
    dash = Dashboard()
    dash(RunStarted(1, 1, "m", "fake", 0.0))
    assert gpu_threads()
    dash.close()
    dash.close()
    assert not gpu_threads()


def test_gpu_false_never_starts_a_monitor(monkeypatch):
    fake = fake_nvml(devices=1)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    dash = Dashboard(gpu=False)
    dash(RunStarted(1, 1, "m", "fake", 0.0))
    assert dash.gpu_monitor is None and not gpu_threads()
    assert fake.inits == 0
    dash(RunFinished(1, 0, 0.1, False, 0.1))
