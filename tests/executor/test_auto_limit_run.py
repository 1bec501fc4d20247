"""rpm="auto" against a real server that enforces a limit it does not announce: the run finds
it from the 429s, every turn is answered, and the dashboard's figures show the limit."""

from __future__ import annotations

import asyncio

import pytest

import nbllm
from nbllm import Conversation
from nbllm.errors import ConfigError
from nbllm.executor import Executor, LimitChanged
from nbllm.executor.events import Event, TurnFinished
from nbllm.executor.stats import RunStats
from nbllm.testing import TestServer
from nbllm.ui.snapshot_text import figure_items

RATE = 8  # the server's limit, requests per window
WINDOW_S = 1.0


def test_rpm_auto_finds_an_unannounced_limit_and_answers_every_turn():
    events: list[Event] = []

    async def run(url: str) -> nbllm.RunResult:
        convs = [Conversation(id=f"c{i}", questions=(f"question {i}",)) for i in range(60)]
        async with nbllm.engines.OpenAIEngine(url) as engine:
            executor = Executor(
                engine,
                model="nbllm-test",
                concurrency=8,
                rpm="auto",
                max_rpm=4 * RATE,  # starts at 2 x the server's limit
                rate_window_s=WINDOW_S,
                retry=nbllm.RetryPolicy(retries=10, initial=0.05, maximum=0.5),
                listeners=[events.append],
            )
            return await executor.run(convs)

    with TestServer(rpm=RATE, window_s=WINDOW_S) as server:
        result = asyncio.run(run(server.url))
        statuses = [entry.status for entry in server.requests]
    assert result.summary.turns_ok == 60
    limits = [e.limit for e in events if isinstance(e, LimitChanged)]
    assert limits, "the limit never moved"
    assert limits[0] < 2 * RATE  # cut from where it started
    assert 0.5 * RATE <= limits[-1] <= 1.25 * RATE, limits
    # Most 429s come while it finds the limit; far fewer than the requests.
    assert statuses.count(429) < 0.5 * statuses.count(200), statuses.count(429)
    stats = RunStats()
    for event in events[:-1]:
        stats.update(event)
    assert f"rpm limit {limits[-1]:,.0f}" in figure_items(stats.snapshot())


def test_auto_cannot_be_shared_through_redis_yet():
    with pytest.raises(ConfigError, match=r"^rpm='auto' cannot be shared through redis_url="):
        Executor(nbllm.FakeEngine(), model="m", rpm="auto", redis_url="redis://127.0.0.1:9/0")


def test_the_options_take_auto_from_text():
    from nbllm.config import parse_run_option

    assert parse_run_option("rpm", "auto") == "auto"
    assert parse_run_option("tpm", "AUTO") == "auto"
    assert parse_run_option("rpm", "600") == 600.0
    with pytest.raises(ConfigError, match="rpm expects a number or 'auto', got 'fast'"):
        parse_run_option("rpm", "fast")


def test_rpm_auto_takes_the_limit_a_provider_announces_in_its_headers():
    """A server that sends OpenAI's x-ratelimit-* headers: the limit is set from them at the
    first answer, not searched for (and never above max_rpm)."""
    from aiohttp import web

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        answer = {
            "choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}],
            "model": body["model"],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1},
        }
        headers = {
            "x-ratelimit-limit-requests": "30",
            "x-ratelimit-remaining-requests": "29",
            "x-ratelimit-reset-requests": "2s",
        }
        return web.json_response(answer, headers=headers)

    events: list[Event] = []

    async def run() -> nbllm.RunResult:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            convs = [Conversation(id=f"c{i}", questions=(f"q{i}",)) for i in range(3)]
            async with nbllm.engines.OpenAIEngine(f"http://127.0.0.1:{port}/v1") as engine:
                executor = Executor(
                    engine, model="m", rpm="auto", max_rpm=100, listeners=[events.append]
                )
                return await executor.run(convs)
        finally:
            await runner.cleanup()

    result = asyncio.run(run())
    assert result.summary.turns_ok == 3
    limits = [e.limit for e in events if isinstance(e, LimitChanged)]
    assert limits and limits[0] == 30.0


def test_rpm_auto_follows_a_provider_whose_limit_drops_and_comes_back():
    """The server's limit halves mid-run and is restored later: the limit in force follows it
    down and back up, and every turn is answered."""
    window = 0.5
    rate = 20
    events: list[Event] = []
    finished = 0

    with TestServer(rpm=rate, window_s=window) as server:

        def listen(event: Event) -> None:
            nonlocal finished
            events.append(event)
            if isinstance(event, TurnFinished):
                finished += 1
                if finished == 40:
                    server.rpm = rate // 2
                elif finished == 80:
                    server.rpm = rate

        async def run() -> nbllm.RunResult:
            convs = [Conversation(id=f"c{i}", questions=(f"question {i}",)) for i in range(140)]
            async with nbllm.engines.OpenAIEngine(server.url) as engine:
                executor = Executor(
                    engine,
                    model="nbllm-test",
                    concurrency=4,
                    rpm="auto",
                    max_rpm=4 * rate,
                    rate_window_s=window,
                    retry=nbllm.RetryPolicy(retries=10, initial=0.05, maximum=0.5),
                    listeners=[listen],
                )
                return await executor.run(convs)

        result = asyncio.run(run())
    assert result.summary.turns_ok == 140
    limits = [e.limit for e in events if isinstance(e, LimitChanged)]
    low = limits.index(min(limits))
    assert limits[low] <= rate // 2, limits  # followed the provider down
    assert max(limits[low:]) == rate, limits  # and back up, to the provider's limit
