"""What do Prometheus metrics and OpenTelemetry traces cost, next to a run without them?

Multi-turn conversations go to a zero-latency nbllm test server in a child process, so that
the client's own CPU time per request is what limits throughput, four ways, several
rounds, in a rotating order:

``off``      ``nbllm.run(...)``: no metrics endpoint, no tracer;
``metrics``  the same with ``metrics_port=``: the run's numbers move on every event, and
             ``/metrics`` is scraped every 0.5 s by a thread, as Prometheus would;
``traced``   metrics and a ``RunTracer`` over OpenTelemetry's API with a tracer that records
             nothing (``NoOpTracer``): everything nbllm itself does to trace a run (its
             events, attribute dicts, contexts, the calls into the API) and nothing else;
``sdk``      metrics and a ``RunTracer`` over the OpenTelemetry SDK: a span per run, per
             conversation and per request attempt, through ``BatchSpanProcessor`` to an
             exporter that drops them.

It prints requests/s per way (median and every round), the spans made, the SDK's own cost per
span (timed apart) and what that alone takes of a request's client time, and the ratios::

    traced / off   >= 0.97   nbllm's metrics and tracing together cost < 3 % of throughput
    sdk / off      (reported: adds the SDK's price per span, which nbllm cannot lower)
    metrics / off  (reported: metrics alone)

Run: ``python benchmarks/observability_cost.py`` (``--quick`` for a smoke run, ``--latency S``
for a server that takes S seconds per answer, ``--json PATH`` to keep the figures).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time
import urllib.request
from typing import Any

TARGET = 0.97


def _workload(n: int, turns: int) -> list[dict[str, Any]]:
    return [
        {"id": i, "turns": [f"Turn {k} of conversation {i}: what changed?" for k in range(turns)]}
        for i in range(n)
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Scraper(threading.Thread):
    """Reads /metrics every ``interval_s`` until stopped, as a Prometheus server would."""

    def __init__(self, port: int, interval_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.interval_s = interval_s
        self.done = threading.Event()
        self.scrapes = 0

    def run(self) -> None:
        while not self.done.wait(self.interval_s):
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    response.read()
                self.scrapes += 1
            except OSError:
                pass  # not listening yet: the run has not started


def _span_cost(tracer: Any, n: int = 5000) -> float:
    """Seconds the OpenTelemetry SDK takes to start and end one span with 10 attributes."""
    attributes = {f"nbllm.a{i}": i for i in range(10)}
    now = time.time_ns()
    t0 = time.perf_counter()
    for _ in range(n):
        tracer.start_span("chat m", start_time=now, attributes=attributes).end(end_time=now)
    return (time.perf_counter() - t0) / n


def _run(url: str, data: list[dict[str, Any]], **options: Any) -> float:
    import nbllm

    t0 = time.perf_counter()
    result = nbllm.run(
        data, model="m", api_base=url, concurrency=32, checkpoint=False, cache=False,
        progress=False, **options,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    assert result.summary.turns_ok == len(result.df), result.summary.verdict
    return len(result.df) / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and rounds")
    parser.add_argument("--latency", type=float, default=0.0, help="server seconds per answer")
    parser.add_argument("--json", metavar="PATH", help="write the figures here")
    args = parser.parse_args()
    n, turns, rounds = (100, 3, 2) if args.quick else (400, 3, 7)

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.trace import NoOpTracer

    from nbllm.testing.launcher import start_subprocess
    from nbllm.tracing import RunTracer

    class Dropped(SpanExporter):
        spans = 0

        def export(self, spans: Any) -> SpanExportResult:
            Dropped.spans += len(spans)
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Dropped()))
    tracer = provider.get_tracer("nbllm")
    port = _free_port()
    scraper = _Scraper(port)
    scraper.start()
    listeners: dict[str, Any] = {
        "off": None,
        "metrics": [],
        "traced": lambda: [RunTracer(NoOpTracer())],
        "sdk": lambda: [RunTracer(tracer)],
    }
    rates: dict[str, list[float]] = {way: [] for way in listeners}
    ways = list(rates)

    def once(url: str, data: list[dict[str, Any]], way: str) -> float:
        make = listeners[way]
        if make is None:
            return _run(url, data)
        return _run(url, data, metrics_port=port, listeners=make() if callable(make) else [])

    with start_subprocess(latency=args.latency) as server:
        data = _workload(n, turns)
        for way in ways:  # warm up: connections, imports
            once(server.url, data[:50], way)
        for r in range(rounds):
            for way in ways[r % len(ways) :] + ways[: r % len(ways)]:
                rate = once(server.url, data, way)
                rates[way].append(rate)
                print(f"  round {r + 1}: {way:<7} {rate:8,.0f} req/s", flush=True)
    scraper.done.set()
    provider.shutdown()
    medians = {way: statistics.median(values) for way, values in rates.items()}
    ratio = medians["traced"] / medians["off"]
    per_span = _span_cost(tracer)
    client_s = 1 / medians["off"]
    spans_per_request = (n + 1) / (n * turns) + 1  # a run, a conversation, each attempt
    print(f"\n{n} conversations x {turns} turns per run, {rounds} rounds, concurrency 32,")
    print(f"server latency {args.latency} s")
    print(f"{'way':<8} {'median req/s':>13}  rounds")
    for way, values in rates.items():
        print(f"{way:<8} {medians[way]:13,.0f}  {' '.join(f'{v:,.0f}' for v in values)}")
    print(f"spans exported: {Dropped.spans:,}; /metrics scraped {scraper.scrapes} times")
    floor = per_span * spans_per_request / client_s
    print(
        f"the SDK alone: {per_span * 1e6:.1f} µs to start and end one span with 10 attributes; "
        f"a plain request here takes {client_s * 1e6:.0f} µs of client time, so the SDK's "
        f"{spans_per_request:.2f} spans per request take {floor:.1%} of it, before nbllm's part"
    )
    print(f"metrics/off req/s  {medians['metrics'] / medians['off']:.3f}   (reported)")
    print(f"sdk/off req/s      {medians['sdk'] / medians['off']:.3f}   (reported: with the SDK)")
    verdict = "PASS" if ratio >= TARGET else "MISS"
    print(f"traced/off req/s   {ratio:.3f}   target >= {TARGET}  {verdict}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"rounds": rates, "medians": medians, "ratio": ratio, "span_s": per_span}, f)


if __name__ == "__main__":
    main()
