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
    nbllm_tokens_total{run,kind}                          of rows answered by a request now;
                                                           kind: prompt, completion, cached
                                                           (prompt tokens from a cache)
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
``ok`` rows (``kind="cached"``: the sum of their ``cached_tokens``). Turns that never ran
(a stop) are not counted.
"""

from __future__ import annotations

import bisect
import collections
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
    limits: Mapping[str, Any] | None = None,
    *,
    grace_s: float | None = None,
) -> Callable[[Event], None] | None:
    """The listener that feeds ``/metrics`` on ``host:port`` for one run (None without a
    port). The endpoint starts with the first run that asks for it; ``ConfigError`` where
    ``prometheus-client`` is missing or the port is taken by something else. ``limits``:
    the run's rpm / tpm, shown as ``nbllm_rate_limit`` where fixed (a number; "auto" ones
    show as they move)."""
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
        self.runs: dict[str, _RunSeries] = {}  # the runs shown, by their label
        self.registry = prom.CollectorRegistry()
        self.registry.register(_RunsCollector(self))
        self.registry.register(_GpuCollector())
        try:
            self.server, self.thread = prom.start_http_server(
                port, addr=host, registry=self.registry
            )
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

    def forget(self, run: str) -> None:
        """Drop every series of ``run``."""
        self.runs.pop(run, None)

    def run_listener(
        self, run: str, limits: Mapping[str, Any], grace_s: float
    ) -> Callable[[Event], None]:
        series = _RunSeries(self, run, limits, grace_s)
        self.runs[run] = series
        return series


#: The buckets of the two histograms, in seconds.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)


class _Histogram:
    """Observations counted per bucket (the last one: above every bound), and their sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        """Prometheus' cumulative buckets, ``+Inf`` last."""
        counts = list(self.counts)  # one copy: the loop may add one meanwhile
        out, running = [], 0
        for bound, n in zip((*map(str, self.bounds), "+Inf"), counts, strict=True):
            running += n
            out.append((bound, float(running)))
        return out


class _RunSeries:
    """One run's figures, kept as plain numbers that each event moves (a dict lookup and an
    addition: the listener runs for every event of the run); ``_RunsCollector`` turns them
    into series at each scrape, from another thread (each read is one copy)."""

    def __init__(
        self,
        exporter: MetricsExporter,
        run: str,
        limits: Mapping[str, Any],
        grace_s: float,
    ) -> None:
        self.exporter = exporter
        self.run = run
        self.grace_s = grace_s
        self.requests: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self.durations: dict[tuple[str, str], _Histogram] = {}
        self.queue = _Histogram(QUEUE_BUCKETS)
        self.tokens = {"prompt": 0, "completion": 0, "cached": 0}
        self.cost = 0.0
        self.in_flight = 0
        self.turns = dict.fromkeys(("ok", "failed", "cached", "resumed", "skipped"), 0)
        self.retries: collections.Counter[str] = collections.Counter()
        self.limits: dict[tuple[str, str], float] = {
            (kind, ""): float(v) for kind, v in limits.items() if isinstance(v, (int, float))
        }
        self.circuit: dict[str, float] = {}
        self._failed: dict[tuple[Hashable, int, int], str] = {}

    def __call__(self, event: Event) -> None:
        kind = type(event)
        if kind is RequestSent:
            self.in_flight += 1
        elif kind is AttemptFinished:
            self._attempt(event)  # type: ignore[arg-type]
        elif kind is TurnFinished:
            self._turn(event.record)  # type: ignore[union-attr]
        elif kind is RetryScheduled:
            key = (event.conversation_id, event.turn, event.attempt)  # type: ignore[union-attr]
            self.retries[self._failed.pop(key, "error")] += 1
        elif kind is LimitChanged:
            self.limits[(event.kind, event.deployment)] = event.limit  # type: ignore[union-attr]
        elif kind is BreakerChanged:
            is_open = 0.0 if event.state == "closed" else 1.0  # type: ignore[union-attr]
            self.circuit[event.deployment] = is_open  # type: ignore[union-attr]
        elif kind is RunFinished:
            timer = threading.Timer(self.grace_s, self.exporter.forget, args=(self.run,))
            timer.daemon = True
            timer.start()

    def _attempt(self, event: AttemptFinished) -> None:
        self.in_flight -= 1
        where = (event.model, event.deployment)
        self.requests[event.model, event.deployment, event.outcome] += 1
        if event.outcome != "cancelled":
            histogram = self.durations.get(where)
            if histogram is None:
                histogram = self.durations[where] = _Histogram(DURATION_BUCKETS)
            histogram.observe(event.latency_s)
        if event.outcome != "ok":
            key = (event.conversation_id, event.turn, event.attempt)
            self._failed[key] = event.error or event.outcome

    def _turn(self, record: TurnRecord) -> None:
        status = turn_status(record)
        self.turns[status] += 1
        if status in ("ok", "failed") and record.queue_s is not None:
            self.queue.observe(record.queue_s)
        if status != "ok":
            return
        self.tokens["prompt"] += record.prompt_tokens or 0
        self.tokens["completion"] += record.completion_tokens or 0
        self.tokens["cached"] += record.cached_tokens or 0
        self.cost += record.cost_usd or 0.0


