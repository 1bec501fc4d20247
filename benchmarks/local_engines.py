"""Tokens per second of each installed local engine: the dynamic batcher against a plain loop.

For each installed engine but vllm (torch, onnx, deepspeed with the dynamic batcher;
llamacpp, which answers one request at a time) and for 1, 4, 8 and
16 conversations at once, the same two-turn conversations (turn 2 carries turn 1's real
answer) on the embedded SmolLM2-135M-Instruct, greedy, a fixed ``max_tokens``, are
answered two ways, side by side in one process:

``plain``    a plain loop: one request at a time, straight into the engine's model call
             (``engine._generate([prompt])``: no batcher, no executor);
``nbllm``    ``nbllm.run(convs, engine=<that engine object>, concurrency=N)``: the executor
             keeps N conversations in flight and the dynamic batcher generates them together.

Each figure is the median of ``--repeats`` rounds; every other round runs nbllm first.

It prints generated tokens per second for both, and the ratio nbllm / plain, which must
never fall below 1.0 (the batcher may never make things slower) and should approach the
machine's batch speed-up as N grows. Both ways produce the same greedy answers (checked).

Two more parts measure the torch engine's own scheduling, each side by side in one process:

``prefix``      8 conversations x 3 turns, each with the same ~2 KB document in its system
                message: generated tokens per second with the prefix cache and without it
                (``prefix_cache=False``), both batched continuously; target >= 2x, and the
                greedy answers must be identical;
``continuous``  16 requests at once whose ``max_tokens`` run from 8 to 128 (prompts the model
                answers at length): continuous batching against the static batcher
                (``continuous=False``: transformers' ``generate`` per fixed batch), same
                ``batch_size``; target >= 1.3x, identical greedy answers. The static
                batcher cannot put requests with different ``max_tokens`` in one batch, so
                a second line asks 16 questions with one ``max_tokens`` (128) whose answers
                end unevenly by themselves (short facts and long counts, alternating).

``replicas``    the same multi-turn conversations through ``replicas=1`` and ``replicas=2``
                (worker processes of the torch engine, each with its share of the cores or
                its own GPU; started before timing). On a 2-core machine two replicas share
                the same two cores, so this part is about correctness, not speed, there.

``--gpu`` runs the torch parts on CUDA and adds the vLLM comparison below.

With ``--vllm`` on a GPU with vLLM installed, it also runs the multi-turn comparison: 64
four-turn conversations through nbllm's vllm engine (every conversation moves on to its next
turn as soon as its answer is back) against vLLM's own ``LLM.chat`` called turn by turn
with a barrier across conversations (what people write by hand); target nbllm / LLM.chat
>= 1.2. Without a usable vLLM it says so and skips that part.

Run: ``python benchmarks/local_engines.py`` (``--quick``: N in 1, 4 and 6-token answers;
``--engines torch,onnx`` to choose; ``--parts batching,prefix,continuous,replicas`` to
choose the parts, all by default; ``--json PATH`` to keep the figures).
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
    return [{"id": f"c{i}", "turns": list(QUESTIONS[i % len(QUESTIONS)])} for i in range(n)]


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
            new_tokens, answer = one_request(engine, messages, generation)
            tokens += new_tokens
            answers.append(answer)
            messages.append({"role": "assistant", "content": answer})
    return time.perf_counter() - t0, [tokens, answers]


def one_request(engine: Any, messages: list[dict[str, str]], generation: Any) -> tuple[int, str]:
    """The engine's model answering one chat, called directly: (new tokens, text)."""
    if engine.name == "llamacpp":  # llama.cpp renders the chat itself
        from nbllm.engines.local.llamacpp import _Chat

        answer = engine._run_chat(_Chat(messages, generation))
        text = answer["choices"][0]["message"]["content"] or ""
        return answer["usage"]["completion_tokens"], text.strip()
    new_ids = engine._generate([engine.encode(messages)], generation, _Unwatched())[0]
    return len(new_ids), engine.decode(new_ids)


