"""What does validating structured answers cost, next to plain answers?

Single-turn conversations go to a zero-latency nbllm test server in a child process, so
that the client's own CPU time per request is what limits throughput, three ways, several
rounds, alternating:

``plain``     ``nbllm.run(...)``: the answer is kept as text;
``schema``    ``response_format=Answer`` (a pydantic model of four fields): the server
              answers JSON that follows it, nbllm finds the object in each answer, validates
              it and stores the dict in ``parsed``;
``number``    ``parse="number"``: nbllm reads the number of each prose answer.

It prints requests/s per way (median and every round) and their ratios. ``schema`` also
sends the schema in every request and gets longer answers back, so its ratio holds more than
parsing; the issue's target (parsing and validation cost < 5 % of zero-latency throughput)
is therefore checked on parsing alone too: the client CPU time of ``Parser.parse`` on the
server's answers (timed over many calls) against the client's time per plain request::

    parse time / plain request time  < 0.05   (schema, number)

Run: ``python benchmarks/parsing_cost.py`` (``--quick`` for a smoke run, ``--json PATH`` to
keep the figures).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

TARGET = 0.95


def _workload(n: int) -> list[dict[str, Any]]:
    return [
        {"id": i, "turns": [f"What was revenue in year {2000 + i % 20}? ({i})"]} for i in range(n)
    ]


def _run(url: str, data: list[dict[str, Any]], **options: Any) -> float:
    import nbllm

    t0 = time.perf_counter()
    result = nbllm.run(
        data,
        model="openai/test-model",
        api_base=url,
        concurrency=32,
        checkpoint=False,
        cache=False,
        progress=False,
        **options,
    )
    wall = time.perf_counter() - t0
    assert result.summary.turns_ok == len(data), result.verdict
    if options:
        assert result.df["parsed"].notna().all()
    return len(data) / wall


def _answer(url: str, schema: Any) -> str:
    """One answer of the server to a request with ``response_format=schema``."""
    import nbllm

    result = nbllm.run(
        _workload(1), model="openai/test-model", api_base=url, response_format=schema,
        checkpoint=False, cache=False, progress=False,
    )  # fmt: skip
    return str(result.df["answer"].iloc[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and rounds")
    parser.add_argument("--json", metavar="PATH", help="write the figures here")
    args = parser.parse_args()
    n, rounds = (300, 2) if args.quick else (1500, 5)

    from pydantic import BaseModel

    from nbllm.parsing import make_parser
    from nbllm.testing.launcher import start_subprocess

    class Answer(BaseModel):
        answer: str
        year: int
        amount: float
        confident: bool

    ways = {"plain": {}, "schema": {"response_format": Answer}, "number": {"parse": "number"}}
    rates: dict[str, list[float]] = {way: [] for way in ways}
    with start_subprocess(latency=0.0) as server:
        data = _workload(n)
        _run(server.url, data[:100])  # warm up: connections, imports
        sample = {
            "schema": _answer(server.url, Answer),
            "number": "Revenue was $1,234.5 million in 2020, up 14 %.",
        }
        for r in range(rounds):
            for way, options in ways.items():
                rate = _run(server.url, data, **options)
                rates[way].append(rate)
                print(f"  round {r + 1}: {way:<7} {rate:8,.0f} req/s", flush=True)
    medians = {way: statistics.median(values) for way, values in rates.items()}
    print(f"\n{n:,} single-turn requests per run, {rounds} rounds, concurrency 32")
    print(f"{'way':<8} {'median req/s':>13}  rounds")
    for way, values in rates.items():
        print(f"{way:<8} {medians[way]:13,.0f}  {' '.join(f'{v:,.0f}' for v in values)}")
    ratios = {way: medians[way] / medians["plain"] for way in ("schema", "number")}
    for way, ratio in ratios.items():
        print(f"{way}/plain req/s  {ratio:.3f}   (reported: sends and receives more too)")
    per_request = 1.0 / medians["plain"]
    shares = {}
    for way, parser in (("schema", make_parser(Answer)), ("number", make_parser(parse="number"))):
        text = sample[way]
        calls = 20_000
        t0 = time.perf_counter()
        for _ in range(calls):
            parser.parse(text)  # type: ignore[union-attr]
        cost = (time.perf_counter() - t0) / calls
        shares[way] = cost / per_request
        verdict = "PASS" if shares[way] < 1 - TARGET else "MISS"
        print(
            f"{way}: parse {cost * 1e6:6.1f} µs per answer = {shares[way]:.1%} of a plain "
            f"request's {per_request * 1e6:,.0f} µs   target < {1 - TARGET:.0%}  {verdict}"
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            figures = {"requests": n, "rounds": rates, "medians": medians, "ratios": ratios}
            json.dump({**figures, "parse_share": shares}, f)


if __name__ == "__main__":
    main()
