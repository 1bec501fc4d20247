"""The executor against FakeEngine: scheduling, history, retries, failures, order, cancellation."""

from __future__ import annotations

import asyncio
import itertools
import random

import pandas as pd
import pytest
from helpers import on_fake_clock

from nbllm import (
    ChatRequest,
    ChatResponse,
    Conversation,
    FakeEngine,
    RateLimitError,
    RequestRejected,
    RetryPolicy,
    ServerError,
)
from nbllm.executor import (
    Executor,
    RequestSent,
    RetryScheduled,
    RunFinished,
    RunStarted,
    TurnFinished,
)
from nbllm.executor.events import Event

FAST = RetryPolicy(retries=3, initial=0.0)


def conversations(n: int, turns=lambda i: 1 + i % 4) -> list[Conversation]:
    return [
        Conversation(
            id=f"c{i}",
            questions=tuple(f"c{i} question {k}" for k in range(turns(i))),
            references=tuple(f"ref {i}.{k}" for k in range(turns(i))),
            context=f"context of c{i}",
        )
        for i in range(n)
    ]


def answer_of(request: ChatRequest) -> str:
    return "answer to " + request.messages[-1]["content"]


async def test_turn_k_carries_every_earlier_answer():
    seen: list[list[dict]] = []

    def handler(request: ChatRequest) -> str:
        seen.append([dict(m) for m in request.messages])
        return answer_of(request)

    convs = conversations(5, turns=lambda i: 4)
    result = await Executor(FakeEngine(handler), model="m", system="be brief").run(convs)
    assert result.summary.turns_ok == 20
    for messages in seen:
        assert messages[0] == {
            "role": "system",
            "content": "be brief\n\n" + f"context of {messages[1]['content'].split()[0]}",
        }
        pairs = messages[1:-1]
        for user, assistant in zip(pairs[::2], pairs[1::2], strict=True):
            assert user["role"] == "user" and assistant["role"] == "assistant"
            assert assistant["content"] == "answer to " + user["content"]
        assert messages[-1]["role"] == "user"
    assert max(len(m) for m in seen) == 1 + 2 * 3 + 1


async def test_rows_come_back_in_input_order_whatever_finished_first():
    rng = random.Random(1)

    async def handler(request: ChatRequest) -> str:
        await asyncio.sleep(rng.random() * 0.01)
        return answer_of(request)

    convs = conversations(40)
    result = await Executor(FakeEngine(handler), model="m", concurrency=16).run(convs)
    expected = [(c.id, k) for c in convs for k in range(len(c))]
    assert list(zip(result.df["conversation_id"], result.df["turn"], strict=True)) == expected
    assert list(result.df["reference"][:2]) == ["ref 0.0", "ref 1.0"]
    assert (result.df["answer"] == "answer to " + result.df["question"]).all()


async def test_no_conversation_waits_for_another_conversations_turn():
    """A slow conversation never holds back the others' later turns (no barrier per turn):
    c0's first turn is answered only once every other conversation has finished."""
    others_done = asyncio.Event()
    finished: set[str] = set()

    async def handler(request: ChatRequest) -> str:
        if request.messages[-1]["content"].startswith("c0 "):
            await others_done.wait()
        return answer_of(request)

    def listener(event: Event) -> None:
        if isinstance(event, TurnFinished) and event.conversation_done:
            finished.add(str(event.record.conversation_id))
            if finished == {"c1", "c2", "c3"}:
                others_done.set()

    convs = conversations(4, turns=lambda i: 3)
    executor = Executor(FakeEngine(handler), model="m", concurrency=4, listeners=[listener])
    result = await asyncio.wait_for(executor.run(convs), 10)
    assert result.summary.turns_ok == 12
    df = result.df
    slow_first_turn_done = df[(df.conversation_id == "c0") & (df.turn == 0)].finished_at.item()
    others_last_turns = df[(df.conversation_id != "c0") & (df.turn == 2)].finished_at
    assert (others_last_turns <= slow_first_turn_done).all()


async def test_longest_conversations_start_first_and_slots_refill_at_once():
    started: list[str] = []

    def listener(event: Event) -> None:
        if isinstance(event, RequestSent) and event.turn == 0:
            started.append(event.conversation_id)

    convs = conversations(8, turns=lambda i: [1, 5, 2, 5, 3, 1, 4, 2][i])
    engine = FakeEngine(answer_of, latency=0.01)
    await Executor(engine, model="m", concurrency=2, listeners=[listener]).run(convs)
    assert started == ["c1", "c3", "c6", "c4", "c2", "c7", "c0", "c5"]


async def test_concurrency_caps_requests_in_flight():
    in_flight = 0
    peak = 0

    async def handler(request: ChatRequest) -> str:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.005)
        in_flight -= 1
        return "ok"

    await Executor(FakeEngine(handler), model="m", concurrency=7).run(conversations(60))
    assert peak == 7