class _Unwatched:
    """What ``_generate`` reports each step to, for a plain loop: nobody listens, nothing
    is dropped."""

    def generated(self, tokens: int) -> None:
        pass

    def dropped(self) -> list[bool]:
        return [False]


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
    parser.add_argument("--sizes", default=None, help="conversations at once, e.g. 1,4,8,16")
    parser.add_argument("--repeats", type=int, default=1, help="rounds per figure (median)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--vllm", action="store_true", help="the vLLM multi-turn comparison")
    parser.add_argument(
        "--parts", default="batching,prefix,continuous,replicas", help="which parts"
    )
    parser.add_argument("--gpu", action="store_true", help="torch parts on CUDA, and --vllm")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if args.gpu:
        global DEVICE
        DEVICE = "cuda"
        args.vllm = True

    from nbllm.engines import available, hardware

    sizes = [1, 4] if args.quick else [1, 4, 8, 16]
    if args.sizes:
        sizes = [int(n) for n in args.sizes.split(",")]
    max_tokens = args.max_tokens or (6 if args.quick else 24)
    table = available()
    # vllm batches on its own (continuous batching): it has its own comparison, --vllm.
    usable = [row.engine for row in table.itertuples() if row.usable and row.engine != "vllm"]
    names = args.engines.split(",") if args.engines else usable
    print(f"# {platform.platform()} python {sys.version.split()[0]}")
    print(f"# {hardware()}".replace("\n", "; "))
    print(f"# engines: {', '.join(names)}; max_tokens {max_tokens}; two turns per conversation")
    print()
    print(f"{'engine':10} {'N':>3} {'plain tok/s':>12} {'nbllm tok/s':>12} {'ratio':>6}  same")
    figures = []
    for name in names if "batching" in parts else []:
        t_load = time.perf_counter()
        engine = load(name, batch_size=max(sizes))
        load_s = time.perf_counter() - t_load
        one_request(engine, [{"role": "user", "content": "Hi"}], _gen(2))  # warm-up
        for n in sizes:
            convs = conversations(n)
            plain_rates, nbllm_rates = [], []
            same = True
            for repeat in range(args.repeats):
                # Every other round runs nbllm first, so that neither way always goes second.
                ways = [(plain_loop, plain_rates), (through_nbllm, nbllm_rates)]
                answers = []
                for way, rates in ways[:: 1 if repeat % 2 == 0 else -1]:
                    wall, (tokens, got) = way(engine, convs, max_tokens)
                    rates.append(tokens / wall)
                    answers.append(got)
                same = same and _same(*answers)
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
    report: dict[str, Any] = {"batching": figures}
    if figures:
        worst = min(f["ratio"] for f in figures)
        print()
        print(f"lowest nbllm / plain ratio: {worst:.2f}   target >= 1.0  {_verdict(worst >= 1.0)}")
    if "prefix" in parts:
        report["prefix"] = prefix_reuse(args.repeats, quick=args.quick)
    if "continuous" in parts:
        report["continuous"] = continuous_batching(args.repeats, quick=args.quick)
    if "replicas" in parts:
        report["replicas"] = replicas(args.repeats, quick=args.quick)
    if args.vllm:
        report["vllm_multiturn"] = vllm_multiturn()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


TARGET_PREFIX = 2.0
TARGET_CONTINUOUS = 1.3
# About 2 KB of figures, repeated in every conversation's system message.
DOCUMENT = "\n".join(
    f"{year} Q{q}: revenue {100 + 7 * q + 11 * (year - 2020)}m, costs {70 + 5 * q}m, "
    f"headcount {400 + 12 * q + 30 * (year - 2020)}, churn {2 + q % 3}.{q}%"
    for year in range(2018, 2026)
    for q in range(1, 5)
)
DOCUMENT_TURNS = ("What was revenue in the first quarter listed?", "And costs then?", "Summarise.")


DEVICE = "cpu"


def _torch(**options: Any) -> Any:
    from nbllm.engines.local.torch import TorchEngine

    return TorchEngine(batch_size=8, device=DEVICE, **options)


def replicas(repeats: int, *, quick: bool) -> dict[str, Any]:
    """Tokens/s of a multi-turn run on one worker replica and on two."""
    import nbllm
    from nbllm.engines.replicas import shared_replicas

    n = 8 if quick else 16
    convs = conversations(n)
    sets = {count: shared_replicas("torch", None, count) for count in (1, 2)}  # loaded first
    rates: dict[int, list[float]] = {1: [], 2: []}
    answers: dict[int, list[Any]] = {}
    for repeat in range(repeats):
        for count in (1, 2)[:: 1 if repeat % 2 == 0 else -1]:
            t0 = time.perf_counter()
            result = nbllm.run(
                convs, engine="torch", replicas=count, allow_oversubscribe=True,
                concurrency=2 * n, max_tokens=24, checkpoint=False, cache=False, progress=False,
            )  # fmt: skip
            wall = time.perf_counter() - t0
            df = result.df
            assert df["error"].isna().all(), df["error"].dropna().tolist()
            rates[count].append(int(df["completion_tokens"].sum()) / wall)
            answers[count] = list(df["answer"])
    for replica_set in sets.values():
        replica_set.stop()
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    same = answers[1] == answers[2]
    print(
        f"replicas, {n} conversations x 2 turns, on {os.cpu_count()} cores ({DEVICE}): "
        f"{one:.1f} tok/s on 1 replica, {two:.1f} on 2, ratio {two / one:.2f}; same answers: {same}"
    )
    return {"one": one, "two": two, "ratio": two / one, "same_answers": same}


