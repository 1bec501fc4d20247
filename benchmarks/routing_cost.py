"""What does routing across deployments cost, next to one engine?

The multi-turn workload of ``executor_overhead.py`` (default: 400 conversations of 2-5 turns,
~4 KB of seeded context each) goes to zero-latency nbllm test servers, each a child process
of its own, so that the client's own CPU time per request is what limits throughput. The
same conversations go through three ways, several rounds, in a new shuffled order each round:

``single``    ``nbllm.run(..., model="openai/test-model", api_base=url1)``: one lean engine,
              no router;
``router-2``  ``nbllm.run(..., model="grp", router=[two deployments of "grp"])``, on url1
              and url2: nbllm's router picks a deployment for each request (``--routing``,
              default ``simple-shuffle``), each with its own engine, limiter and breaker;
``router-1``  the same router with one deployment (url1): routing's bookkeeping with
              nothing to choose between.

It prints requests/s per way (median and every round), the client's CPU time per request,
how busy the servers were, and the ratios against the issue's target::

    router-2 / single  >= 0.7
    router-1 / single  >= 0.7

Run: ``python benchmarks/routing_cost.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

# Run as `python benchmarks/<script>.py`: this folder is first on sys.path.
import executor_overhead
from executor_overhead import count_requests, make_workload

MODEL = "openai/test-model"
GROUP = "grp"
TARGET = 0.7  # the issue's: two deployments at zero latency, against one lean engine


def deployment_id(url: str) -> str:
    """The id nbllm gives a deployment of ``MODEL`` at ``url``: the model and host:port."""
    return "test-model@" + url.split("//", 1)[1].split("/", 1)[0]


def _run(workload: Sequence[dict[str, Any]], concurrency: int, **options: Any) -> Any:
    import nbllm

    # The executor alone: no checkpoint or cache, so no round is resumed or answered from
    # an earlier round's cache (checkpoint_overhead.py measures those).
    return nbllm.run(
        workload,
        concurrency=concurrency,
        progress=False,
        checkpoint=False,
        cache=False,
        **options,
    )


def run_single(urls: Sequence[str], workload: Sequence[dict[str, Any]], concurrency: int) -> Any:
    return _run(workload, concurrency, model=MODEL, api_base=urls[0])


RunWay = Callable[[Sequence[str], Sequence[dict[str, Any]], int], Any]


def router_way(routing: str, n: int) -> RunWay:
    def run(urls: Sequence[str], workload: Sequence[dict[str, Any]], concurrency: int) -> Any:
        router = [
            {"model_name": GROUP, "litellm_params": {"model": MODEL, "api_base": url}}
            for url in urls[:n]
        ]
        return _run(workload, concurrency, model=GROUP, router=router, routing=routing)

    return run


def checked(result: Any, expected: int, deployments: set[str]) -> int:
    """Every turn answered, without retries, by exactly ``deployments``; the count."""
    summary = result.summary
    if summary.turns != expected or summary.turns_ok != expected or summary.retries:
        errors = [r.error for r in result.records if r.error][:3]
        msg = (
            f"nbllm run not clean: {summary.turns_ok}/{expected} turns ok, "
            f"{summary.retries} retries; first errors: {errors}"
        )
        raise RuntimeError(msg)
    seen = set(result.df["deployment"])
    if seen != deployments:
        msg = f"expected answers from {sorted(deployments)}, got {sorted(seen)}"
        raise RuntimeError(msg)
    return int(summary.turns_ok)


@dataclass
class Way:
    name: str
    run: RunWay
    servers: int  # how many of the servers it sends to (the first ``servers`` URLs)
    rates: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    server_busy: list[float] = field(default_factory=list)
    others_busy: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def best(self) -> float:
        return max(self.rates)


def _servers_cpu_s(pids: Sequence[int]) -> float | None:
    times = [executor_overhead._process_cpu_s(pid) for pid in pids]
    return None if None in times else sum(times)  # type: ignore[arg-type]


def measure(
    way: Way,
    urls: Sequence[str],
    pids: Sequence[int],
    workload: Sequence[dict[str, Any]],
    concurrency: int,
) -> None:
    """One timed run: req/s, client CPU per request, the servers' CPU (cores' worth), and
    how many cores' worth the machine's other processes used meanwhile."""
    gc.collect()
    machine0, servers0 = executor_overhead._machine_cpu_s(), _servers_cpu_s(pids)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    result = way.run(urls, workload, concurrency)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    machine1, servers1 = executor_overhead._machine_cpu_s(), _servers_cpu_s(pids)
    # Checked after the clock stops: building result.df is not part of the run.
    expected = count_requests(workload)
    sent = checked(result, expected, {deployment_id(u) for u in urls[: way.servers]})
    way.rates.append(sent / wall)
    way.cpu_ms.append(1000 * cpu / sent)
    if None not in (servers0, servers1, machine0, machine1):
        servers = servers1 - servers0  # type: ignore[operator]
        way.server_busy.append(servers / wall)
        others = machine1 - machine0 - servers - cpu  # type: ignore[operator]
        way.others_busy.append(max(0.0, others) / wall)


def _median_text(values: Sequence[float], fmt: str) -> str:
    return format(statistics.median(values), fmt) if values else "-"


def report(ways: Sequence[Way], args: argparse.Namespace, requests: int) -> dict[str, Any]:
    by_name = {w.name: w for w in ways}
    print()
    print(
        f"{'way':<9} {'median req/s':>12} {'best':>6}  {'rounds (req/s)':<34}"
        f" {'CPU ms/req':>10} {'servers':>7} {'others':>6}"
    )
    for w in ways:
        rounds = " ".join(f"{r:,.0f}" for r in w.rates)
        print(
            f"{w.name:<9} {w.median:>12,.0f} {w.best:>6,.0f}  {rounds:<34} "
            f"{statistics.median(w.cpu_ms):>10.3f} "
            f"{_median_text(w.server_busy, '>7.2f')} {_median_text(w.others_busy, '>6.2f')}"
        )
    print(
        "CPU ms/req: this process's CPU time per request (median); servers: the server "
        "processes' CPU, in cores' worth;\nothers: cores' worth of CPU that other processes "
        "on the machine used meanwhile (noise)"
    )
    names = [f"{w.name}/single" for w in ways if w.name != "single"]
    ratios = {n: by_name[n.split("/")[0]].median / by_name["single"].median for n in names}
    best = {n: by_name[n.split("/")[0]].best / by_name["single"].best for n in names}
    print(f"\n{'ratio of req/s':<17} {'median':>6} {'best':>6}")
    for name, value in ratios.items():
        verdict = "PASS" if value >= TARGET else "MISS"
        print(f"{name:<17} {value:6.2f} {best[name]:6.2f}   target >= {TARGET:g}  {verdict}")
    cpu = {w.name: statistics.median(w.cpu_ms) for w in ways}
    print(
        "\nrouting's client CPU per request, against single: "
        + ", ".join(
            f"{name} {1000 * (ms - cpu['single']):+.0f} µs"
            for name, ms in cpu.items()
            if name != "single"
        )
    )
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "conversations": args.conversations,
        "requests": requests,
        "concurrency": args.concurrency,
        "routing": args.routing,
        "ways": {
            w.name: {
                "median_rps": w.median,
                "best_rps": w.best,
                "rounds_rps": w.rates,
                "client_cpu_ms_per_request": w.cpu_ms,
                "servers_busy_cores": w.server_busy,
                "others_busy_cores": w.others_busy,
            }
            for w in ways
        },
        "ratios_median": ratios,
        "ratios_best": best,
        "client_cpu_ms_per_request_median": cpu,
        "target": TARGET,
        "pass": {name: value >= TARGET for name, value in ratios.items()},
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--context-chars", type=int, default=4096)
    parser.add_argument(
        "--routing",
        default="simple-shuffle",
        help="the router's strategy for router-2 and router-1 (default simple-shuffle)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="120 conversations, 1 round")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.conversations = min(args.conversations, 120)
        args.rounds = 1
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from nbllm.testing import start_subprocess

    workload = make_workload(args.conversations, seed=args.seed, context_chars=args.context_chars)
    requests = count_requests(workload)
    ways = [
        Way("single", run_single, 1),
        Way("router-2", router_way(args.routing, 2), 2),
        Way("router-1", router_way(args.routing, 1), 1),
    ]
    print(
        f"{args.conversations} conversations, {requests} requests "
        f"({requests / len(workload):.2f} turns each), {args.context_chars} chars of context, "
        f"concurrency {args.concurrency}, routing {args.routing}, {args.rounds} rounds; "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    started = time.perf_counter()
    with (
        start_subprocess(latency=0.0, shared_history=True) as first,
        start_subprocess(latency=0.0, shared_history=True) as second,
    ):
        urls, pids = (first.url, second.url), (first.pid, second.pid)
        # Warm up: imports, each way's first run and both servers' connections.
        for way in ways:
            way.run(urls, workload[:4], args.concurrency)
        shuffle = random.Random(args.seed)
        for r in range(args.rounds):
            # A new order each round, so that no way always follows the same neighbour.
            order = list(ways)
            shuffle.shuffle(order)
            for way in order:
                measure(way, urls, pids, workload, args.concurrency)
                print(f"  round {r + 1}: {way.name:<9} {way.rates[-1]:>8,.0f} req/s", flush=True)
    figures = report(ways, args, requests)
    print(f"\ntotal time {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
