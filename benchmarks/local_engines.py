"""Tokens per second of each installed local engine: the dynamic batcher against a plain loop.

For each installed CPU engine (torch, onnx, deepspeed; vllm on a GPU) and for 1, 4, 8 and
16 conversations at once, the same two-turn conversations (turn 2 carries turn 1's real
answer) on the embedded SmolLM2-135M-Instruct, greedy, a fixed ``max_tokens``, are
answered two ways, side by side in one process:

``plain``    a plain loop: one request at a time, straight into the engine's model call
             (``engine._generate([prompt])``: no batcher, no executor);
``nbllm``    ``nbllm.run(convs, engine=<that engine object>, concurrency=N)``: the executor
             keeps N conversations in flight and the dynamic batcher generates them together.

It prints generated tokens per second for both, and the ratio nbllm / plain, which must
never fall below 1.0 (the batcher may never make things slower) and should approach the
machine's batch speed-up as N grows. Both ways produce the same greedy answers (checked).

Run: ``python benchmarks/local_engines.py`` (``--quick``: N in 1, 4 and 6-token answers;
``--engines torch,onnx`` to choose; ``--json PATH`` to keep the figures).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUESTIONS = [
    ("What is the capital of France?", "And of Italy?"),
    ("What is 12 times 3?", "Now add 4."),
    ("Name a primary colour.", "Name another one."),
    ("Who wrote Hamlet?", "When was he born?"),
    ("What is the boiling point of water?", "And its freezing point?"),
    ("Give me a synonym for happy.", "And an antonym?"),
    ("What is the largest planet?", "How many moons does it have?"),
    ("Translate 'thank you' into French.", "And into Spanish?"),
]


def conversations(n: int) -> list[dict[str, Any]]:
    return [
        {"id": f"c{i}", "turns": list(QUESTIONS[i % len(QUESTIONS)])} for i in range(n)
    ]


def plain_loop(engine: Any, convs: list[dict[str, Any]], max_tokens: int) -> tuple[float, list]:
    """One request at a time straight into the model: (seconds, answers)."""
    from nbllm.engines.local.base import Generation

    generation = Generation(max_new_tokens=max_tokens)
    answers = []
    tokens = 0
    t0 = time.perf_counter()
    for conv in convs:
        messages: list[dict[str, str]] = []
        for question in conv["turns"]:
            messages.append({"role": "user", "content": question})
            new_ids = engine._generate([engine.encode(messages)], generation)[0]
            tokens += len(new_ids)
            answer = engine.decode(new_ids)
            answers.append(answer)
            messages.append({"role": "assistant", "content": answer})
    return time.perf_counter() - t0, [tokens, answers]


def through_nbllm(engine: Any, convs: list[dict[str, Any]], max_tokens: int) -> tuple[float, list]:
    import nbllm

    t0 = time.perf_counter()
    result = nbllm.run(
        convs,
        engine=engine,
        model="SmolLM2-135M-Instruct",
        concurrency=len(convs),
        max_tokens=max_tokens,
        checkpoint=False,
        cache=False,
        progress=False,
    )
    wall = time.perf_counter() - t0
    df = result.df
    assert df["error"].isna().all(), df["error"].dropna().tolist()
    return wall, [int(df["completion_tokens"].sum()), list(df["answer"])]


def load(name: str, batch_size: int) -> Any:
    from nbllm.engines.local import create_local_engine

    return create_local_engine(name, None, batch_size=batch_size, batch_wait_s=0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--engines", default=None, help="comma-separated (default: usable ones)")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=1, help="rounds per figure (median)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from nbllm.engines import available, hardware

    sizes = [1, 4] if args.quick else [1, 4, 8, 16]
    max_tokens = args.max_tokens or (6 if args.quick else 24)
    table = available()
    usable = [row.engine for row in table.itertuples() if row.usable]
    names = args.engines.split(",") if args.engines else usable
    print(f"# {platform.platform()} python {sys.version.split()[0]}")
    print(f"# {hardware()}".replace("\n", "; "))
    print(f"# engines: {', '.join(names)}; max_tokens {max_tokens}; two turns per conversation")
    print()
    print(f"{'engine':10} {'N':>3} {'plain tok/s':>12} {'nbllm tok/s':>12} {'ratio':>6}  same")
    figures = []
    for name in names:
        t_load = time.perf_counter()
        engine = load(name, batch_size=max(sizes))
        load_s = time.perf_counter() - t_load
        engine._generate([engine.encode([{"role": "user", "content": "Hi"}])], _gen(2))  # warm
        for n in sizes:
            convs = conversations(n)
            plain_rates, nbllm_rates = [], []
            same = True
            for _ in range(args.repeats):
                wall, (tokens, plain_answers) = plain_loop(engine, convs, max_tokens)
                plain_rates.append(tokens / wall)
                wall, (tokens, nbllm_answers) = through_nbllm(engine, convs, max_tokens)
                nbllm_rates.append(tokens / wall)
                same = same and _same(plain_answers, nbllm_answers, convs)
            plain, ours = statistics.median(plain_rates), statistics.median(nbllm_rates)
            print(f"{name:10} {n:>3} {plain:>12.1f} {ours:>12.1f} {ours / plain:>6.2f}  {same}")
            figures.append(
                {
                    "engine": name,
                    "conversations": n,
                    "plain_tokens_per_s": plain,
                    "nbllm_tokens_per_s": ours,
                    "ratio": ours / plain,
                    "same_answers": same,
                    "load_s": load_s,
                }
            )
        asyncio.run(engine.aclose())
        print(f"{name:10} loaded in {load_s:.1f} s ({engine.describe()})")
    worst = min(f["ratio"] for f in figures)
    print()
    print(f"lowest nbllm / plain ratio: {worst:.2f} (must be >= 1.0)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


def _gen(tokens: int) -> Any:
    from nbllm.engines.local.base import Generation

    return Generation(max_new_tokens=tokens)


def _same(plain: list[str], ours: list[str], convs: list[dict[str, Any]]) -> bool:
    # nbllm's rows come in input order: conversation by conversation, turn by turn.
    return [a.strip() for a in plain] == [str(a).strip() for a in ours]


if __name__ == "__main__":
    main()
