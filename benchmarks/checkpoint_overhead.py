"""What do the checkpoint and the response cache cost per request, and what does a resume cost?

The workload of ``executor_overhead.py`` (default: 400 seeded conversations of 2-5 turns,
~4 KB of context in each system message) goes to the zero-latency nbllm test server,
which runs in a child process (so that it has the other CPU core) and logs every request
it answers (``--log``). The same ``nbllm.run(..., concurrency=64, progress=False)`` call
runs in three ways, several rounds, in a rotating order::

    none         checkpoint=False,       cache=False       (the baseline)
    checkpoint   checkpoint=<new folder>, cache=False
    ckpt+cache   checkpoint=<new folder>, cache=<new file>  (both written; misses only)

Every round gets new paths, so nothing is resumed or answered from the cache; this is
checked on every run (``summary.resumed == 0``, ``summary.cached == 0``, every turn ok,
no retries, the server saw exactly one request per turn, and the files hold one row per
turn). It prints requests/s per way (median and every round), the client's CPU time per
request, the size of the files per 1,000 turns, and the ratios against the target::

    checkpoint / none  >= 0.95
    ckpt+cache / none  >= 0.95

The checkpoint is written by group commit (each answered turn is committed in the event
loop's next turn, with every turn answered meanwhile, or at once when 5 wait), the cache
in batches (200 answers or 0.25 s), so this measures what that durability costs at a
rate where the client's CPU is the limit. The call's fixed costs count too: hashing the
dataset for the fingerprint, opening the files, and closing them (SQLite's last
checkpoint syncs the file to disk).

Then what a re-run costs, each repeated a few times (median wall time):

    resume       the same call on a finished checkpoint (every turn resumed)
    cache hits   checkpoint=False on the warm cache file (every turn cached)

both checked to send no request at all (the server's log grows by zero lines).

Run: ``python benchmarks/checkpoint_overhead.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Run as `python benchmarks/<script>.py`: this folder is first on sys.path.
import executor_overhead

MODEL = "nbllm-test"
TARGET_RATIO = 0.95
BUSY_CORES = 0.25  # above this (median), warn that neighbours distort the req/s ratios


def make_workload(n: int, *, seed: int = 0, context_chars: int = 4096) -> list[dict[str, Any]]:
    """The same seeded conversations as ``executor_overhead.py`` sends."""
    return executor_overhead.make_workload(n, seed=seed, context_chars=context_chars)


def count_requests(workload: Sequence[dict[str, Any]]) -> int:
    return sum(len(conv["turns"]) for conv in workload)


# -- the server's request log ---------------------------------------------------------


class RequestLog:
    """Counts the lines the server appended to its ``--log`` file since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0

    def new_requests(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return 0
        self._offset += len(chunk)
        return chunk.count(b"\n")


# -- files -------------------------------------------------------------------------------


def file_bytes(path: Path) -> int:
    """Size of an SQLite file with its ``-wal`` (if any is left), in bytes."""
    total = 0
    for p in (path, path.with_name(path.name + "-wal")):
        if p.exists():
            total += p.stat().st_size
    return total


def count_rows(path: Path, table: str) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    finally:
        conn.close()


# -- the ways ---------------------------------------------------------------------------


@dataclass
class Paths:
    """Where one run writes: ``checkpoint`` (a folder) and ``cache`` (a file), or None."""

    checkpoint: Path | None = None
    cache: Path | None = None

    @property
    def checkpoint_file(self) -> Path | None:
        if self.checkpoint is None:
            return None
        from nbllm.executor.checkpoint import CHECKPOINT_FILE

        return self.checkpoint / CHECKPOINT_FILE


def run_nbllm(url: str, workload: Any, concurrency: int, paths: Paths) -> Any:
    import nbllm

    return nbllm.run(
        workload,
        model=MODEL,
        api_base=url,
        concurrency=concurrency,
        progress=False,
        checkpoint=paths.checkpoint if paths.checkpoint is not None else False,
        cache=paths.cache if paths.cache is not None else False,
    )


@dataclass
class Way:
    name: str
    new_paths: Callable[[Path], Paths]  # a round's own folder -> this way's paths
    rates: list[float] = field(default_factory=list)
    walls: list[float] = field(default_factory=list)
    outside_ms: list[float] = field(default_factory=list)  # call wall - executor wall
    cpu_ms: list[float] = field(default_factory=list)
    server_busy: list[float] = field(default_factory=list)
    others_busy: list[float] = field(default_factory=list)
    checkpoint_kb: list[float] = field(default_factory=list)  # per 1,000 turns
    cache_kb: list[float] = field(default_factory=list)  # per 1,000 turns
    last: Paths | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.rates)


