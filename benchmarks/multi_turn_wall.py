"""Wall time of a ConvFinQA-shaped multi-turn batch: nbllm, a bare aiohttp loop, the bound.

The workload has ConvFinQA's shape: 421 conversations, 1,490 dependent turns, 1 to 8 turns
a conversation (most have 2 to 4, a few 7 or 8). The simulated provider answers each turn
after a lognormal latency (median 200 ms, ``--sigma`` 0.6) drawn from a generator seeded
by the turn's question, so every way below meets the very same latency for the very same
turn. 64 requests in flight. No schedule can beat::

    lower bound = max(critical path, sum(latency) / 64)

where the critical path is the longest conversation's sum of latencies (turn k+1 needs
turn k's answer). The ways, each run ``--rounds`` times in a rotating order:

    nbllm        Executor(concurrency=64): the default max_conversations, slots by priority
    nbllm 1x     the same with max_conversations=64 (one conversation per slot)
    bare loop    every conversation a task, one asyncio.Semaphore(64) taken per request

``--provider http`` (the default) runs a small aiohttp server in a child process (the
nbllm test server has no per-request latency table); nbllm talks to it with its openai
engine and the bare loop with one pooled ``aiohttp.ClientSession``. ``--provider sleep``
compares scheduling alone: nbllm on a ``FakeEngine`` and the bare loop each await the same
``asyncio.sleep(latency)``, with no HTTP at all. ``--provider fake-clock`` does the same on
an event loop whose clock jumps to the next timer: no CPU cost is counted, so the figures
are the schedules' own, exact and the same on every machine.

``--policies N`` adds a simulation of the dispatch rules alone (no CPU, no HTTP) over N
seeds, the workload and latencies of seeds 0..N-1: the bare loop's (every conversation,
input order, first come first served), nbllm 1x's (one conversation per slot, longest
first), nbllm's (4 per slot, most turns left), and a clairvoyant rule that knows every
latency in advance (every conversation, most remaining seconds first). It shows how far
from the bound a rule that cannot see the future lands on average.

Target (issue 11): nbllm wall <= 1.00x the bare loop and <= 1.08x the lower bound.

Run: ``python benchmarks/multi_turn_wall.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import heapq
import itertools
import json
import math
import multiprocessing
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

MODEL = "nbllm-bench"
CONCURRENCY = 64
TARGET_VS_LOOP = 1.00
TARGET_VS_BOUND = 1.08
# Conversations of 1..8 turns, as many as in ConvFinQA's shape: 421 and 1,490 turns.
TURN_COUNTS = {1: 30, 2: 80, 3: 115, 4: 95, 5: 55, 6: 28, 7: 12, 8: 6}


def make_workload(seed: int = 0, scale: float = 1.0) -> list[dict[str, Any]]:
    """Records ``{"id", "turns", "context"}`` in a seeded order; ``scale`` < 1 for --quick."""
    rng = random.Random(seed)
    lengths = [n for n, count in TURN_COUNTS.items() for _ in range(max(1, round(count * scale)))]
    rng.shuffle(lengths)
    return [
        {
            "id": f"c{i}",
            "turns": [f"Question {k} of conversation {i}: what changed in year {2000 + k}?"
                      for k in range(n)],
            "context": f"Table {i}: revenue, costs and margin by year.",
        }
        for i, n in enumerate(lengths)
    ]  # fmt: skip


def latency_of(question: str, *, seed: int, median: float, sigma: float) -> float:
    """The provider's latency for the turn that asks ``question``: the same in every way."""
    return random.Random(f"{seed}|{question}").lognormvariate(math.log(median), sigma)


def lower_bound(
    workload: Sequence[dict[str, Any]], latency: Callable[[str], float], concurrency: int
) -> dict[str, float]:
    chains = [sum(latency(q) for q in conv["turns"]) for conv in workload]
    terms = {"critical_path_s": max(chains), "latency_over_slots_s": sum(chains) / concurrency}
    return {**terms, "bound_s": max(terms.values())}


# --------------------------------------------------------------------------- the provider


