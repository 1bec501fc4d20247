"""Prometheus metrics: a run's figures on ``/metrics``, for a Grafana board or an alert.

``metrics_port=`` (``--metrics-port`` on the command line, ``$NBLLM_METRICS_PORT``) serves
``/metrics`` on ``metrics_host`` (127.0.0.1 unless told otherwise) from this process, with
``prometheus-client`` (the extra ``nbllm[metrics]``). Every run of the process that asks
for the same port shares one endpoint; each run's series carry a ``run`` label (``run-1``,
``run-2``, ... in the order they started), and a finished run's series are dropped after
``FINISHED_RUN_GRACE_S`` so that the series stay bounded in a long-lived kernel.

The series follow Prometheus' naming (base units, ``_total`` counters)::

    nbllm_requests_total{run,model,deployment,outcome}   attempts: ok, rate_limited, error,
                                                           cancelled
    nbllm_request_duration_seconds{run,model,deployment}  histogram of attempts that ended
                                                           (not cancelled)
    nbllm_queue_wait_seconds{run}                         histogram of the queue_s of turns sent
    nbllm_tokens_total{run,kind="prompt|completion"}      of rows answered by a request now
    nbllm_cost_usd_total{run}                             of the same rows
    nbllm_requests_in_flight{run}
    nbllm_turns_total{run,status="ok|failed|cached|resumed|skipped"}
    nbllm_retries_total{run,reason}                       reason: the failed attempt's error
    nbllm_rate_limit{run,kind,deployment}                the limit in force: rpm / tpm per
                                                           rate window (a minute), concurrency
    nbllm_circuit_open{run,deployment}                    1 while a breaker is not closed
    nbllm_gpu_utilization_ratio{gpu}, nbllm_gpu_memory_used_bytes{gpu}  read at each scrape

The values are exact, not sampled: after a run, ``nbllm_turns_total`` holds the rows of its
``df`` by status (a row of this run counts once: ``resumed`` and ``cached`` rows by that,
the others ``ok``, ``skipped`` or ``failed``), and ``nbllm_tokens_total`` the tokens of its
``ok`` rows. Turns that never ran (a stop) are not counted.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections.abc import Callable, Hashable, Mapping
from functools import partial
from typing import Any

from nbllm.engines.hardware import nvml_reading, open_nvml
from nbllm.errors import ConfigError
from nbllm.executor.events import (
    AttemptFinished,
    BreakerChanged,
    Event,
    LimitChanged,
    RequestSent,
    RetryScheduled,
    RunFinished,
    RunStarted,
    TurnFinished,
)
from nbllm.types import SKIPPED, TurnRecord

__all__ = ["FINISHED_RUN_GRACE_S", "MetricsExporter", "metrics_listener", "turn_status"]

log = logging.getLogger("nbllm")

#: Seconds a finished run's series stay on ``/metrics`` (a scrape interval or two).
FINISHED_RUN_GRACE_S = 120.0
INSTALL = "pip install 'nbllm[metrics]' (prometheus-client)"

_runs = itertools.count(1)
_exporters: dict[tuple[str, int], MetricsExporter] = {}
_exporters_lock = threading.Lock()


def turn_status(record: TurnRecord) -> str:
    """A row's status as ``nbllm_turns_total`` counts it."""
    if record.resumed:
        return "resumed"
    if record.cached:
        return "cached"
    if record.ok:
        return "ok"
    if record.error is not None and record.error.startswith(SKIPPED):
        return "skipped"
    return "failed"


def metrics_listener(
    port: int | None,
    host: str = "127.0.0.1",
    limits: Mapping[str, float | None] | None = None,
    *,
    grace_s: float | None = None,
) -> Callable[[Event], None] | None:
    """The listener that feeds ``/metrics`` on ``host:port`` for one run (None without a
    port). The endpoint starts with the first run that asks for it; ``ConfigError`` where
    ``prometheus-client`` is missing or the port is taken by something else. ``limits``:
    the run's fixed rpm / tpm, shown as ``nbllm_rate_limit`` until an "auto" one moves."""
    if port is None:
        return None
    exporter = MetricsExporter.serving(host, port)
    grace = FINISHED_RUN_GRACE_S if grace_s is None else grace_s
    return exporter.run_listener(f"run-{next(_runs)}", limits or {}, grace)


