"""How much does nbllm's executor cost per request, next to bare clients?

One multi-turn workload (default: 400 conversations of 2-5 turns, ~4 KB of seeded context
in each system message) is sent to the zero-latency nbllm test server, which runs in a
child process so that it has the other CPU core to itself. The same conversations go
through each of these ways, several rounds, in a rotating order:

``aiohttp``       a bare aiohttp loop: one pooled session, a semaphore of ``concurrency``
                  conversations, turn k carries the earlier answers, parse the JSON; the
                  floor of what Python can do here;
``openai``        the same loop on ``openai.AsyncOpenAI(max_retries=0)``;
``nbllm``         ``nbllm.run(...)`` on its lean aiohttp engine (``engine == "openai"``);
``nbllm+limits``  the same with ``rpm`` / ``tpm`` set far above what is reached, so the rate
                  limiter runs on every request without ever making one wait;
``litellm``       ``nbllm.run(..., engine="litellm")`` on a subset of the conversations.

It prints requests/s per way (median and every round), the client's CPU time per request,
how busy the server process was, and the ratios against the targets::

    nbllm / aiohttp  >= 0.5
    nbllm / openai   >= 2.0

Run: ``python benchmarks/executor_overhead.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

MODEL = "nbllm-test"
TARGET_VS_AIOHTTP = 0.5
TARGET_VS_OPENAI = 2.0
TARGET_DASHBOARD = 0.95  # the live dashboard may cost at most 5 % of throughput
HIGH_RPM = 10_000_000
HIGH_TPM = 10_000_000_000

_VOCABULARY = (
    "revenue margin quarter segment growth cash flow operating income capital expense "
    "dividend share equity liability asset depreciation inventory receivable payable tax "
    "interest rate forecast guidance region product customer contract backlog pipeline "
    "the of and in for to with on by from as at its over per year total net gross"
)
_WORDS = tuple(_VOCABULARY.split())


# -- the workload ------------------------------------------------------------------


def make_context(rng: random.Random, n_chars: int) -> str:
    """A deterministic, table-like document of about ``n_chars`` characters."""
    lines: list[str] = []
    size = 0
    while size < n_chars:
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 14)))
        line = f"{words}: {rng.randint(1, 99_999)}.{rng.randint(0, 99):02d}"
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines)[:n_chars]


def make_workload(
    n_conversations: int,
    *,
    seed: int = 0,
    context_chars: int = 4096,
    min_turns: int = 2,
    max_turns: int = 5,
) -> list[dict[str, Any]]:
    """``n_conversations`` records ``{"id", "turns", "context"}``, the same for the same seed."""
    rng = random.Random(seed)
    workload = []
    for i in range(n_conversations):
        n_turns = rng.randint(min_turns, max_turns)
        turns = [
            f"Question {k} of conversation {i}: what is the {rng.choice(_WORDS)} "
            f"{rng.choice(_WORDS)} in year {2000 + rng.randint(0, 24)}?"
            for k in range(n_turns)
        ]
        context = make_context(rng, context_chars) if context_chars else None
        workload.append({"id": f"c{i}", "turns": turns, "context": context})
    return workload


def count_requests(workload: Sequence[dict[str, Any]]) -> int:
    return sum(len(conv["turns"]) for conv in workload)


def messages_for(conv: dict[str, Any], k: int, answers: Sequence[str]) -> list[dict[str, str]]:
    """What nbllm sends for turn ``k``: the context as system message, then the history."""
    messages = []
    if conv.get("context"):
        messages.append({"role": "system", "content": conv["context"]})
    for question, answer in zip(conv["turns"][:k], answers, strict=True):
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": answer})
    messages.append({"role": "user", "content": conv["turns"][k]})
    return messages


# -- the ways ------------------------------------------------------------------------


async def _aiohttp_loop(url: str, workload: Sequence[dict[str, Any]], concurrency: int) -> int:
    import aiohttp

    endpoint = url.rstrip("/") + "/chat/completions"
    gate = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def conversation(conv: dict[str, Any]) -> int:
            async with gate:
                answers: list[str] = []
                for k in range(len(conv["turns"])):
                    body = {"model": MODEL, "messages": messages_for(conv, k, answers)}
                    async with session.post(endpoint, json=body) as resp:
                        if resp.status != 200:
                            msg = f"HTTP {resp.status}: {await resp.text()}"
                            raise RuntimeError(msg)
                        payload = await resp.json()
                    answers.append(payload["choices"][0]["message"]["content"])
                return len(answers)

        done = await asyncio.gather(*(conversation(conv) for conv in workload))
    return sum(done)


async def _openai_loop(url: str, workload: Sequence[dict[str, Any]], concurrency: int) -> int:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0)
    gate = asyncio.Semaphore(concurrency)
    try:

        async def conversation(conv: dict[str, Any]) -> int:
            async with gate:
                answers: list[str] = []
                for k in range(len(conv["turns"])):
                    response = await client.chat.completions.create(
                        model=MODEL, messages=messages_for(conv, k, answers)
                    )
                    answers.append(response.choices[0].message.content or "")
                return len(answers)

        done = await asyncio.gather(*(conversation(conv) for conv in workload))
    finally:
        await client.close()
    return sum(done)


def run_aiohttp(url: str, workload: Sequence[dict[str, Any]], concurrency: int) -> int:
    return asyncio.run(_aiohttp_loop(url, workload, concurrency))


def run_openai(url: str, workload: Sequence[dict[str, Any]], concurrency: int) -> int:
    return asyncio.run(_openai_loop(url, workload, concurrency))


def _run_nbllm(
    url: str, workload: Sequence[dict[str, Any]], concurrency: int, **options: Any
) -> Any:
    import nbllm

    options.setdefault("model", MODEL)
    # The executor alone: no checkpoint or cache (benchmarks/checkpoint_overhead.py has those),
    # so no round is ever resumed or answered from an earlier round's cache.
    return nbllm.run(
        workload,
        api_base=url,
        concurrency=concurrency,
        progress=False,
        checkpoint=False,
        cache=False,
        **options,
    )


def run_nbllm(url: str, workload: Sequence[dict[str, Any]], concurrency: int) -> Any:
    return _run_nbllm(url, workload, concurrency)


def run_nbllm_limits(url: str, workload: Sequence[dict[str, Any]], concurrency: int) -> Any:
    return _run_nbllm(url, workload, concurrency, rpm=HIGH_RPM, tpm=HIGH_TPM)


def run_nbllm_dashboard(url: str, workload: Sequence[dict[str, Any]], concurrency: int) -> Any:
    """With the notebook dashboard listening (widgets built and updated, no kernel to show
    them), to measure what live progress costs."""
    from nbllm.ui.dashboard import Dashboard

    dashboard = Dashboard(gpu=False)
    try:
        return _run_nbllm(url, workload, concurrency, listeners=[dashboard])
    finally:
        dashboard.close()


def run_litellm(url: str, workload: Sequence[dict[str, Any]], concurrency: int) -> Any:
    return _run_nbllm(
        url, workload, concurrency, model="openai/" + MODEL, engine="litellm", api_key="x"
    )


def checked(result: Any, expected: int, engine: str) -> int:
    """Every turn of an nbllm result answered, by ``engine``, without retries; the count."""
    summary = result.summary
    if summary.turns != expected or summary.turns_ok != expected or summary.retries:
        errors = [r.error for r in result.records if r.error][:3]
        msg = (
            f"nbllm run not clean: {summary.turns_ok}/{expected} turns ok, "
            f"{summary.retries} retries; first errors: {errors}"
        )
        raise RuntimeError(msg)
    engines = set(result.df["engine"])
    if engines != {engine}:
        msg = f"expected engine {engine!r} on every row, got {sorted(engines)}"
        raise RuntimeError(msg)
    return summary.turns_ok


# -- measuring -------------------------------------------------------------------------


@dataclass
class Way:
    name: str
    run: Callable[[str, Sequence[dict[str, Any]], int], Any]
    workload: Sequence[dict[str, Any]]
    engine: str | None = None  # an nbllm way: ``run`` returns a RunResult to check
    rates: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    server_busy: list[float] = field(default_factory=list)
    others_busy: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def best(self) -> float:
        return max(self.rates)


def _process_cpu_s(pid: int) -> float | None:
    """utime + stime of a process, from /proc (Linux); None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _machine_cpu_s() -> float | None:
    """CPU seconds spent by everything on this machine, all cores (Linux); None elsewhere."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        busy = sum(ticks[:8]) - ticks[3] - ticks[4]  # all but idle and iowait
        return busy / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def measure(way: Way, url: str, concurrency: int, server_pid: int) -> None:
    """One timed run of one way: req/s, client CPU per request, how busy the server was,
    and how many cores' worth the machine's other processes used meanwhile."""
    gc.collect()
    machine0, server0 = _machine_cpu_s(), _process_cpu_s(server_pid)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    outcome = way.run(url, way.workload, concurrency)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    machine1, server1 = _machine_cpu_s(), _process_cpu_s(server_pid)
    expected = count_requests(way.workload)
    # Checked after the clock stops: building result.df is not part of the run.
    sent = outcome if way.engine is None else checked(outcome, expected, way.engine)
    if sent != expected:
        msg = f"{way.name}: {sent} requests answered, expected {expected}"
        raise RuntimeError(msg)
    way.rates.append(sent / wall)
    way.cpu_ms.append(1000 * cpu / sent)
    if None not in (server0, server1, machine0, machine1):
        server = server1 - server0  # type: ignore[operator]
        way.server_busy.append(server / wall)
        others = machine1 - machine0 - server - cpu  # type: ignore[operator]
        way.others_busy.append(max(0.0, others) / wall)


def _verdict(value: float, target: float) -> str:
    return "PASS" if value >= target else "MISS"


def _median_text(values: Sequence[float], fmt: str) -> str:
    return format(statistics.median(values), fmt) if values else "-"


def report(ways: Sequence[Way], args: argparse.Namespace) -> dict[str, Any]:
    by_name = {w.name: w for w in ways}
    print()
    print(
        f"{'way':<13} {'reqs':>5} {'median req/s':>12} {'best':>6}  {'rounds (req/s)':<34}"
        f" {'CPU ms/req':>10} {'server':>6} {'others':>6}"
    )
    for w in ways:
        rounds = " ".join(f"{r:,.0f}" for r in w.rates)
        print(
            f"{w.name:<13} {count_requests(w.workload):>5} {w.median:>12,.0f} {w.best:>6,.0f}  "
            f"{rounds:<34} {statistics.median(w.cpu_ms):>10.3f} "
            f"{_median_text(w.server_busy, '>6.0%')} {_median_text(w.others_busy, '>6.2f')}"
        )
    print(
        "CPU ms/req: this process's CPU time per request (median); server: the server "
        "process's CPU / wall;\nothers: cores' worth of CPU that other processes on the "
        "machine used meanwhile (noise)"
    )

    def ratio(a: str, b: str, best: bool = False) -> float:
        pick = (lambda w: w.best) if best else (lambda w: w.median)
        return pick(by_name[a]) / pick(by_name[b])

    pairs = [
        ("nbllm", "aiohttp"),
        ("nbllm", "openai"),
        ("nbllm+limits", "nbllm"),
        ("nbllm+dash", "nbllm"),
    ]
    if "litellm" in by_name:
        pairs += [("litellm", "aiohttp"), ("nbllm", "litellm")]
    ratios = {f"{a}/{b}": ratio(a, b) for a, b in pairs}
    best_ratios = {f"{a}/{b}": ratio(a, b, best=True) for a, b in pairs}
    targets = {
        "nbllm/aiohttp": TARGET_VS_AIOHTTP,
        "nbllm/openai": TARGET_VS_OPENAI,
        "nbllm+dash/nbllm": TARGET_DASHBOARD,
    }
    print(f"\n{'ratio of req/s':<20} {'median':>6} {'best':>6}")
    for name, value in ratios.items():
        if name in targets:
            verdict = f"target >= {targets[name]:g}  {_verdict(value, targets[name])}"
        else:
            verdict = "(reported)"
        print(f"{name:<20} {value:6.2f} {best_ratios[name]:6.2f}   {verdict}")
    # Client CPU per request is far less sensitive to a busy, shared machine than req/s.
    cpu = {w.name: statistics.median(w.cpu_ms) for w in ways}
    print(
        "\nclient CPU per request, relative to the aiohttp floor: "
        + ", ".join(f"{name} {ms / cpu['aiohttp']:.2f}x" for name, ms in cpu.items())
    )
    print(
        f"rate limiter (rpm+tpm that never bind): "
        f"{1000 * (cpu['nbllm+limits'] - cpu['nbllm']):+.0f} µs of client CPU per request"
    )
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "concurrency": args.concurrency,
        "ways": {
            w.name: {
                "conversations": len(w.workload),
                "requests": count_requests(w.workload),
                "median_rps": w.median,
                "best_rps": w.best,
                "rounds_rps": w.rates,
                "client_cpu_ms_per_request": w.cpu_ms,
                "server_busy": w.server_busy,
                "others_busy_cores": w.others_busy,
            }
            for w in ways
        },
        "ratios_median": ratios,
        "ratios_best": best_ratios,
        "client_cpu_ms_per_request_median": cpu,
        "pass": {name: ratios[name] >= t for name, t in targets.items()},
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--litellm-conversations",
        type=int,
        default=100,
        help="conversations for the (slow) litellm way; 0 leaves it out",
    )
    parser.add_argument("--context-chars", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="120 conversations, 1 round")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.conversations = min(args.conversations, 120)
        args.rounds = 1
        args.litellm_conversations = min(args.litellm_conversations, 40)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from nbllm.testing import start_subprocess

    workload = make_workload(args.conversations, seed=args.seed, context_chars=args.context_chars)
    ways = [
        Way("aiohttp", run_aiohttp, workload),
        Way("openai", run_openai, workload),
        Way("nbllm", run_nbllm, workload, engine="openai"),
        Way("nbllm+limits", run_nbllm_limits, workload, engine="openai"),
        Way("nbllm+dash", run_nbllm_dashboard, workload, engine="openai"),
    ]
    import nbllm.ui.dashboard  # noqa: F401 - a one-off import, not a per-run cost

    if args.litellm_conversations:
        subset = workload[: args.litellm_conversations]
        ways.append(Way("litellm", run_litellm, subset, engine="litellm"))
    print(
        f"{args.conversations} conversations, {count_requests(workload)} requests "
        f"({count_requests(workload) / len(workload):.2f} turns each), "
        f"{args.context_chars} chars of context, concurrency {args.concurrency}, "
        f"{args.rounds} rounds; {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    started = time.perf_counter()
    with start_subprocess(latency=0.0) as server:
        # Warm up: imports (litellm takes seconds), connections, and the server, which
        # sees every conversation once before anything is timed.
        run_aiohttp(server.url, workload, args.concurrency)
        for way in ways:
            way.run(server.url, way.workload[:4], args.concurrency)
        shuffle = random.Random(args.seed)
        for r in range(args.rounds):
            # A new order each round: a fixed rotation keeps each way behind the same
            # neighbour, and what one way leaves behind (garbage, a busy server) biases the next.
            order = list(ways)
            shuffle.shuffle(order)
            for way in order:
                measure(way, server.url, args.concurrency, server.pid)
                print(
                    f"  round {r + 1}: {way.name:<13} {way.rates[-1]:>8,.0f} req/s",
                    flush=True,
                )
    figures = report(ways, args)
    print(f"\ntotal time {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
