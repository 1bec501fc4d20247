"""Runs sharing one rpm budget through a real Redis, against a real server that enforces it.

Two executors stand for two kernels: each has its own ``SharedRateLimiter`` (its own
participant in Redis), exactly as two processes would. The server answers 429 beyond its
limit, so a run that overshoots shows it.
"""

from __future__ import annotations

import asyncio

import pytest
from redis_server import RedisServer, require_redis

import nbllm
from nbllm import Conversation
from nbllm.errors import ConfigError
from nbllm.executor import Executor
from nbllm.executor.events import Event, SharedQuota
from nbllm.executor.stats import RunStats
from nbllm.testing import TestServer
from nbllm.ui.snapshot_text import error_lines

RATE = 12  # requests per window, shared by both runs
WINDOW_S = 2.0


@pytest.fixture
def redis(tmp_path):
    require_redis()
    with RedisServer(tmp_path) as server:
        yield server


def conversations(prefix: str, n: int) -> list[Conversation]:
    return [
        Conversation(id=f"{prefix}{i}", questions=(f"{prefix} question {i}",)) for i in range(n)
    ]


async def run(
    server: TestServer, redis_url: str | None, events: list[Event], prefix: str, n: int
) -> nbllm.RunResult:
    async with nbllm.engines.OpenAIEngine(server.url) as engine:
        executor = Executor(
            engine,
            model="nbllm-test",
            concurrency=8,
            rpm=RATE,
            rate_window_s=WINDOW_S,
            retry=nbllm.RetryPolicy(retries=3, initial=0.1, maximum=0.5),
            redis_url=redis_url,
            listeners=[events.append],
        )
        return await executor.run(conversations(prefix, n))


def test_two_runs_with_one_redis_stay_under_the_shared_limit_together(redis):
    events: list[Event] = []
    with TestServer(rpm=RATE, window_s=WINDOW_S) as server:

        async def both():
            return await asyncio.gather(
                run(server, redis.url, events, "a", 12), run(server, redis.url, events, "b", 12)
            )

        first, second = asyncio.run(both())
        statuses = [entry.status for entry in server.requests]
    assert first.summary.turns_ok == second.summary.turns_ok == 12
    assert statuses.count(429) == 0, statuses
    assert first.summary.retries == second.summary.retries == 0
    assert not [e for e in events if isinstance(e, SharedQuota)]


def test_without_redis_the_same_two_runs_overshoot(redis):
    """The control: each run alone keeps rpm, so together they send twice the limit."""
    events: list[Event] = []
    with TestServer(rpm=RATE, window_s=WINDOW_S) as server:

        async def both():
            return await asyncio.gather(
                run(server, None, events, "a", 12), run(server, None, events, "b", 12)
            )

        asyncio.run(both())
        statuses = [entry.status for entry in server.requests]
    assert statuses.count(429) > 0


def test_redis_going_away_mid_run_falls_back_and_loses_no_turn(redis):
    events: list[Event] = []
    with TestServer(rpm=RATE, window_s=WINDOW_S) as server:

        async def run_and_kill():
            going = asyncio.ensure_future(run(server, redis.url, events, "a", 20))
            while len(server.requests) < 4:
                await asyncio.sleep(0.05)
            redis.kill()
            return await going

        result = asyncio.run(run_and_kill())
    assert result.summary.turns_ok == 20
    fallbacks = [e for e in events if isinstance(e, SharedQuota)]
    assert fallbacks and not fallbacks[0].shared
    assert "rpm is local for now" in fallbacks[0].reason
    # What the dashboard shows, from the same events.
    stats = RunStats()
    for event in events[:-1]:  # before RunFinished: the run is still going
        stats.update(event)
    note = stats.snapshot().quota_note
    assert note is not None and note.startswith("rpm is local for now")
    assert f"shared limits: {note}" in error_lines(stats.snapshot())


def test_an_unreachable_redis_is_refused_before_any_request(tmp_path):
    with TestServer() as server:
        with pytest.raises(
            ConfigError, match=r"^redis_url= cannot reach Redis at redis://127\.0\.0\.1:9"
        ):
            nbllm.run(
                [{"id": "a", "turns": ["hi"]}],
                model="nbllm-test",
                api_base=server.url,
                rpm=60,
                redis_url="redis://:s3cret-pw@127.0.0.1:9/0",
                progress=False,
                checkpoint=False,
            )
        assert server.requests == []


def test_the_redis_password_never_shows(tmp_path):
    config = nbllm.RunConfig(redis_url="redis://:s3cret-pw@127.0.0.1:6379/0")
    assert "s3cret-pw" not in repr(config) and "s3cret-pw" not in str(config)
