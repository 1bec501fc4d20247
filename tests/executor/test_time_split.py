"""Where a turn's time went: ``queue_s`` (waiting for a slot, a limit, a pause, a backoff)
and ``service_s`` (the requests themselves), per row, in the checkpoint and in the summary."""

from __future__ import annotations

import pytest
from helpers import on_fake_clock

import nbllm
from nbllm import ChatRequest, Conversation, FakeEngine, RetryPolicy
from nbllm.errors import ServerError
from nbllm.executor import Executor


def conversations(turns: list[int]) -> list[Conversation]:
    return [
        Conversation(id=f"c{i}", questions=tuple(f"c{i} q{k}" for k in range(n)))
        for i, n in enumerate(turns)
    ]


@on_fake_clock
async def test_a_turn_waiting_for_the_only_slot_is_queued_not_served():
    """One slot, three one-turn conversations of 1 s each: the second waits 1 s, the
    third 2 s; each is served 1 s."""
    executor = Executor(FakeEngine(latency=1.0), model="m", concurrency=1)
    result = await executor.run(conversations([1, 1, 1]))
    df = result.df
    assert sorted(df["queue_s"]) == pytest.approx([0.0, 1.0, 2.0], abs=1e-6)
    assert list(df["service_s"]) == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)
    assert list(df["latency_s"]) == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)
    s = result.summary
    assert s.queue_p50 == pytest.approx(1.0, abs=1e-6)
    assert s.queue_p95 == pytest.approx(1.9, abs=1e-6)
    assert s.service_p50 == s.service_p95 == pytest.approx(1.0, abs=1e-6)


@on_fake_clock
async def test_a_retry_serves_twice_and_queues_its_backoff():
    """A 5xx after 0.5 s, a 2 s backoff, then an answer after 0.5 s: service 1 s (both
    attempts), queue 2 s (the backoff); latency is the answered attempt's."""
    calls = 0

    def flaky(request: ChatRequest) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ServerError("HTTP 503: busy", status=503, retry_after=2.0)
        return "ok"

    # The server's Retry-After (2 s) is longer than any jittered backoff (<= 1 s): exact.
    retry = RetryPolicy(retries=1, initial=1.0, maximum=1.0)
    executor = Executor(FakeEngine(flaky, latency=0.5), model="m", retry=retry)
    result = await executor.run(conversations([1]))
    row = result.df.iloc[0]
    assert row["answer"] == "ok" and row["attempts"] == 2
    assert row["service_s"] == pytest.approx(1.0, abs=1e-6)
    assert row["latency_s"] == pytest.approx(0.5, abs=1e-6)
    assert row["queue_s"] == pytest.approx(2.0, abs=1e-6)


@on_fake_clock
async def test_a_failed_turn_has_its_times_and_counts_in_the_summary():
    def failing(request: ChatRequest) -> str:
        raise ServerError("HTTP 500: down", status=500)

    executor = Executor(FakeEngine(failing, latency=0.25), model="m", retry=RetryPolicy(retries=0))
    result = await executor.run(conversations([2]))
    first, skipped = result.df.iloc[0], result.df.iloc[1]
    assert first["service_s"] == pytest.approx(0.25, abs=1e-6)
    assert first["queue_s"] == pytest.approx(0.0, abs=1e-6)
    assert skipped["service_s"] is None or str(skipped["service_s"]) == "<NA>"
    assert result.summary.service_p50 == pytest.approx(0.25, abs=1e-6)


def test_cached_and_resumed_rows_keep_or_zero_their_times(tmp_path):
    data = [{"id": "a", "turns": ["q0", "q1"]}]
    options = {"engine": FakeEngine(latency=0.01), "model": "m", "progress": False}
    first = nbllm.run(data, checkpoint=tmp_path / "ck", cache=tmp_path / "c", **options)
    resumed = nbllm.run(data, checkpoint=tmp_path / "ck", cache=tmp_path / "c", **options)
    cached = nbllm.run(data, checkpoint=False, cache=tmp_path / "c", **options)
    assert resumed.df["resumed"].all()
    assert list(resumed.df["service_s"]) == list(first.df["service_s"])
    assert list(resumed.df["queue_s"]) == list(first.df["queue_s"])
    assert cached.df["cached"].all()
    assert list(cached.df["service_s"]) == [0.0, 0.0]
    assert list(cached.df["queue_s"]) == [0.0, 0.0]
    # Neither sent a request in its run: no time to report.
    assert resumed.summary.service_p50 is None and cached.summary.queue_p50 is None