@on_fake_clock
async def test_rate_limit_errors_are_retried_counted_and_honour_retry_after():
    loop = asyncio.get_running_loop()
    sent: dict[str, list[float]] = {}  # the question -> when each attempt reached the engine

    def handler(request: ChatRequest) -> str:
        times = sent.setdefault(request.messages[-1]["content"], [])
        times.append(loop.time())
        if len(times) <= 2:
            raise RateLimitError("HTTP 429: slow down", status=429, retry_after=0.05)
        return answer_of(request)

    result = await Executor(FakeEngine(handler), model="m", retry=FAST).run(conversations(3))
    assert result.summary.turns_ok == len(result.df)
    assert (result.df["attempts"] == 3).all()
    assert result.summary.retries == 2 * len(result.df)
    assert sorted(sent) == sorted(result.df["question"])
    # FAST has no backoff of its own: every wait between attempts is the Retry-After.
    gaps = [
        later - earlier for times in sent.values() for earlier, later in itertools.pairwise(times)
    ]
    assert len(gaps) == 2 * len(result.df)
    assert min(gaps) == pytest.approx(0.05)


async def test_input_errors_are_never_retried_and_end_only_their_conversation():
    def handler(request: ChatRequest) -> str:
        if request.messages[-1]["content"] == "c1 question 1":
            raise RequestRejected("HTTP 400: bad request", status=400)
        return answer_of(request)

    engine = FakeEngine(handler)
    convs = conversations(4, turns=lambda i: 3)
    result = await Executor(engine, model="m", retry=FAST).run(convs)
    df = result.df.set_index(["conversation_id", "turn"])
    assert df.loc[("c1", 1), "attempts"] == 1
    assert df.loc[("c1", 1), "error"].startswith("RequestRejected: HTTP 400")
    assert df.loc[("c1", 2), "error"] == "skipped: turn 1 failed"
    assert df.loc[("c1", 2), "attempts"] == 0
    assert pd.isna(df.loc[("c1", 0), "error"])
    assert result.summary.turns_ok == 12 - 2
    assert result.summary.turns_failed == 2
    assert engine.calls == 12 - 1  # c1's last turn was never sent


async def test_retries_run_out_and_the_error_lands_in_the_row():
    def handler(request: ChatRequest) -> str:
        raise ServerError("HTTP 503: overloaded", status=503)

    result = await Executor(FakeEngine(handler), model="m", retry=FAST).run(conversations(2))
    assert (result.df["attempts"].iloc[[0, 1]] == 4).all()
    assert result.df["error"].iloc[0] == "ServerError: HTTP 503: overloaded"
    assert result.summary.turns_ok == 0


async def test_an_engine_bug_becomes_a_row_error_not_a_crash():
    def handler(request: ChatRequest) -> str:
        if "c2" in request.messages[-1]["content"]:
            raise KeyError("oops")
        return "fine"

    result = await Executor(FakeEngine(handler), model="m", retry=FAST).run(conversations(4))
    errors = result.df.set_index(["conversation_id", "turn"])["error"]
    assert errors.loc[("c2", 0)].startswith("EngineError: KeyError")
    assert result.summary.turns_ok == len(result.df) - len(conversations(4)[2])


@on_fake_clock
async def test_timeout_per_attempt_is_retried_then_reported():
    loop = asyncio.get_running_loop()

    async def handler(request: ChatRequest) -> str:
        await asyncio.sleep(10)
        return "late"

    executor = Executor(
        FakeEngine(handler), model="m", timeout=0.05, retry=RetryPolicy(retries=1, initial=0)
    )
    t0 = loop.time()
    result = await executor.run(conversations(1))
    assert loop.time() - t0 == pytest.approx(0.1)  # two attempts of 0.05 s, not 10 s
    assert result.df["error"].iloc[0].startswith("RequestTimeout")
    assert result.df["attempts"].iloc[0] == 2


@on_fake_clock
async def test_rpm_limit_is_never_exceeded_in_a_real_minute():
    loop = asyncio.get_running_loop()
    sent: list[float] = []

    def handler(request: ChatRequest) -> str:
        sent.append(loop.time())
        return "ok"

    executor = Executor(FakeEngine(handler), model="m", concurrency=50, rpm=15)
    result = await executor.run(conversations(20, turns=lambda i: 2))
    assert result.summary.turns_ok == 40
    sent.sort()
    for i, t in enumerate(sent):
        in_window = [s for s in sent[: i + 1] if s > t - 60.0]
        assert len(in_window) <= 15
    # ... and the budget is used, evenly: one request every 60 / 15 = 4 s, plus the
    # limiter's safety margin of 1 s when a request waits for the minute to move on.
    gaps = [later - earlier for earlier, later in itertools.pairwise(sent)]
    assert min(gaps) == pytest.approx(4.0, abs=0.01)
    assert max(gaps) == pytest.approx(5.0, abs=0.01)