WAYS: tuple[tuple[str, Callable[[Path], Paths]], ...] = (
    ("none", lambda d: Paths()),
    ("checkpoint", lambda d: Paths(checkpoint=d / "checkpoint")),
    ("ckpt+cache", lambda d: Paths(checkpoint=d / "checkpoint", cache=d / "cache.sqlite")),
)


def check(
    result: Any, expected: int, sent: int, *, resumed: int = 0, cached: int = 0, what: str
) -> None:
    """Every turn answered, none retried; ``resumed`` / ``cached`` as given; ``sent`` requests
    reached the server (``expected`` when nothing is resumed or cached, else zero)."""
    s = result.summary
    problems = []
    if s.turns != expected or s.turns_ok != expected or s.retries:
        errors = [r.error for r in result.records if r.error][:3]
        problems.append(f"{s.turns_ok}/{expected} turns ok, {s.retries} retries: {errors}")
    if s.resumed != resumed or s.cached != cached:
        problems.append(
            f"resumed {s.resumed} (expected {resumed}), cached {s.cached} (expected {cached})"
        )
    want_sent = 0 if (resumed or cached) else expected
    if sent != want_sent:
        problems.append(f"the server answered {sent} requests, expected {want_sent}")
    if problems:
        raise RuntimeError(f"{what}: " + "; ".join(problems))


def measure(
    way: Way,
    url: str,
    workload: Any,
    concurrency: int,
    folder: Path,
    log: RequestLog,
    server_pid: int,
) -> None:
    """One timed run of one way on new paths under ``folder``; checks it, sizes its files."""
    overhead = executor_overhead
    paths = way.new_paths(folder)
    expected = count_requests(workload)
    log.new_requests()
    gc.collect()
    machine0, server0 = overhead._machine_cpu_s(), overhead._process_cpu_s(server_pid)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    result = run_nbllm(url, workload, concurrency, paths)  # opens, runs and closes the files
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    machine1, server1 = overhead._machine_cpu_s(), overhead._process_cpu_s(server_pid)
    # Checked after the clock stops.
    check(result, expected, log.new_requests(), what=way.name)
    ckpt = paths.checkpoint_file
    if ckpt is not None:
        rows = count_rows(ckpt, "turns")
        if rows != expected:
            raise RuntimeError(f"{way.name}: {rows} rows in {ckpt}, expected {expected}")
        way.checkpoint_kb.append(file_bytes(ckpt) / 1024 / expected * 1000)
    if paths.cache is not None:
        rows = count_rows(paths.cache, "responses")
        if rows != expected:
            raise RuntimeError(f"{way.name}: {rows} rows in {paths.cache}, expected {expected}")
        way.cache_kb.append(file_bytes(paths.cache) / 1024 / expected * 1000)
    way.rates.append(expected / wall)
    way.walls.append(wall)
    way.outside_ms.append(1000 * (wall - result.wall_s))
    way.cpu_ms.append(1000 * cpu / expected)
    if None not in (machine0, machine1, server0, server1):
        server = server1 - server0  # type: ignore[operator]
        way.server_busy.append(server / wall)
        others = machine1 - machine0 - server - cpu  # type: ignore[operator]
        way.others_busy.append(max(0.0, others) / wall)
    way.last = paths


