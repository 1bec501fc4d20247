"""What the live notebook dashboard costs: nbllm.run with and without it, side by side.

The zero-latency workload of ``executor_overhead.py`` (imported from it), made larger so
that each run lasts long enough to resolve a few per cent, against the test server in a
child process. Each round runs the two ways in a new random order; the figures are the
medians of requests per second and of this process's CPU time per request.
Target: with / without >= 0.95 (the dashboard costs at most 5 % of throughput).

    /path/to/python benchmarks/dashboard_overhead.py [--conversations 1600] [--rounds 9]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Sequence
from typing import Any

# Run as `python benchmarks/<script>.py`: this folder is first on sys.path.
import executor_overhead

TARGET = 0.95


def run_once(url: str, workload: Sequence[dict[str, Any]], dashboard: bool) -> tuple[float, float]:
    """(requests per second, CPU µs per request) of one run."""
    import nbllm
    from nbllm.ui.dashboard import Dashboard

    listeners = [Dashboard(gpu=False)] if dashboard else []
    wall, cpu = time.perf_counter(), time.process_time()
    result = nbllm.run(
        workload,
        model="nbllm-test",
        api_base=url,
        concurrency=64,
        progress=False,
        checkpoint=False,
        cache=False,
        listeners=listeners,
    )
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    for listener in listeners:
        listener.close()
        assert listener.turns_bar.value == result.summary.turns  # it really followed the run
    n = result.summary.turns
    if result.summary.turns_ok != n or result.summary.retries:
        msg = f"run not clean: {result.summary}"
        raise RuntimeError(msg)
    return n / wall, cpu / n * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=1600)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    eo = executor_overhead
    import nbllm.ui.dashboard  # noqa: F401 - a one-off import, not a per-run cost
    from nbllm.testing import start_subprocess

    workload = eo.make_workload(args.conversations, seed=args.seed, context_chars=4096)
    print(f"{args.conversations} conversations, {eo.count_requests(workload)} requests")
    figures: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    order_rng = random.Random(args.seed)
    with start_subprocess() as server:
        run_once(server.url, workload[:8], True)  # warm-up
        for r in range(args.rounds):
            ways = [False, True]
            order_rng.shuffle(ways)
            for dashboard in ways:
                rate, cpu = run_once(server.url, workload, dashboard)
                figures[dashboard].append((rate, cpu))
                name = "dashboard" if dashboard else "plain"
                print(f"  round {r + 1}: {name:<9} {rate:7,.0f} req/s  {cpu:5.0f} µs CPU/req")
    med = {k: (statistics.median(a for a, _ in v), statistics.median(c for _, c in v))
           for k, v in figures.items()}  # fmt: skip
    ratio = med[True][0] / med[False][0]
    cpu_ratio = med[False][1] / med[True][1]
    print(f"\n{'way':<10} {'median req/s':>12} {'CPU µs/req':>10}")
    print(f"{'plain':<10} {med[False][0]:>12,.0f} {med[False][1]:>10.0f}")
    print(f"{'dashboard':<10} {med[True][0]:>12,.0f} {med[True][1]:>10.0f}")
    verdict = "PASS" if ratio >= TARGET else "MISS"
    print(
        f"\ndashboard/plain req/s {ratio:.3f} (by CPU {cpu_ratio:.3f})"
        f"  target >= {TARGET}  {verdict}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
