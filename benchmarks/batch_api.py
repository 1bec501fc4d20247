"""Wall time of a ConvFinQA-shaped multi-turn run through a batch API, against its bound.

The test server (``nbllm.testing.TestServer``) serves OpenAI's ``/v1/files`` and
``/v1/batches`` and answers every batch ``--delay`` seconds after it was created. A batch
API answers a whole wave of turns at once, but turn k+1 of a conversation cannot be asked
before turn k's answer is back, so no schedule beats::

    lower bound = (the longest conversation's turns) x delay

nbllm puts every ready turn into one batch (turn 0 of every conversation, then, as each
batch ends, the next turn of every conversation it answered), so a run should take about
that, plus per wave the time it gathers the next requests (``gather_s``, 0.25 s) and half
a poll (``--poll``). Asking each conversation's turns in its own batches one after the
other would take (turns of all conversations) x delay / (batches in flight).

The workload is ``benchmarks/multi_turn_wall.py``'s: 421 conversations of 1 to 8 turns
(most 2 to 4), 1,490 turns. The figures printed: the wall time (median of ``--repeats``),
the bound, their ratio, and the batches and lines the server saw (lines = turns: nothing
was asked twice; no live request).

Run: ``python benchmarks/batch_api.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from multi_turn_wall import make_workload

import nbllm
from nbllm.config import RunConfig
from nbllm.testing import TestServer

TARGET = 1.25  # wall / lower bound, with a 2 s delay (a real one is minutes to hours)


def one_run(data: list[dict], delay: float, poll: float) -> tuple[float, dict, int]:
    with TestServer(batch_delay_s=delay) as server:
        t0 = time.perf_counter()
        result = nbllm.run(
            data, model="nbllm-test", api_base=server.url, batch_api=True, batch_poll_s=poll,
            checkpoint=False, cache=False, progress=False,
        )  # fmt: skip
        wall = time.perf_counter() - t0
        turns = sum(len(c["turns"]) for c in data)
        assert result.summary.turns_ok == turns, result.summary
        assert server.history_errors == 0 and not server.requests
        return wall, server.stats(), len(server.batch_requests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=2.0, help="seconds a batch takes")
    parser.add_argument("--poll", type=float, default=0.05, help="seconds between polls")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a quarter of the workload, once")
    args = parser.parse_args()
    data = make_workload(0, 0.25 if args.quick else 1.0)
    repeats = 1 if args.quick else args.repeats
    turns = sum(len(c["turns"]) for c in data)
    longest = max(len(c["turns"]) for c in data)
    bound = longest * args.delay
    print(f"nbllm {nbllm.__version__} · Python {platform.python_version()} · {os.cpu_count()} CPUs")
    print(
        f"{len(data)} conversations, {turns:,} turns, the longest {longest} turns; "
        f"batch delay {args.delay:g} s, poll {args.poll:g} s"
    )
    walls = []
    for i in range(repeats):
        wall, stats, lines = one_run(data, args.delay, args.poll)
        walls.append(wall)
        print(
            f"  run {i + 1}: {wall:.2f} s, {stats['batches_created']} batches, "
            f"{lines:,} lines (turns {turns:,})"
        )
    wall = statistics.median(walls)
    ratio = wall / bound
    print(f"wall (median)        {wall:8.2f} s")
    print(f"lower bound          {bound:8.2f} s  (longest conversation's turns x delay)")
    print(f"wall / lower bound   {ratio:8.2f}   target <= {TARGET:.2f} at a 2 s delay: "
          f"{'PASS' if ratio <= TARGET or args.delay != 2.0 else 'MISS'}")  # fmt: skip
    in_flight = RunConfig.model_fields["max_batches"].default
    print(
        f"one conversation's turns after another, {in_flight} batches in flight: "
        f"{turns * args.delay / in_flight:,.0f} s"
    )


if __name__ == "__main__":
    main()