class MetricsExporter:
    """The series of every run of this process on one ``host:port`` (see the module)."""

    def __init__(self, host: str, port: int) -> None:
        try:
            import prometheus_client as prom
        except ImportError:
            msg = f"metrics_port= needs prometheus-client, which is not installed: {INSTALL}"
            raise ConfigError(msg) from None
        self.host, self.port = host, port
        self.registry = prom.CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = prom.Counter(
            "nbllm_requests", "Request attempts, by how each ended",
            ["run", "model", "deployment", "outcome"], registry=r,
        )  # fmt: skip
        self.duration = prom.Histogram(
            "nbllm_request_duration_seconds", "Seconds each attempt spent in the engine",
            ["run", "model", "deployment"], registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )  # fmt: skip
        self.queue = prom.Histogram(
            "nbllm_queue_wait_seconds", "Seconds each turn sent waited before its answer "
            "besides its requests (slots, limits, pauses, back-off)", ["run"], registry=r,
            buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300),
        )  # fmt: skip
        self.tokens = prom.Counter(
            "nbllm_tokens", "Tokens of the turns answered by a request", ["run", "kind"],
            registry=r,
        )  # fmt: skip
        self.cost = prom.Counter(
            "nbllm_cost_usd", "US dollars of the turns answered by a request", ["run"], registry=r
        )
        self.in_flight = prom.Gauge(
            "nbllm_requests_in_flight", "Requests sent and not yet ended", ["run"], registry=r
        )
        self.turns = prom.Counter(
            "nbllm_turns", "Turns finished, by status", ["run", "status"], registry=r
        )
        self.retries = prom.Counter(
            "nbllm_retries", "Retries scheduled, by the failed attempt's error",
            ["run", "reason"], registry=r,
        )  # fmt: skip
        self.rate_limit = prom.Gauge(
            "nbllm_rate_limit", "The limit in force (per minute for rpm / tpm)",
            ["run", "kind", "deployment"], registry=r,
        )  # fmt: skip
        self.circuit = prom.Gauge(
            "nbllm_circuit_open", "1 while a deployment's breaker is open or half-open",
            ["run", "deployment"], registry=r,
        )  # fmt: skip
        r.register(_GpuCollector())
        self._lock = threading.Lock()
        self._labels: dict[str, set[tuple[Any, tuple[str, ...]]]] = {}
        try:
            self.server, self.thread = prom.start_http_server(port, addr=host, registry=r)
        except OSError as exc:
            msg = f"metrics_port={port}: cannot listen on {host}:{port}: {exc.strerror or exc}"
            raise ConfigError(msg) from None

    @classmethod
    def serving(cls, host: str, port: int) -> MetricsExporter:
        """The exporter on ``host:port``, started by the first run that asks for it."""
        with _exporters_lock:
            exporter = _exporters.get((host, port))
            if exporter is None:
                exporter = _exporters[(host, port)] = cls(host, port)
            return exporter

    @property
    def url(self) -> str:
        port = self.server.server_address[1]
        return f"http://{self.host}:{port}/metrics"

    def close(self) -> None:
        """Stop serving (tests; a process's endpoint otherwise lives as long as it does)."""
        with _exporters_lock:
            _exporters.pop((self.host, self.port), None)
        self.server.shutdown()
        self.server.server_close()

    def _series(self, run: str, metric: Any, *labels: str) -> Any:
        with self._lock:
            self._labels.setdefault(run, set()).add((metric, (run, *labels)))
        return metric.labels(run, *labels)

    def forget(self, run: str) -> None:
        """Drop every series of ``run``."""
        with self._lock:
            series = self._labels.pop(run, set())
        for metric, labels in series:
            with contextlib.suppress(KeyError):  # removed already
                metric.remove(*labels)

    def run_listener(
        self, run: str, limits: Mapping[str, float | None], grace_s: float
    ) -> Callable[[Event], None]:
        return _RunSeries(self, run, limits, grace_s)