def serve(port_queue: Any, seed: int, median: float, sigma: float) -> None:
    """A child process: an OpenAI-style chat endpoint answering after ``latency_of``."""
    from aiohttp import web

    from nbllm.engines.openai_wire import completion_body

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        question = str(body["messages"][-1]["content"])
        await asyncio.sleep(latency_of(question, seed=seed, median=median, sigma=sigma))
        text = "Answer: " + question[:24]
        return web.json_response(completion_body("x", MODEL, text, len(question) // 4, 6))

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        port_queue.put(runner.addresses[0][1])
        await asyncio.Event().wait()

    asyncio.run(main())


class Provider:
    """The child process serving ``latency_of``; ``url`` is its OpenAI base URL."""

    def __init__(self, *, seed: int, median: float, sigma: float) -> None:
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        self.process = context.Process(target=serve, args=(queue, seed, median, sigma), daemon=True)
        self.process.start()
        self.url = f"http://127.0.0.1:{queue.get(timeout=60)}/v1"

    def __enter__(self) -> Provider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.join(10)


# --------------------------------------------------------------------------- the ways


def messages_for(conv: dict[str, Any], k: int, answers: Sequence[str]) -> list[dict[str, str]]:
    """What nbllm sends for turn ``k``: the context as system message, then the history."""
    messages = [{"role": "system", "content": conv["context"]}]
    for question, answer in zip(conv["turns"][:k], answers, strict=True):
        messages += [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    messages.append({"role": "user", "content": conv["turns"][k]})
    return messages


async def bare_loop(
    workload: Sequence[dict[str, Any]], ask: Callable[[list[dict[str, str]]], Awaitable[str]]
) -> int:
    """Every conversation a task; one semaphore of ``CONCURRENCY`` taken per request."""
    gate = asyncio.Semaphore(CONCURRENCY)

    async def conversation(conv: dict[str, Any]) -> int:
        answers: list[str] = []
        for k in range(len(conv["turns"])):
            async with gate:
                answers.append(await ask(messages_for(conv, k, answers)))
        return len(answers)

    return sum(await asyncio.gather(*(conversation(conv) for conv in workload)))


async def bare_http(url: str, workload: Sequence[dict[str, Any]]) -> int:
    import aiohttp

    endpoint = url + "/chat/completions"
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def ask(messages: list[dict[str, str]]) -> str:
            async with session.post(endpoint, json={"model": MODEL, "messages": messages}) as resp:
                resp.raise_for_status()
                payload = await resp.json()
            return str(payload["choices"][0]["message"]["content"])

        return await bare_loop(workload, ask)


async def bare_sleep(workload: Sequence[dict[str, Any]], latency: Callable[[str], float]) -> int:
    async def ask(messages: list[dict[str, str]]) -> str:
        question = messages[-1]["content"]
        await asyncio.sleep(latency(question))
        return "Answer: " + question[:24]

    return await bare_loop(workload, ask)


async def with_nbllm(
    workload: Sequence[dict[str, Any]],
    *,
    url: str | None,
    latency: Callable[[str], float],
    max_conversations: int | None,
) -> int:
    import nbllm
    from nbllm.engines import create_engine

    engine: nbllm.Engine
    if url is None:

        async def handler(request: nbllm.ChatRequest) -> str:
            question = str(request.messages[-1]["content"])
            await asyncio.sleep(latency(question))
            return "Answer: " + question[:24]

        engine = nbllm.FakeEngine(handler)
    else:
        engine = create_engine("openai", model=MODEL, api_base=url, max_connections=CONCURRENCY)
    executor = nbllm.Executor(
        engine,
        model=MODEL,
        concurrency=CONCURRENCY,
        max_conversations=max_conversations,
        timeout=120.0,
    )
    try:
        result = await executor.run(nbllm.load_conversations(list(workload)))
    finally:
        await engine.aclose()
    if result.summary.turns_ok != result.summary.turns or result.summary.retries:
        msg = f"nbllm: {result!r}"
        raise RuntimeError(msg)
    return result.summary.turns_ok


# --------------------------------------------------------------------------- measuring


class FakeClockLoop(asyncio.SelectorEventLoop):
    """A loop whose clock stands still while callbacks run and jumps to the next timer."""

    def __init__(self) -> None:
        super().__init__()
        self._now = 0.0

    def time(self) -> float:
        return self._now

    def _run_once(self) -> None:
        if not self._ready:  # type: ignore[attr-defined]
            timers = [t.when() for t in self._scheduled if not t.cancelled()]  # type: ignore[attr-defined]
            if timers:
                self._now = max(self._now, min(timers))
        super()._run_once()  # type: ignore[misc]


def timed(make: Callable[[], Coroutine[Any, Any, int]], *, fake_clock: bool) -> tuple[int, float]:
    """What ``make()`` returned and its wall time (on the fake clock's time if asked)."""
    if not fake_clock:
        t0 = time.perf_counter()
        sent = asyncio.run(make())
        return sent, time.perf_counter() - t0
    loop = FakeClockLoop()
    try:
        return loop.run_until_complete(make()), loop.time()
    finally:
        loop.close()


def ways_on(
    workload: Sequence[dict[str, Any]], url: str | None, latency: Callable[[str], float]
) -> dict[str, Callable[[], Coroutine[Any, Any, int]]]:
    """Each way as a coroutine maker: against ``url``, or sleeping ``latency`` when None."""
    return {
        "nbllm": lambda: with_nbllm(workload, url=url, latency=latency, max_conversations=None),
        "nbllm 1x": lambda: with_nbllm(
            workload, url=url, latency=latency, max_conversations=CONCURRENCY
        ),
        "bare loop": (lambda: bare_http(url, workload)) if url else
                     (lambda: bare_sleep(workload, latency)),
    }  # fmt: skip


def measure(args: argparse.Namespace) -> dict[str, Any]:
    workload = make_workload(args.seed, 0.25 if args.quick else 1.0)
    n_turns = sum(len(conv["turns"]) for conv in workload)

    def latency(question: str) -> float:
        return latency_of(question, seed=args.seed, median=args.median, sigma=args.sigma)

    bound = lower_bound(workload, latency, CONCURRENCY)

    def ways(url: str | None) -> dict[str, Callable[[], Coroutine[Any, Any, int]]]:
        return ways_on(workload, url, latency)

    def rounds(url: str | None) -> dict[str, list[float]]:
        walls: dict[str, list[float]] = {}
        plan = ways(url)
        names = list(plan)
        for warm_up in ways_on(workload[:16], url, latency).values():
            asyncio.run(warm_up())  # imports, first connections: not part of any round
        fake_clock = args.provider == "fake-clock"
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                sent, wall = timed(plan[name], fake_clock=fake_clock)
                if sent != n_turns:
                    msg = f"{name} answered {sent} of {n_turns} turns"
                    raise RuntimeError(msg)
                walls.setdefault(name, []).append(wall)
                print(f"  round {r + 1}  {name:<10} {wall:6.2f} s", flush=True)
        return walls

    if args.provider == "http":
        with Provider(seed=args.seed, median=args.median, sigma=args.sigma) as provider:
            walls = rounds(provider.url)
    else:
        walls = rounds(None)
    medians = {name: statistics.median(values) for name, values in walls.items()}
    return {
        "conversations": len(workload),
        "turns": n_turns,
        "concurrency": CONCURRENCY,
        "provider": args.provider,
        "median_latency_s": args.median,
        "sigma": args.sigma,
        "rounds": args.rounds,
        **bound,
        "walls_s": walls,
        "median_wall_s": medians,
        "nbllm_vs_loop": medians["nbllm"] / medians["bare loop"],
        "nbllm_vs_bound": medians["nbllm"] / bound["bound_s"],
    }


def report(figures: dict[str, Any]) -> bool:
    bound = figures["bound_s"]
    loop = figures["median_wall_s"]["bare loop"]
    print(
        f"\n{figures['conversations']} conversations, {figures['turns']} turns, "
        f"{figures['concurrency']} in flight, lognormal latency median "
        f"{figures['median_latency_s'] * 1000:g} ms sigma {figures['sigma']:g}, "
        f"provider: {figures['provider']}, median of {figures['rounds']} rounds"
    )
    print(
        f"lower bound {bound:.2f} s = max(critical path {figures['critical_path_s']:.2f} s, "
        f"sum(latency)/{figures['concurrency']} {figures['latency_over_slots_s']:.2f} s)\n"
    )
    print(f"{'way':<10} {'wall s':>7} {'/ loop':>7} {'/ bound':>8}")
    for name, wall in figures["median_wall_s"].items():
        print(f"{name:<10} {wall:>7.2f} {wall / loop:>7.3f} {wall / bound:>8.3f}")
    ok = figures["nbllm_vs_loop"] <= TARGET_VS_LOOP and figures["nbllm_vs_bound"] <= TARGET_VS_BOUND
    print(
        f"\ntarget: nbllm <= {TARGET_VS_LOOP:.2f}x the bare loop and <= {TARGET_VS_BOUND:.2f}x "
        f"the bound: {'PASS' if ok else 'MISS'}"
    )
    return ok


# name: (which ready turn a freed slot takes, conversations in progress per slot (0: all),
# conversations started longest first)
POLICIES = {
    "bare loop": ("first come", 0, False),
    "nbllm 1x": ("first come", 1, True),
    "nbllm": ("most turns left", 4, True),
    "clairvoyant": ("most seconds left", 0, True),
}


def simulate(latencies: Sequence[Sequence[float]], policy: str, slots: int) -> float:
    """Makespan of the conversations' chains under ``POLICIES[policy]``."""
    rule, per_slot, longest_first = POLICIES[policy]
    order = list(range(len(latencies)))
    if longest_first:
        order.sort(key=lambda i: -len(latencies[i]))
    in_progress = per_slot * slots or len(order)

    def key(i: int, k: int) -> tuple[float, ...]:
        if rule == "most turns left":
            return (k - len(latencies[i]), -len(latencies[i]))
        if rule == "most seconds left":
            return (-sum(latencies[i][k:]),)
        return ()

    arrivals = itertools.count()
    ready: list[tuple[tuple[float, ...], int, int, int]] = []
    running: list[tuple[float, int, int]] = []
    started = 0

    def start() -> None:
        nonlocal started
        i = order[started]
        started += 1
        heapq.heappush(ready, (key(i, 0), next(arrivals), i, 0))

    while started < min(len(order), in_progress):
        start()
    now = 0.0
    while ready or running:
        while ready and len(running) < slots:
            _, _, i, k = heapq.heappop(ready)
            heapq.heappush(running, (now + latencies[i][k], i, k))
        now, i, k = heapq.heappop(running)
        if k + 1 < len(latencies[i]):
            heapq.heappush(ready, (key(i, k + 1), next(arrivals), i, k + 1))
        elif started < len(order):
            start()
    return now


def compare_policies(args: argparse.Namespace) -> dict[str, list[float]]:
    """Each policy's wall / bound on seeds 0..N-1, and their medians, printed."""
    ratios: dict[str, list[float]] = {}
    for seed in range(args.policies):
        workload = make_workload(seed)
        latencies = [
            [latency_of(q, seed=seed, median=args.median, sigma=args.sigma) for q in conv["turns"]]
            for conv in workload
        ]
        bound = max(max(map(sum, latencies)), sum(map(sum, latencies)) / CONCURRENCY)
        for policy in POLICIES:
            wall = simulate(latencies, policy, CONCURRENCY)
            ratios.setdefault(policy, []).append(wall / bound)
    print(f"\ndispatch rules alone, wall / bound on {args.policies} seeds (simulated):")
    print(f"{'way':<12} {'median':>7} {'best':>6} {'worst':>6}")
    for policy, values in ratios.items():
        print(
            f"{policy:<12} {statistics.median(values):>7.3f} {min(values):>6.3f} "
            f"{max(values):>6.3f}"
        )
    return ratios


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--provider", choices=["http", "sleep", "fake-clock"], default="http")
    parser.add_argument("--median", type=float, default=0.2, help="median latency, seconds")
    parser.add_argument("--sigma", type=float, default=0.6, help="lognormal sigma")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a quarter of the conversations")
    parser.add_argument(
        "--policies", type=int, metavar="N", default=0, help="simulate dispatch rules on N seeds"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"{os.cpu_count()} CPUs, Python {platform.python_version()}", flush=True)
    figures = measure(args)
    ok = report(figures)
    if args.policies:
        figures["policies"] = compare_policies(args)
    if args.json:
        figures["date"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        figures["command"] = " ".join([os.path.basename(sys.executable), *sys.argv])
        figures["pass"] = ok
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