def _run_timed(engine: Any, convs: list[dict[str, Any]], max_tokens: int) -> tuple[float, Any]:
    import nbllm

    t0 = time.perf_counter()
    result = nbllm.run(
        convs, engine=engine, concurrency=len(convs), max_tokens=max_tokens,
        checkpoint=False, cache=False, progress=False,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    df = result.df
    assert df["error"].isna().all(), df["error"].dropna().tolist()
    return int(df["completion_tokens"].sum()) / wall, df


def prefix_reuse(repeats: int, *, quick: bool) -> dict[str, Any]:
    """Tokens/s of a multi-turn run with a shared document, with and without the cache."""
    n = 4 if quick else 8
    convs = [
        {"id": f"d{i}", "system": DOCUMENT, "turns": [f"(ask {i}) {DOCUMENT_TURNS[0]}",
                                                     *DOCUMENT_TURNS[1:]]}
        for i in range(n)
    ]  # fmt: skip
    rates: dict[str, list[float]] = {"cache": [], "no cache": []}
    answers: dict[str, list[Any]] = {}
    engines = {"cache": _torch(), "no cache": _torch(prefix_cache=False)}
    for engine in engines.values():
        _run_timed(engine, [{"id": "w", "turns": ["Hi"]}], 2)  # warm-up
    for repeat in range(repeats):
        for way in list(engines)[:: 1 if repeat % 2 == 0 else -1]:
            engine = engines[way]
            if engine.prefix is not None:
                engine.prefix.clear()  # each round starts cold
            rate, df = _run_timed(engine, convs, 24)
            rates[way].append(rate)
            answers[way] = list(df["answer"])
    with_cache, without = (statistics.median(rates[w]) for w in ("cache", "no cache"))
    same = answers["cache"] == answers["no cache"]
    reused = engines["cache"].prefix.reused_tokens
    for engine in engines.values():
        asyncio.run(engine.aclose())
    ratio = with_cache / without
    print()
    print(
        f"prefix reuse, {n} conversations x 3 turns, a {len(DOCUMENT):,}-character document: "
        f"{with_cache:.1f} tok/s with the cache, {without:.1f} without, ratio {ratio:.2f} "
        f"(target >= {TARGET_PREFIX}: {_verdict(ratio >= TARGET_PREFIX and same)}); "
        f"same answers: {same}; prompt tokens reused in the "
        f"last round: {reused:,}"
    )
    return {"with_cache": with_cache, "without": without, "ratio": ratio, "same_answers": same}


def continuous_batching(repeats: int, *, quick: bool) -> dict[str, Any]:
    """16 requests with max_tokens from 8 to 128: continuous against static batching."""
    n = 8 if quick else 16
    top = 48 if quick else 128
    spread = [round(8 + (top - 8) * k / (n - 1)) for k in range(n)]
    counting = [f"Count from {k + 1} to 1000, one number per line." for k in range(n)]
    uneven = [
        counting[k] if k % 2 else f"What is {k} + {k}? Answer with the number only."
        for k in range(n)
    ]
    engines = {"continuous": _torch(), "static": _torch(continuous=False)}
    for engine in engines.values():  # warm-up: the model thread, torch's own pools
        _continuous_part({"one": engine}, ["Hi", "Hello"], [4, 4], 1)
    figures = {}
    for label, questions, lengths in (
        (f"max_tokens {spread[0]}..{spread[-1]}", counting, spread),
        (f"one max_tokens ({top}), uneven answers", uneven, [top] * n),
    ):
        figures[label] = _continuous_part(engines, questions, lengths, repeats)
        continuous, static, same = figures[label]
        print(
            f"continuous batching, {n} requests, {label}, batch_size 8: {continuous:.1f} tok/s "
            f"continuous, {static:.1f} static, ratio {continuous / static:.2f} "
            f"(target >= {TARGET_CONTINUOUS}: "
            f"{_verdict(continuous / static >= TARGET_CONTINUOUS and same)}); same answers: {same}"
        )
    for engine in engines.values():
        asyncio.run(engine.aclose())
    return {
        label: {"continuous": c, "static": s, "ratio": c / s, "same_answers": same}
        for label, (c, s, same) in figures.items()
    }


def _continuous_part(
    engines: dict[str, Any], questions: list[str], lengths: list[int], repeats: int
) -> tuple[float, float, bool]:
    """Median tokens/s continuous and static, and whether the greedy answers agree."""
    rates: dict[str, list[float]] = {way: [] for way in engines}
    answers: dict[str, list[str]] = {}

    async def ask_all(engine: Any) -> tuple[float, list[str]]:
        from nbllm.types import ChatRequest

        chats = [
            ChatRequest("m", [{"role": "user", "content": q}], {"max_tokens": m})
            for q, m in zip(questions, lengths, strict=True)
        ]
        t0 = time.perf_counter()
        got = await asyncio.gather(*(engine.complete(chat) for chat in chats))
        wall = time.perf_counter() - t0
        return sum(a.completion_tokens or 0 for a in got) / wall, [a.text for a in got]

    for repeat in range(repeats):
        for way in list(engines)[:: 1 if repeat % 2 == 0 else -1]:
            rate, texts = asyncio.run(ask_all(engines[way]))
            rates[way].append(rate)
            answers[way] = texts
    if len(engines) == 1:
        return 0.0, 0.0, True
    continuous, static = (statistics.median(rates[w]) for w in ("continuous", "static"))
    return continuous, static, answers["continuous"] == answers["static"]


TARGET_VLLM_MULTITURN = 1.2
FOLLOW_UPS = ("Explain that in one sentence.", "Give an example.", "Summarise in three words.")


def vllm_multiturn(conversations_n: int = 64, max_tokens: int = 64) -> dict[str, Any] | None:
    """nbllm's vllm engine against ``LLM.chat`` turn by turn with a barrier; None if no vLLM."""
    from nbllm.engines.local import engine_status

    status = engine_status("vllm")
    if not status.usable:
        print(f"vllm multi-turn comparison skipped: {status.reason}")
        return None
    import gc

    import torch
    import vllm

    import nbllm
    from nbllm.engines.local.models import resolve_local_model, transformers_checkpoint

    convs = [
        {"id": f"c{i}", "turns": [QUESTIONS[i % len(QUESTIONS)][0], *FOLLOW_UPS]}
        for i in range(conversations_n)
    ]
    checkpoint = str(transformers_checkpoint(resolve_local_model(None)))

    # What people write by hand: every conversation's turn k, then a barrier, then turn k+1.
    llm = vllm.LLM(model=checkpoint, enable_prefix_caching=True)
    params = vllm.SamplingParams(max_tokens=max_tokens, temperature=0)
    histories: list[list[dict[str, str]]] = [[] for _ in convs]
    tokens = 0
    t0 = time.perf_counter()
    for turn in range(len(convs[0]["turns"])):
        for history, conv in zip(histories, convs, strict=True):
            history.append({"role": "user", "content": conv["turns"][turn]})
        outputs = llm.chat(histories, params, use_tqdm=False)
        for history, output in zip(histories, outputs, strict=True):
            tokens += len(output.outputs[0].token_ids)
            history.append({"role": "assistant", "content": output.outputs[0].text})
    by_hand = tokens / (time.perf_counter() - t0)
    del llm
    gc.collect()
    torch.cuda.empty_cache()

    t0 = time.perf_counter()
    result = nbllm.run(
        convs,
        engine="vllm",
        worker=False,
        concurrency=conversations_n,
        max_tokens=max_tokens,
        checkpoint=False,
        cache=False,
        progress=False,
    )
    ours = int(result.df["completion_tokens"].sum()) / (time.perf_counter() - t0)
    ratio = ours / by_hand
    print(
        f"vllm multi-turn, {conversations_n} x {len(convs[0]['turns'])} turns: LLM.chat with "
        f"a barrier {by_hand:.0f} tok/s, nbllm {ours:.0f} tok/s, ratio {ratio:.2f} "
        f"(target >= {TARGET_VLLM_MULTITURN}: {_verdict(ratio >= TARGET_VLLM_MULTITURN)})"
    )
    return {"by_hand_tokens_per_s": by_hand, "nbllm_tokens_per_s": ours, "ratio": ratio}


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _gen(tokens: int) -> Any:
    from nbllm.engines.local.base import Generation

    return Generation(max_new_tokens=tokens)


def _same(plain: list[str], ours: list[str]) -> bool:
    # nbllm's rows come in input order: conversation by conversation, turn by turn.
    return [a.strip() for a in plain] == [str(a).strip() for a in ours]


if __name__ == "__main__":
    main()
