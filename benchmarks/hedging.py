"""How much tail latency does ``ensemble="first"`` (hedged requests) cut?

Two nbllm test servers, each a child process of its own, answer after a lognormal delay
(median ``--median`` s, shape ``--sigma``; each server draws its own, independently: a
provider whose answers are sometimes slow). The same multi-turn conversations go three
ways, several rounds, in a new order each round:

``alone-a``   ``nbllm.run(..., model="a", router=[a, b])``: every turn to server a;
``alone-b``   the same with ``model="b"``;
``first``     ``model=["a", "b"], ensemble="first"``: every turn to both; the first answer
              is kept and is the next turn's history, the other request is cancelled.

A turn's latency is the time from its being ready (its conversation's earlier turn
answered) to its answer: ``queue_s + service_s`` of its row. The script prints each way's
turn p50 / p95 / p99 (median over rounds) and the p95 gain of ``first`` against each
single server, with the issue's target::

    1 - p95(first) / p95(alone)  >= 0.30   (against a and against b)

It also prints, from the ``first`` runs themselves, ``result.summary.ensemble``: how often
each server's answer was kept, and its own turn p95 inside the ensemble, a lower bound (a
withdrawn request counts the winner's time): the separate ``alone`` runs are what measure
the gain.

The client shares this machine's cores with both servers, and hedging doubles the requests:
with many more conversations at once (200 here on 2 cores) the client's CPU, not the
servers' latency, sets the pace, and hedging loses. The default load (80 conversations,
median 0.1 s) keeps the client below that.

Run: ``python benchmarks/hedging.py`` (``--quick`` for a smoke run, ``--json PATH`` to
keep the figures).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from typing import Any

TARGET = 0.30


def _workload(n: int, turns: int) -> list[dict[str, Any]]:
    return [
        {"id": i, "turns": [f"Turn {k} of conversation {i}: what changed?" for k in range(turns)]}
        for i in range(n)
    ]


def _percentiles(result: Any) -> dict[str, float]:
    from nbllm.results import percentile

    df = result.df
    assert df["error"].isna().all(), df["error"].dropna().tolist()[:3]
    seconds = sorted(float(v) for v in (df["queue_s"] + df["service_s"]))
    return {f"p{q}": percentile(seconds, q / 100) or 0.0 for q in (50, 95, 99)}


def _run(data: list[dict[str, Any]], router: list[dict[str, Any]], **options: Any) -> Any:
    import nbllm

    # A slot for every conversation (per model): the turns never wait for one, so a turn's
    # time is the servers' latency and the client's own.
    return nbllm.run(
        data, router=router, concurrency=len(data), checkpoint=False, cache=False,
        progress=False, **options,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer conversations and rounds")
    parser.add_argument("--json", metavar="PATH", help="write the figures here")
    parser.add_argument("--median", type=float, default=0.1, help="seconds (default 0.1)")
    parser.add_argument("--sigma", type=float, default=0.8, help="lognormal shape (0.8)")
    args = parser.parse_args()
    n, turns, rounds = (40, 3, 2) if args.quick else (80, 4, 5)

    from nbllm.testing.launcher import start_subprocess

    ways = {
        "alone-a": {"model": "a"},
        "alone-b": {"model": "b"},
        "first": {"model": ["a", "b"], "ensemble": "first"},
    }
    figures: dict[str, list[dict[str, float]]] = {way: [] for way in ways}
    in_run: list[dict[str, Any]] = []
    latency = {"latency": args.median, "latency_sigma": args.sigma, "shared_history": True}
    with (
        start_subprocess(seed=1, **latency) as a,
        start_subprocess(seed=2, **latency) as b,
    ):
        router = [
            {"model_name": name, "litellm_params": {"model": "openai/m", "api_base": s.url}}
            for name, s in (("a", a), ("b", b))
        ]
        data = _workload(n, turns)
        _run(data[:20], router, model="a")  # warm up: connections, imports
        order = list(ways)
        for r in range(rounds):
            random.Random(r).shuffle(order)
            for way in order:
                result = _run(data, router, **ways[way])
                figures[way].append(_percentiles(result))
                if way == "first":
                    in_run.append(result.summary.ensemble.set_index("model").to_dict("index"))
                p = figures[way][-1]
                print(
                    f"  round {r + 1}: {way:<8} p50 {p['p50']:.3f}  p95 {p['p95']:.3f}  "
                    f"p99 {p['p99']:.3f} s",
                    flush=True,
                )
    medians = {
        way: {q: statistics.median(f[q] for f in rows) for q in ("p50", "p95", "p99")}
        for way, rows in figures.items()
    }
    print(
        f"\n{n} conversations x {turns} turns per run, {rounds} rounds, concurrency {n}; "
        f"each server lognormal, median {args.median} s, sigma {args.sigma}"
    )
    print(f"{'way':<8} {'turn p50':>9} {'turn p95':>9} {'turn p99':>9}   (seconds, median)")
    for way, m in medians.items():
        print(f"{way:<8} {m['p50']:9.3f} {m['p95']:9.3f} {m['p99']:9.3f}")
    gains = {}
    for alone in ("alone-a", "alone-b"):
        gains[alone] = 1.0 - medians["first"]["p95"] / medians[alone]["p95"]
        verdict = "PASS" if gains[alone] >= TARGET else "MISS"
        print(
            f"p95 gain of first against {alone}: {gains[alone]:.1%}   "
            f"target >= {TARGET:.0%}  {verdict}"
        )
    print(
        "\nin the same run (result.summary.ensemble, median over rounds; a withdrawn request "
        "counts the winner's time, so these are lower bounds, near 0 by construction when "
        "both servers win often):"
    )
    for name in ("a", "b"):
        p95 = statistics.median(run[name]["turn_p95"] for run in in_run)
        gain = statistics.median(run[name]["gain_p95"] for run in in_run)
        kept = statistics.median(run[name]["kept"] / run["ensemble"]["turns"] for run in in_run)
        print(f"  {name}: turn p95 >= {p95:.3f} s, kept {kept:.0%} of turns, gain >= {gain:.1%}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"rounds": figures, "medians": medians, "gains": gains}, f)


if __name__ == "__main__":
    main()