class _RunSeries:
    """One run's listener: each event moves its series (a few dict lookups)."""

    def __init__(
        self,
        exporter: MetricsExporter,
        run: str,
        limits: Mapping[str, float | None],
        grace_s: float,
    ) -> None:
        self.exporter = exporter
        self.run = run
        self.grace_s = grace_s
        self._limits = {k: v for k, v in limits.items() if isinstance(v, (int, float))}
        self._failed: dict[tuple[Hashable, int, int], str] = {}
        self._in_flight = exporter._series(run, exporter.in_flight)

    def __call__(self, event: Event) -> None:
        e, run = self.exporter, self.run
        if isinstance(event, RequestSent):
            self._in_flight.inc()
        elif isinstance(event, AttemptFinished):
            self._in_flight.dec()
            labels = (event.model, event.deployment)
            e._series(run, e.requests, *labels, event.outcome).inc()
            if event.outcome != "cancelled":
                e._series(run, e.duration, *labels).observe(event.latency_s)
            if event.outcome != "ok":
                key = (event.conversation_id, event.turn, event.attempt)
                self._failed[key] = event.error or event.outcome
        elif isinstance(event, TurnFinished):
            self._turn(event.record)
        elif isinstance(event, RetryScheduled):
            key = (event.conversation_id, event.turn, event.attempt)
            e._series(run, e.retries, self._failed.pop(key, "error")).inc()
        elif isinstance(event, LimitChanged):
            e._series(run, e.rate_limit, event.kind, event.deployment).set(event.limit)
        elif isinstance(event, BreakerChanged):
            is_open = 0.0 if event.state == "closed" else 1.0
            e._series(run, e.circuit, event.deployment).set(is_open)
        elif isinstance(event, RunStarted):
            for kind, limit in self._limits.items():
                e._series(run, e.rate_limit, kind, "").set(float(limit))
            for status in ("ok", "failed", "cached", "resumed", "skipped"):
                e._series(run, e.turns, status)  # every status shows, 0 until counted
        elif isinstance(event, RunFinished):
            timer = threading.Timer(self.grace_s, e.forget, args=(run,))
            timer.daemon = True
            timer.start()

    def _turn(self, record: TurnRecord) -> None:
        e, run = self.exporter, self.run
        status = turn_status(record)
        e._series(run, e.turns, status).inc()
        if status in ("ok", "failed") and record.queue_s is not None:
            e._series(run, e.queue).observe(record.queue_s)
        if status != "ok":
            return
        if record.prompt_tokens:
            e._series(run, e.tokens, "prompt").inc(record.prompt_tokens)
        if record.completion_tokens:
            e._series(run, e.tokens, "completion").inc(record.completion_tokens)
        if record.cost_usd:
            e._series(run, e.cost).inc(record.cost_usd)


class _GpuCollector:
    """Each GPU's utilisation and memory in use, read from NVML at each scrape (nothing
    where there is no NVIDIA GPU: NVML fails to start in about a millisecond)."""

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> list[Any]:
        from prometheus_client.core import GaugeMetricFamily

        devices = open_nvml()
        if devices is None:
            return []
        utilization = GaugeMetricFamily(
            "nbllm_gpu_utilization_ratio", "GPU utilisation, 0 to 1", labels=["gpu"]
        )
        memory = GaugeMetricFamily(
            "nbllm_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"]
        )
        with devices:
            nvml = devices.nvml
            for device in devices:
                handle = device.handle
                rates = nvml_reading(partial(nvml.nvmlDeviceGetUtilizationRates, handle))
                if rates is not None:
                    utilization.add_metric([str(device.index)], float(rates.gpu) / 100.0)
                info = nvml_reading(partial(nvml.nvmlDeviceGetMemoryInfo, handle))
                if info is not None:
                    memory.add_metric([str(device.index)], float(info.used))
        return [utilization, memory]
