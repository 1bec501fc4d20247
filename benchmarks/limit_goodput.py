"""How much of a provider's limit does nbllm get, with the limit given and with ``rpm="auto"``?

The nbllm test server (a child process) admits at most ``R`` requests in any sliding window
of ``--window`` seconds and answers 429 beyond (with ``x-ratelimit-limit-requests`` /
``-remaining-requests`` and a ``Retry-After`` of ``--retry-after`` seconds). The "minute" of
rpm is shrunk to that window on both sides: ``Executor(rate_window_s=window)`` here,
``window_s`` on the server. Each way sends ``--windows`` x R one-turn conversations, so a run
lasts several windows, through ``Executor(OpenAIEngine(url), rpm=..., concurrency=32)``:

- ``fixed``: ``rpm=R``, the limit given. Target: achieved >= 0.95 R and zero 429s.
- ``auto``: ``rpm="auto"``, no ceiling (it starts at 60 per window).
- ``auto max=2R``: ``rpm="auto", max_rpm=2R`` (it starts at R, half the ceiling).
- ``... no headers``: the same two with the server's ``x-ratelimit-*`` headers hidden from
  nbllm (an engine that drops them), as a provider that does not send them: the limit is
  found from 429s alone.

Target for every ``auto`` way: achieved >= 0.85 R and 429s under 5 % of the requests sent.

"achieved / R" is the answered requests over the client's wall time (from the run's start to
its last answer), as a share of R per window. "settled / R" counts the server's admissions
in the whole windows after the first, per window, as a share of R: the rate the run held once
past its start. 429s and requests are counted from the server's request log (every attempt,
retries included). The server's window is sliding, so a client that sends a window's worth
at once every window may do a little better than R per window over a short run; nbllm's
limiter paces the rest after one second's worth at once.

Run: ``python benchmarks/limit_goodput.py`` (``--quick`` for a smoke run, ``--json PATH``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

MODEL = "nbllm-test"
CONCURRENCY = 32


@dataclass(frozen=True)
class Way:
    name: str
    auto: bool
    max_rpm_factor: float | None = None  # max_rpm = factor x R
    headers: bool = True  # whether nbllm sees the server's x-ratelimit-* headers

    @property
    def min_ratio(self) -> float:
        return 0.85 if self.auto else 0.95

    @property
    def max_429_share(self) -> float:
        return 0.05 if self.auto else 0.0

    def target(self) -> str:
        if self.auto:
            return f">= {self.min_ratio:.2f}, 429s < {self.max_429_share:.0%}"
        return f">= {self.min_ratio:.2f}, 0 429s"


WAYS = (
    Way("fixed rpm=R", auto=False),
    Way("auto", auto=True),
    Way("auto max=2R", auto=True, max_rpm_factor=2.0),
    Way("auto no headers", auto=True, headers=False),
    Way("auto max=2R no headers", auto=True, max_rpm_factor=2.0, headers=False),
)


def headerless_engine(url: str, connections: int) -> Any:
    """An OpenAIEngine that hides the provider's ``x-ratelimit-*`` headers from nbllm."""
    from nbllm.engines import OpenAIEngine
    from nbllm.errors import RateLimitError

    class HeaderlessEngine(OpenAIEngine):
        async def _complete(self, request: Any) -> Any:
            response = await super()._complete(request)
            return replace(response, rate_limits=None)

        def _error(self, status: int, raw: bytes, headers: Any) -> Any:
            error = super()._error(status, raw, headers)
            if isinstance(error, RateLimitError):
                error.rate_limits = None
            return error

    return HeaderlessEngine(url, max_connections=connections)


def run_way(way: Way, url: str, *, rate: int, window: float, n: int) -> dict[str, Any]:
    """One run of ``n`` one-turn conversations; the client's figures."""
    import nbllm
    from nbllm import Conversation
    from nbllm.engines import OpenAIEngine

    convs = [Conversation(id=f"c{i}", questions=(f"question {i}",)) for i in range(n)]
    max_rpm = way.max_rpm_factor * rate if way.max_rpm_factor else None

    async def main() -> dict[str, Any]:
        if way.headers:
            engine = OpenAIEngine(url, max_connections=CONCURRENCY)
        else:
            engine = headerless_engine(url, CONCURRENCY)
        executor = nbllm.Executor(
            engine,
            model=MODEL,
            rpm="auto" if way.auto else rate,
            max_rpm=max_rpm,
            concurrency=CONCURRENCY,
            timeout=120.0,
            rate_window_s=window,
            # Enough tries that a run of 429s never leaves a turn unanswered.
            retry=nbllm.RetryPolicy(retries=30, initial=0.05, maximum=1.0),
        )
        try:
            t0 = time.perf_counter()
            result = await executor.run(convs)
            wall = time.perf_counter() - t0
        finally:
            await engine.aclose()
        control = executor.limits.adaptive.get("rpm")
        history = [] if control is None else [round(limit, 1) for _, limit in control.history]
        return {
            "wall_s": wall,
            "turns_ok": result.summary.turns_ok,
            "retries": result.summary.retries,
            "limit_history": history,
        }

    return asyncio.run(main())


