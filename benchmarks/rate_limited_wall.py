"""How close does nbllm come to the fastest possible wall time under a rate limit?

Each configuration runs a multi-turn workload as ``nbllm.run(..., rpm=R,
concurrency=C)`` would, against the nbllm test server (in a child process) answering every
request after a fixed ``latency`` and enforcing the same limit itself: at most ``R``
admitted requests in any sliding window of ``minute`` seconds, a 429 for the rest.
No schedule can beat the largest of three terms::

    critical path    longest conversation's turns x latency   (turn k+1 needs turn k's answer)
    requests / rate  N / (R / minute)                         (the limit's steady rate)
    sum(lat) / C     N x latency / C                          (C requests in flight at most)

It prints the measured wall time, that bound with each term, their ratio (target:
wall / bound <= 1.10) and how many 429s the server sent (target: 0). To keep the run
short the "minute" of rpm is shrunk to ``--minute`` seconds (default 6) on both sides:
``Executor(rate_window_s=...)`` here, ``window_s`` on the server.

The configurations are built so that each term dominates once: ``rate-bound``,
``concurrency-bound`` and ``critical-path-bound`` (a few long conversations).
"requests / rate" is the steady-state rate; a sliding window lets the first window's
worth go early, so a rate-bound run may end slightly before it (ratio < 1).

Run: ``python benchmarks/rate_limited_wall.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import datetime as dt
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Run as `python benchmarks/<script>.py`: this folder is first on sys.path.
import executor_overhead

MODEL = "nbllm-test"
TARGET_RATIO = 1.10


@dataclass(frozen=True)
class Config:
    name: str
    conversations: int
    min_turns: int
    max_turns: int
    concurrency: int
    rpm: int  # requests per ``minute`` seconds
    context_chars: int = 1024

    def scaled(self, factor: float) -> Config:
        """A smaller run of the same shape (for ``--quick``)."""
        convs = max(1, round(self.conversations * factor))
        if self.conversations <= self.concurrency:  # critical-path-bound: shorten instead
            turns = max(2, round(self.max_turns * factor))
            return Config(self.name, self.conversations, turns, turns, self.concurrency, self.rpm)
        rpm = max(1, round(self.rpm * factor))
        return Config(self.name, convs, self.min_turns, self.max_turns, self.concurrency, rpm)


CONFIGS = (
    # 100 req/s allowed, ~1,400 requests; 64 in flight would allow 640 req/s.
    Config("rate-bound", 400, 2, 5, concurrency=64, rpm=600),
    # 8 in flight at 0.1 s = 80 req/s; the limit (1,000 req/s) is far off.
    Config("concurrency-bound", 250, 2, 5, concurrency=8, rpm=6000),
    # 4 conversations of 80 turns: 8 s of turns one after another, ~40 req/s.
    Config("critical-path-bound", 4, 80, 80, concurrency=16, rpm=600),
)


def make_workload(config: Config, seed: int = 0) -> list[dict[str, Any]]:
    """The same seeded conversations as ``executor_overhead.py`` makes, in this shape."""
    return executor_overhead.make_workload(
        config.conversations,
        seed=seed,
        context_chars=config.context_chars,
        min_turns=config.min_turns,
        max_turns=config.max_turns,
    )


def lower_bound(
    turns: Sequence[int], latency: float, rpm: int, minute: float, concurrency: int
) -> dict[str, float]:
    n = sum(turns)
    terms = {
        "critical_path_s": max(turns) * latency,
        "requests_over_rate_s": n / (rpm / minute),
        "latency_over_concurrency_s": n * latency / concurrency,
    }
    terms["bound_s"] = max(terms.values())
    return terms


def max_in_window(times: Sequence[float], window: float) -> int:
    """The most events in any half-open window ``[t, t + window)``."""
    ordered = sorted(times)
    best = 0
    for i, t in enumerate(ordered):
        best = max(best, bisect.bisect_left(ordered, t + window) - i)
    return best


def floor_wall(workload: Sequence[dict[str, Any]], latency: float, concurrency: int) -> float:
    """Wall time of the bare aiohttp loop (no limiter) on a fresh server with no rpm."""
    from nbllm.testing import start_subprocess

    overhead = executor_overhead
    with start_subprocess(latency=latency) as server:
        t0 = time.perf_counter()
        sent = asyncio.run(overhead._aiohttp_loop(server.url, workload, concurrency))
        wall = time.perf_counter() - t0
    if sent != sum(len(conv["turns"]) for conv in workload):
        msg = f"the aiohttp floor loop answered {sent} requests, not all"
        raise RuntimeError(msg)
    return wall


def run_limited(
    workload: Sequence[dict[str, Any]], url: str, *, rpm: int, concurrency: int, minute: float
) -> Any:
    """What ``nbllm.run(workload, model=MODEL, api_base=url, rpm=rpm, concurrency=concurrency,
    checkpoint=False, cache=False)`` does, with a "minute" of ``minute`` seconds: the one
    option ``nbllm.run`` does not take, so the Executor is built here."""
    import nbllm
    from nbllm.engines import create_engine

    async def main() -> Any:
        connections = max(concurrency, 8)  # as nbllm.run opens them
        engine = create_engine("auto", model=MODEL, api_base=url, max_connections=connections)
        executor = nbllm.Executor(
            engine,
            model=MODEL,
            rpm=rpm,
            concurrency=concurrency,
            timeout=120.0,
            rate_window_s=minute,
        )
        try:
            return await executor.run(nbllm.load_conversations(workload))
        finally:
            await engine.aclose()

    return asyncio.run(main())


def run_config(
    config: Config, *, latency: float, minute: float, seed: int, floor: bool
) -> dict[str, Any]:
    from nbllm.testing import read_log, start_subprocess

    workload = make_workload(config, seed)
    turns = [len(conv["turns"]) for conv in workload]
    bound = lower_bound(turns, latency, config.rpm, minute, config.concurrency)
    with tempfile.TemporaryDirectory(prefix="nbllm-bench-") as tmp:
        log_path = Path(tmp) / "requests.jsonl"
        with start_subprocess(
            latency=latency, rpm=config.rpm, window_s=minute, log_path=log_path
        ) as server:
            t0 = time.perf_counter()
            result = run_limited(
                workload,
                server.url,
                rpm=config.rpm,
                concurrency=config.concurrency,
                minute=minute,
            )
            wall = time.perf_counter() - t0
        log = read_log(log_path)
    statuses = Counter(entry.status for entry in log)
    summary = result.summary
    p50 = summary.latency_p50 or latency
    bound_p50 = lower_bound(turns, p50, config.rpm, minute, config.concurrency)["bound_s"]
    rate_bound = bound["requests_over_rate_s"] == bound["bound_s"]
    # The most a sliding window allows: a full window's worth every ``minute`` seconds.
    window_s = (math.ceil(sum(turns) / config.rpm) - 1) * minute + latency
    floor_s = (
        floor_wall(workload, latency, config.concurrency) if floor and not rate_bound else None
    )
    return {
        "config": config.name,
        "conversations": config.conversations,
        "requests": sum(turns),
        "concurrency": config.concurrency,
        "rpm": config.rpm,
        "minute_s": minute,
        "latency_s": latency,
        **bound,
        "wall_s": wall,
        "executor_wall_s": summary.wall_s,
        "ratio": wall / bound["bound_s"],
        "turns_ok": summary.turns_ok,
        "retries": summary.retries,
        "server_429": statuses.get(429, 0),
        "server_statuses": dict(sorted(statuses.items())),
        "max_ok_in_window": max_in_window([e.t for e in log if e.status == 200], minute),
        "latency_p50_s": summary.latency_p50,
        "bound_at_p50_s": bound_p50,
        "ratio_at_p50": wall / bound_p50,
        "aiohttp_floor_wall_s": floor_s,
        "sliding_window_bound_s": window_s if rate_bound else None,
    }


def dominant(row: dict[str, Any]) -> str:
    terms = {
        "critical path": row["critical_path_s"],
        "requests/rate": row["requests_over_rate_s"],
        "sum(lat)/C": row["latency_over_concurrency_s"],
    }
    return max(terms, key=terms.__getitem__)


def report(rows: Sequence[dict[str, Any]]) -> bool:
    print()
    print(
        f"{'config':<20} {'reqs':>5} {'C':>3} {'rpm':>5} {'crit s':>7} {'N/rate s':>8} "
        f"{'Σlat/C s':>8} {'bound s':>7} {'wall s':>7} {'ratio':>6} {'429s':>5} "
        f"{'max/win':>7}  verdict"
    )
    all_pass = True
    for row in rows:
        ok = (
            row["ratio"] <= TARGET_RATIO
            and row["server_429"] == 0
            and row["turns_ok"] == row["requests"]
        )
        all_pass = all_pass and ok
        print(
            f"{row['config']:<20} {row['requests']:>5} {row['concurrency']:>3} {row['rpm']:>5} "
            f"{row['critical_path_s']:>7.2f} {row['requests_over_rate_s']:>8.2f} "
            f"{row['latency_over_concurrency_s']:>8.2f} {row['bound_s']:>7.2f} "
            f"{row['wall_s']:>7.2f} {row['ratio']:>6.3f} {row['server_429']:>5} "
            f"{row['max_ok_in_window']:>7}  {'PASS' if ok else 'MISS'} ({dominant(row)})"
        )
    print(
        f"\ntarget: wall / bound <= {TARGET_RATIO:.2f}, 0 server 429s, every turn ok; "
        "'max/win' is the most requests the server answered in any window (<= rpm)"
    )
    print(
        f"\n{'config':<20} {'p50 latency s':>13} {'bound@p50 s':>11} {'ratio@p50':>9} "
        f"{'aiohttp floor s':>15} {'nbllm/floor':>11}"
    )
    for row in rows:
        floor = row["aiohttp_floor_wall_s"]
        floor_text = f"{floor:>15.2f} {row['wall_s'] / floor:>11.3f}" if floor else f"{'-':>15}"
        print(
            f"{row['config']:<20} {row['latency_p50_s']:>13.4f} {row['bound_at_p50_s']:>11.2f} "
            f"{row['ratio_at_p50']:>9.3f} {floor_text}"
        )
    print(
        "bound@p50: the same bound with the median latency nbllm measured instead of the "
        "server's nominal one\n(what the server and the socket add to each request); "
        "floor: a bare aiohttp loop, same concurrency, no rpm"
    )
    for row in rows:
        if row["sliding_window_bound_s"] and row["requests"] > row["rpm"]:
            print(
                f"{row['config']}: a sliding window would allow {row['rpm']} requests at once "
                f"every {row['minute_s']:g} s, done after {row['sliding_window_bound_s']:.2f} s; "
                f"nbllm paces them at the steady rate (wall / that = "
                f"{row['wall_s'] / row['sliding_window_bound_s']:.3f})"
            )
    return all_pass


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.1, help="server latency, seconds")
    parser.add_argument(
        "--minute", type=float, help="length of the rpm 'minute', seconds (6; 2 with --quick)"
    )
    parser.add_argument(
        "--only", choices=[c.name for c in CONFIGS], action="append", help="run only these"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="workloads and rpm cut to ~1/3, a 2 s minute"
    )
    parser.add_argument(
        "--no-floor",
        dest="floor",
        action="store_false",
        help="skip the bare aiohttp comparison run of the configurations that are not rate-bound",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.minute is None:
        args.minute = 2.0 if args.quick else 6.0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configs = [c for c in CONFIGS if not args.only or c.name in args.only]
    if args.quick:
        configs = [c.scaled(1 / 3) for c in configs]
    print(
        f"latency {args.latency:g} s, rpm 'minute' = {args.minute:g} s; "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    started = time.perf_counter()
    rows = []
    for config in configs:
        row = run_config(
            config, latency=args.latency, minute=args.minute, seed=args.seed, floor=args.floor
        )
        print(
            f"  {row['config']:<20} wall {row['wall_s']:6.2f} s  bound {row['bound_s']:6.2f} s  "
            f"ratio {row['ratio']:.3f}  429s {row['server_429']}",
            flush=True,
        )
        rows.append(row)
    all_pass = report(rows)
    print(f"total time {time.perf_counter() - started:.0f} s")
    if args.json:
        figures = {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "rows": rows,
            "all_pass": all_pass,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