def rerun(
    name: str,
    url: str,
    workload: Any,
    concurrency: int,
    paths: Paths,
    log: RequestLog,
    repeats: int,
) -> list[float]:
    """Wall times of ``repeats`` re-runs on finished ``paths``: nothing may reach the server."""
    expected = count_requests(workload)
    walls = []
    for _ in range(repeats):
        log.new_requests()
        gc.collect()
        t0 = time.perf_counter()
        result = run_nbllm(url, workload, concurrency, paths)
        walls.append(time.perf_counter() - t0)
        resumed = expected if paths.checkpoint is not None else 0
        check(
            result,
            expected,
            log.new_requests(),
            resumed=resumed,
            cached=0 if resumed else expected,
            what=name,
        )
    return walls


# -- reporting ----------------------------------------------------------------------------


def _verdict(value: float, target: float) -> str:
    return "PASS" if value >= target else "MISS"


def _median(values: Sequence[float], fmt: str) -> str:
    """The median in ``fmt`` (">7.0f"), or "-" as wide."""
    width = int("".join(c for c in fmt.split(".")[0] if c.isdigit()) or 0)
    return format(statistics.median(values), fmt) if values else "-".rjust(width)


def report(
    ways: Sequence[Way],
    reruns: dict[str, list[float]],
    expected: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    by_name = {w.name: w for w in ways}
    print()
    print(
        f"{'way':<11} {'median req/s':>12} {'best':>6} {'CPU ms/req':>10} {'fixed ms':>8}"
        f" {'server':>6} {'others':>6} {'ckpt KB':>7} {'cache KB':>8}"
    )
    for w in ways:
        print(
            f"{w.name:<11} {w.median:>12,.0f} {max(w.rates):>6,.0f} "
            f"{statistics.median(w.cpu_ms):>10.3f} {_median(w.outside_ms, '>8.1f')} "
            f"{_median(w.server_busy, '>6.0%')} {_median(w.others_busy, '>6.2f')} "
            f"{_median(w.checkpoint_kb, '>7.0f')} {_median(w.cache_kb, '>8.0f')}"
        )
    print(
        "CPU ms/req: this process's CPU time per request; fixed ms: the call's wall time "
        "outside the\nexecutor (hashing the dataset, opening and closing files); server: the "
        "server process's\nCPU / wall; others: cores' worth of CPU other processes used "
        "meanwhile (noise);\nKB: file (+ -wal) size per 1,000 turns, after the run closed; "
        "all medians"
    )
    for w in ways:
        print(f"  {w.name:<11} rounds (req/s): " + " ".join(f"{r:,.0f}" for r in w.rates))
    base = by_name["none"]
    ratios = {f"{w.name}/none": w.median / base.median for w in ways if w is not base}
    # Paired per round (the ways of one round ran back to back): less sensitive to noise.
    paired = {
        f"{w.name}/none": statistics.median(r / b for r, b in zip(w.rates, base.rates, strict=True))
        for w in ways
        if w is not base
    }
    cpu = {w.name: statistics.median(w.cpu_ms) for w in ways}
    # The client is what limits req/s here, so its CPU per request predicts the ratio an
    # idle machine would give, and is far less sensitive to neighbours than req/s.
    by_cpu = {f"{w.name}/none": cpu["none"] / cpu[w.name] for w in ways if w is not base}
    print(f"\n{'ratio of req/s':<20} {'median':>6} {'paired':>6} {'by CPU':>6}")
    for name, value in ratios.items():
        verdict = f"target >= {TARGET_RATIO:g}  {_verdict(value, TARGET_RATIO)}"
        print(f"{name:<20} {value:6.2f} {paired[name]:6.2f} {by_cpu[name]:6.2f}   {verdict}")
    print(
        "median: of the medians; paired: median of each round's ratio; by CPU: baseline "
        "CPU/request over this way's"
    )
    others = [x for w in ways for x in w.others_busy]
    if others and statistics.median(others) > BUSY_CORES:
        print(
            f"NOTE: other processes kept {statistics.median(others):.2f} cores busy (median): "
            "the client was not the only limit,\nso the req/s ratios can be off either way; "
            "the 'by CPU' ratios are the steadier figure"
        )
    print(
        "client CPU per request over the baseline: "
        + ", ".join(
            f"{w.name} {1000 * (cpu[w.name] - cpu['none']):+.0f} µs" for w in ways if w is not base
        )
    )
    base_wall = statistics.median(base.walls)
    print(f"\n{'re-run (nothing sent)':<34} {'median wall':>11} {'runs (s)':<24} {'vs none':>7}")
    print(f"{'none (baseline, all sent)':<34} {base_wall:>10.3f}s")
    for name, walls in reruns.items():
        runs = " ".join(f"{x:.3f}" for x in walls)
        print(
            f"{name:<34} {statistics.median(walls):>10.3f}s {runs:<24} "
            f"{statistics.median(walls) / base_wall:>7.2f}"
        )
    print(f"({expected:,} turns; the server's log grew by 0 lines in every re-run)")
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "cpus": os.cpu_count(),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "conversations": args.conversations,
        "requests": expected,
        "concurrency": args.concurrency,
        "ways": {
            w.name: {
                "median_rps": w.median,
                "rounds_rps": w.rates,
                "rounds_wall_s": w.walls,
                "outside_executor_ms": w.outside_ms,
                "client_cpu_ms_per_request": w.cpu_ms,
                "server_busy": w.server_busy,
                "others_busy_cores": w.others_busy,
                "checkpoint_kb_per_1000_turns": w.checkpoint_kb,
                "cache_kb_per_1000_turns": w.cache_kb,
            }
            for w in ways
        },
        "ratios_median": ratios,
        "ratios_paired": paired,
        "ratios_by_cpu": by_cpu,
        "reruns_wall_s": reruns,
        "pass": {name: value >= TARGET_RATIO for name, value in ratios.items()},
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--reruns", type=int, default=5, help="repeats of each re-run")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--context-chars", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dir", default=None, help="where the temporary files go (default: the system's temp)"
    )
    parser.add_argument("--quick", action="store_true", help="120 conversations, 2 rounds")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.conversations = min(args.conversations, 120)
        args.rounds = min(args.rounds, 2)
        args.reruns = min(args.reruns, 2)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from nbllm.testing import start_subprocess

    workload = make_workload(args.conversations, seed=args.seed, context_chars=args.context_chars)
    expected = count_requests(workload)
    ways = [Way(name, new_paths) for name, new_paths in WAYS]
    print(
        f"{args.conversations} conversations, {expected} requests "
        f"({expected / len(workload):.2f} turns each), {args.context_chars} chars of context, "
        f"concurrency {args.concurrency}, {args.rounds} rounds; {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}"
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nbllm-ckpt-bench-", dir=args.dir) as tmp:
        root = Path(tmp)
        log = RequestLog(root / "server.jsonl")
        with start_subprocess(latency=0.0, log_path=log.path) as server:
            # Warm up: imports, connections, and the server, which sees every conversation
            # once before anything is timed; then each way once on a few conversations.
            run_nbllm(server.url, workload, args.concurrency, Paths())
            for _, new_paths in WAYS:
                run_nbllm(server.url, workload[:4], args.concurrency, new_paths(root / "warm"))
                (root / "warm" / "cache.sqlite").unlink(missing_ok=True)
                for p in (root / "warm" / "checkpoint").glob("*"):
                    p.unlink()
            for r in range(args.rounds):
                order = ways[r % len(ways) :] + ways[: r % len(ways)]
                for way in order:
                    folder = root / f"round{r}-{way.name.replace('+', '-')}"
                    measure(way, server.url, workload, args.concurrency, folder, log, server.pid)
                    print(
                        f"  round {r + 1}: {way.name:<11} {way.rates[-1]:>8,.0f} req/s",
                        flush=True,
                    )
            ckpt, both = ways[1].last, ways[2].last
            assert ckpt is not None and both is not None
            reruns = {
                "resume (checkpoint, all resumed)": rerun(
                    "resume", server.url, workload, args.concurrency, ckpt, log, args.reruns
                ),
                "cache hits (checkpoint=False)": rerun(
                    "cache hits",
                    server.url,
                    workload,
                    args.concurrency,
                    Paths(cache=both.cache),
                    log,
                    args.reruns,
                ),
            }
    figures = report(ways, reruns, expected, args)
    print(f"\ntotal time {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