@on_fake_clock
async def test_tpm_limit_counts_real_usage(short_minute):
    loop = asyncio.get_running_loop()

    def handler(request: ChatRequest) -> ChatResponse:
        return ChatResponse("ok", "m", prompt_tokens=90, completion_tokens=10)

    sent: list[float] = []

    def listener(event: Event) -> None:
        if isinstance(event, RequestSent):
            sent.append(loop.time())

    executor = Executor(
        FakeEngine(handler),
        model="m",
        tpm=1000,
        listeners=[listener],
        params={"max_tokens": 5},
        rate_window_s=short_minute,
        concurrency=1,
    )
    await executor.run(conversations(15, turns=lambda i: 1))
    # 15 requests x 100 real tokens against 1000 tokens per 2 s: 10 in the first "minute"
    # (their estimates are smaller, but one at a time each is settled at 100 before the
    # next goes).
    assert len(sent) == 15
    for i, t in enumerate(sent):
        assert len([s for s in sent[: i + 1] if s > t - short_minute]) <= 10
    assert sent[-1] - sent[0] >= short_minute


def test_rate_window_s_is_the_minute_of_both_limits():
    executor = Executor(FakeEngine(), model="m", rpm=10, tpm=500, rate_window_s=2.5)
    limits = executor.limits
    assert limits.rpm is not None and limits.rpm.period == 2.5
    assert limits.tpm is not None and limits.tpm.period == 2.5
    default = Executor(FakeEngine(), model="m", rpm=10, tpm=500).limits
    assert default.rpm is not None and default.rpm.period == 60.0
    assert default.tpm is not None and default.tpm.period == 60.0


async def test_events_tell_the_story_of_the_run():
    events: list[Event] = []
    failed: list[ChatRequest] = []

    def handler(request: ChatRequest) -> str:
        if not failed:
            failed.append(request)
            raise ServerError("HTTP 500: once", status=500)
        return "ok"

    await Executor(FakeEngine(handler), model="m", retry=FAST, listeners=[events.append]).run(
        conversations(3)
    )
    assert isinstance(events[0], RunStarted) and events[0].turns == 1 + 2 + 3
    assert isinstance(events[-1], RunFinished) and events[-1].turns_ok == 6
    assert sum(isinstance(e, TurnFinished) for e in events) == 6
    assert sum(isinstance(e, TurnFinished) and e.conversation_done for e in events) == 3
    assert sum(isinstance(e, RetryScheduled) for e in events) == 1


async def test_a_failing_listener_is_dropped_and_the_run_goes_on(caplog):
    def bad_listener(event: Event) -> None:
        raise RuntimeError("listener bug")

    result = await Executor(FakeEngine(answer_of), model="m", listeners=[bad_listener]).run(
        conversations(3)
    )
    assert result.summary.turns_ok == 6
    assert "listener" in caplog.text


async def test_cancelling_the_run_returns_what_finished():
    hanging: list[str] = []
    all_hang = asyncio.Event()

    async def handler(request: ChatRequest) -> str:
        if request.messages[-1]["content"].endswith("question 1"):
            hanging.append(request.messages[-1]["content"])
            if len(hanging) == 4:
                all_hang.set()
            await asyncio.sleep(30)
        return answer_of(request)

    executor = Executor(FakeEngine(handler), model="m", concurrency=4)
    task = asyncio.create_task(executor.run(conversations(4, turns=lambda i: 3)))
    await asyncio.wait_for(all_hang.wait(), 10)  # every turn 0 answered, every turn 1 sent
    task.cancel()
    result = await asyncio.wait_for(task, 2)
    assert result.interrupted
    assert len(result.df) == 12
    done = result.df[result.df["error"].isna()]
    assert set(done["turn"]) == {0}
    assert len(done) == 4
    assert result.df["error"].str.startswith("not run").sum() == 8


async def test_stop_lets_in_flight_requests_finish_and_starts_nothing_new():
    executor: Executor

    async def handler(request: ChatRequest) -> str:
        await asyncio.sleep(0.05)
        if request.messages[-1]["content"] == "c0 question 0":
            executor.stop()
        return answer_of(request)

    executor = Executor(FakeEngine(handler), model="m", concurrency=2)
    result = await executor.run(conversations(10, turns=lambda i: 3))
    assert result.interrupted
    assert result.summary.turns_ok == 2  # the two turns in flight when stop() came
    assert result.summary.turns == 30


async def test_an_executor_runs_one_batch_at_a_time():
    sending, release = asyncio.Event(), asyncio.Event()

    async def handler(request: ChatRequest) -> str:
        sending.set()
        await release.wait()
        return answer_of(request)

    executor = Executor(FakeEngine(handler), model="m")
    first = asyncio.create_task(executor.run(conversations(2)))
    await asyncio.wait_for(sending.wait(), 10)
    with pytest.raises(RuntimeError, match="already running"):
        await executor.run(conversations(2))
    release.set()
    assert (await first).summary.turns_ok == 3


async def test_stop_sends_nothing_that_was_still_waiting_for_a_slot():
    executor: Executor
    sent = 0

    async def handler(request: ChatRequest) -> str:
        nonlocal sent
        sent += 1
        await asyncio.sleep(0.05)
        executor.stop()
        return answer_of(request)

    # 8 conversations want to go at once, but only 2 slots: the 6 waiting never go.
    executor = Executor(FakeEngine(handler), model="m", concurrency=2, max_conversations=8)
    result = await executor.run(conversations(8, turns=lambda i: 2))
    assert sent == 2
    assert result.summary.turns_ok == 2
    assert result.interrupted