class _RunsCollector:
    """Every run's series, made from its numbers at each scrape."""

    def __init__(self, exporter: MetricsExporter) -> None:
        self.exporter = exporter

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> list[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        requests = CounterMetricFamily(
            "nbllm_requests", "Request attempts, by how each ended",
            labels=["run", "model", "deployment", "outcome"],
        )  # fmt: skip
        duration = HistogramMetricFamily(
            "nbllm_request_duration_seconds", "Seconds each attempt spent in the engine",
            labels=["run", "model", "deployment"],
        )  # fmt: skip
        queue = HistogramMetricFamily(
            "nbllm_queue_wait_seconds",
            "Seconds each turn sent waited besides its requests (slots, limits, pauses, "
            "back-off)", labels=["run"],
        )  # fmt: skip
        tokens = CounterMetricFamily(
            "nbllm_tokens", "Tokens of the turns answered by a request", labels=["run", "kind"]
        )
        cost = CounterMetricFamily(
            "nbllm_cost_usd", "US dollars of the turns answered by a request", labels=["run"]
        )
        in_flight = GaugeMetricFamily(
            "nbllm_requests_in_flight", "Requests sent and not yet ended", labels=["run"]
        )
        turns = CounterMetricFamily(
            "nbllm_turns", "Turns finished, by status", labels=["run", "status"]
        )
        retries = CounterMetricFamily(
            "nbllm_retries", "Retries scheduled, by the failed attempt's error",
            labels=["run", "reason"],
        )  # fmt: skip
        limits = GaugeMetricFamily(
            "nbllm_rate_limit", "The limit in force: rpm / tpm per rate window, concurrency",
            labels=["run", "kind", "deployment"],
        )  # fmt: skip
        circuit = GaugeMetricFamily(
            "nbllm_circuit_open", "1 while a deployment's breaker is open or half-open",
            labels=["run", "deployment"],
        )  # fmt: skip
        for run, series in list(self.exporter.runs.items()):
            for (model, deployment, outcome), n in list(series.requests.items()):
                requests.add_metric([run, model, deployment, outcome], n)
            for (model, deployment), hist in list(series.durations.items()):
                duration.add_metric([run, model, deployment], hist.buckets(), hist.total)
            queue.add_metric([run], series.queue.buckets(), series.queue.total)
            for kind, n in list(series.tokens.items()):
                tokens.add_metric([run, kind], n)
            cost.add_metric([run], series.cost)
            in_flight.add_metric([run], series.in_flight)
            for status, n in list(series.turns.items()):
                turns.add_metric([run, status], n)
            for reason, n in list(series.retries.items()):
                retries.add_metric([run, reason], n)
            for (kind, deployment), value in list(series.limits.items()):
                limits.add_metric([run, kind, deployment], value)
            for deployment, value in list(series.circuit.items()):
                circuit.add_metric([run, deployment], value)
        return [requests, duration, queue, tokens, cost, in_flight, turns, retries, limits, circuit]


def serve_metrics(server: Any, port: int, host: str = "127.0.0.1") -> MetricsExporter:
    """``/metrics`` on ``host:port`` for ``nbllm serve``'s ``server`` (an ``EngineServer``):
    its queue, requests in flight, readiness, and for a local engine the tokens it has
    generated and its batches by size (with the GPUs, as for a run)."""
    exporter = MetricsExporter.serving(host, port)
    exporter.registry.register(_ServeCollector(server))
    return exporter


#: The buckets of ``nbllm_serve_batch_size``: requests per batch.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _ServeCollector:
    """An ``EngineServer``'s figures, read at each scrape."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> list[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        server = self.server
        out: list[Any] = [
            GaugeMetricFamily(
                "nbllm_serve_queue_depth", "Chat requests admitted and not yet answered "
                "(at most max_queue)", value=server.in_flight + server.receiving,
            ),
            GaugeMetricFamily(
                "nbllm_serve_requests_in_flight", "Chat requests the engine is answering",
                value=server.in_flight,
            ),
            GaugeMetricFamily(
                "nbllm_serve_max_queue", "Chat requests admitted at most", value=server.max_queue
            ),
            GaugeMetricFamily(
                "nbllm_serve_ready", "1 once the engine is loaded and answering",
                value=1.0 if server.state.value == "ready" else 0.0,
            ),
        ]  # fmt: skip
        engine = server.engine
        tokens = getattr(getattr(engine, "tokens", None), "count", None)
        if isinstance(tokens, int):
            generated = CounterMetricFamily(
                "nbllm_serve_generated_tokens",
                "Tokens the local engine has generated (rate() of it: tokens per second)",
                value=tokens,
            )
            out.append(generated)
        sizes = getattr(getattr(engine, "_batcher", None), "batch_sizes", None)
        if sizes is not None:
            counts = dict(sizes)  # one copy: the engine's loop may add a batch meanwhile
            buckets, running = [], 0.0
            for bound in BATCH_BUCKETS:
                running = float(sum(n for size, n in counts.items() if size <= bound))
                buckets.append((str(bound), running))
            buckets.append(("+Inf", float(sum(counts.values()))))
            total = float(sum(size * n for size, n in counts.items()))
            batches = HistogramMetricFamily(
                "nbllm_serve_batch_size",
                "Requests per batch the local engine ran (per token step where it batches "
                "continuously)",
            )
            batches.add_metric([], buckets, total)
            out.append(batches)
        return out


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