def settled_ratio(admitted: Sequence[float], rate: int, window: float) -> float | None:
    """Admissions per whole window after the first, as a share of R (None: too short a run).

    Whole windows, counted from the first admission, so that a limiter that lets a window's
    worth go in a bunch is not flattered or punished by where a span happens to cut it.
    """
    if len(admitted) < 2:
        return None
    start = admitted[0] + window
    whole = int((admitted[-1] - admitted[0]) // window) - 1
    if whole < 1:
        return None
    end = start + whole * window
    count = sum(1 for t in admitted if start <= t < end)
    return count / (whole * rate)


def run_config(
    way: Way, *, rate: int, window: float, n: int, latency: float, retry_after: float
) -> dict[str, Any]:
    from nbllm.testing import read_log, start_subprocess

    with tempfile.TemporaryDirectory(prefix="nbllm-bench-") as tmp:
        log_path = Path(tmp) / "requests.jsonl"
        with start_subprocess(
            latency=latency, rpm=rate, window_s=window, retry_after=retry_after, log_path=log_path
        ) as server:
            client = run_way(way, server.url, rate=rate, window=window, n=n)
        log = read_log(log_path)
    statuses = Counter(entry.status for entry in log)
    per_window = rate / window  # R per window, in requests per second
    admitted = sorted(entry.t for entry in log if entry.status == 200)
    settled = settled_ratio(admitted, rate, window)
    requests = len(log)
    rejected = statuses.get(429, 0)
    ratio = client["turns_ok"] / client["wall_s"] / per_window
    share = rejected / requests if requests else 0.0
    ok = (
        client["turns_ok"] == n
        and ratio >= way.min_ratio
        and (share < way.max_429_share if way.auto else rejected == 0)
    )
    return {
        "way": way.name,
        "rpm": "auto" if way.auto else rate,
        "max_rpm": way.max_rpm_factor * rate if way.max_rpm_factor else None,
        "headers_seen": way.headers,
        "R": rate,
        "window_s": window,
        "conversations": n,
        "requests": requests,
        "server_statuses": dict(sorted(statuses.items())),
        "429s": rejected,
        "share_429": share,
        "achieved_over_R": ratio,
        "settled_over_R": settled,
        "target": way.target(),
        "pass": ok,
        **client,
    }


def report(rows: Sequence[dict[str, Any]]) -> bool:
    print()
    print(
        f"{'config':<24} {'requests':>8} {'wall s':>7} {'achieved/R':>10} {'settled/R':>9} "
        f"{'429s':>5} {'429 share':>9}  {'target':<23} verdict"
    )
    for row in rows:
        settled = row["settled_over_R"]
        settled_text = f"{settled:>9.3f}" if settled is not None else f"{'-':>9}"
        print(
            f"{row['way']:<24} {row['requests']:>8} {row['wall_s']:>7.2f} "
            f"{row['achieved_over_R']:>10.3f} {settled_text} "
            f"{row['429s']:>5} {row['share_429']:>9.1%}  {row['target']:<23} "
            f"{'PASS' if row['pass'] else 'MISS'}"
        )
    print("\nlimit in force over the run (per window; auto ways):")
    for row in rows:
        history = row["limit_history"]
        if history:
            shown = history if len(history) <= 16 else [*history[:8], "...", *history[-7:]]
            text = " ".join(str(x) for x in shown)
            print(f"  {row['way']:<24} {len(history) - 1:>3} changes: {text}")
    return all(row["pass"] for row in rows)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, help="R: requests per window (120; 40 with --quick)")
    parser.add_argument(
        "--window", type=float, help="the window ('minute'), seconds (6; 2 with --quick)"
    )
    parser.add_argument("--windows", type=float, help="requests = this x R (8; 4 with --quick)")
    parser.add_argument("--latency", type=float, default=0.05, help="server latency, seconds")
    parser.add_argument(
        "--retry-after", type=float, default=1.0, help="the server's Retry-After on a 429, s"
    )
    parser.add_argument(
        "--only", choices=[w.name for w in WAYS], action="append", help="run only these"
    )
    parser.add_argument("--quick", action="store_true", help="R = 40 per 2 s, 4 windows")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    defaults = (40, 2.0, 4.0) if args.quick else (120, 6.0, 8.0)
    for name, value in zip(("rate", "window", "windows"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    ways = [w for w in WAYS if not args.only or w.name in args.only]
    n = round(args.windows * args.rate)
    print(
        f"R = {args.rate} per {args.window:g} s window, {n} requests per run, latency "
        f"{args.latency:g} s, Retry-After {args.retry_after:g} s, concurrency {CONCURRENCY}; "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    started = time.perf_counter()
    rows = []
    for way in ways:
        row = run_config(
            way,
            rate=args.rate,
            window=args.window,
            n=n,
            latency=args.latency,
            retry_after=args.retry_after,
        )
        print(
            f"  {row['way']:<24} wall {row['wall_s']:6.2f} s  achieved/R "
            f"{row['achieved_over_R']:.3f}  429s {row['429s']}",
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
