"""Two processes, one provider limit: how much of it do they get together, and with how many 429s?

A test server (in this process's threads) admits at most ``R`` requests in any sliding window of
``--window`` seconds and answers 429 beyond. Two child processes each run ``--turns``
one-turn conversations against it with ``rpm=R`` (per the same window), at once:

- ``shared``: both with ``redis_url`` pointing at one real ``redis-server`` (started here on a
  free loopback port, no persistence), so they share one budget. Target: goodput >= 0.9 R and
  zero 429s.
- ``separate``: the same without Redis, each keeping its own ``rpm=R``: together they ask for
  2 R, and the server's 429s (each retried) show it;
- ``alone``: one process asking for both shares with its local ``rpm=R``: the local limiter's
  own goodput, the baseline for ``shared``.

Goodput is the share of R the two got: the least time a smoothed client needs for the requests
answered (one second's worth of R at once, then R per window) over the time they took, from the
first answered request to the last. "busiest" is the most admitted in any window.
Needs Debian's ``redis-server`` on PATH and ``pip install redis``.

Run: ``python benchmarks/shared_quota.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nbllm.testing import TestServer

CHILD = r"""
import asyncio, json, sys
import nbllm
from nbllm import Conversation
from nbllm.executor import Executor

url, redis_url, rate, window, turns, prefix = sys.argv[1:7]
async def main():
    convs = [Conversation(id=f"{prefix}{i}", questions=(f"{prefix} q{i}",))
             for i in range(int(turns))]
    async with nbllm.engines.OpenAIEngine(url) as engine:
        ex = Executor(engine, model="nbllm-test", concurrency=16, rpm=float(rate),
                      rate_window_s=float(window), redis_url=redis_url or None,
                      retry=nbllm.RetryPolicy(retries=20, initial=0.05, maximum=0.5))
        result = await ex.run(convs)
    s = result.summary
    print(json.dumps({"ok": s.turns_ok, "retries": s.retries, "wall_s": s.wall_s}))
asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_redis(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not on PATH (bash tools/test.sh installs it)")
    port = free_port()
    args = [binary, "--save", "", "--appendonly", "no", "--port", str(port)]
    args += ["--bind", "127.0.0.1", "--dir", str(folder)]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process, f"redis://127.0.0.1:{port}/0"
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                sys.exit("redis-server did not start")
            time.sleep(0.02)


def one(mode: str, redis_url: str, rate: int, window: float, turns: int) -> dict[str, float]:
    with TestServer(rpm=rate, window_s=window) as server:
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        shared = redis_url if mode == "shared" else ""
        argv = [sys.executable, "-c", CHILD, server.url, shared, str(rate), str(window)]
        # "alone": one process asks for both shares, the local limiter's own baseline.
        shares = [(2 * turns, "a")] if mode == "alone" else [(turns, "a"), (turns, "b")]
        children = [
            subprocess.Popen([*argv, str(n), prefix], stdout=subprocess.PIPE, env=env, text=True)
            for n, prefix in shares
        ]
        outs = [json.loads(child.communicate(timeout=600)[0]) for child in children]
        entries = list(server.requests)
    admitted = sorted(e.t for e in entries if e.status == 200)
    rejected = sum(1 for e in entries if e.status == 429)
    # The limit's steady rate is R per window; nbllm's limiters (local or shared) let one
    # second's worth (R / window) go at once and smooth the rest, so the fastest they can
    # answer N requests is (N - R / window) / (R / window) seconds.
    span = admitted[-1] - admitted[0] if len(admitted) > 1 else 0.0
    per_s = rate / window
    goodput = (len(admitted) - per_s) / per_s / span if span > 0 else 0.0
    busiest = max(bisect.bisect_right(admitted, t + window) - i for i, t in enumerate(admitted))
    return {
        "busiest_window": busiest,
        "ok": sum(o["ok"] for o in outs),
        "requests": len(entries),
        "429s": rejected,
        "goodput_of_R": goodput,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=40, help="R: requests per window")
    parser.add_argument("--window", type=float, default=4.0, help="the window, in seconds")
    parser.add_argument("--turns", type=int, default=120, help="conversations per process")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    args = parser.parse_args()
    if args.quick:
        args.rate, args.window, args.turns = 20, 2.0, 30
    with tempfile.TemporaryDirectory() as folder:
        redis, url = start_redis(Path(folder))
        try:
            print(f"R = {args.rate} per {args.window:g} s, two processes x {args.turns} requests")
            print(f"{'mode':<10} {'ok':>5} {'requests':>9} {'429s':>6} {'goodput/R':>10} busiest")
            rows = {}
            for mode in ("shared", "separate", "alone"):
                r = rows[mode] = one(mode, url, args.rate, args.window, args.turns)
                line = f"{mode:<10} {r['ok']:>5} {r['requests']:>9} {r['429s']:>6}"
                print(f"{line} {r['goodput_of_R']:>10.3f} {r['busiest_window']:>7}")
        finally:
            redis.kill()
            redis.wait()
    shared = rows["shared"]
    ok = shared["goodput_of_R"] >= 0.90 and shared["429s"] == 0
    print(
        f"shared goodput/R {shared['goodput_of_R']:.3f}, {shared['429s']} 429s   "
        f"target >= 0.90 with 0 429s  {'PASS' if ok else 'MISS'}"
    )


if __name__ == "__main__":
    main()
