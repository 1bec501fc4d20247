"""Scheduling by priority: more conversations in progress than request slots, and a freed
slot goes to the conversation with the most turns left.

Every timed test runs on a fake clock (``helpers.FakeClockLoop``): the engine's latency is
an ``asyncio.sleep`` that takes no real time, so wall times are exact and comparable.
"""

from __future__ import annotations

import asyncio

import pytest
from helpers import on_fake_clock

from nbllm import ChatRequest, ChatResponse, Conversation, Engine, FakeEngine, RetryPolicy
from nbllm.errors import ConfigError
from nbllm.executor import Executor, RequestSent, TurnFinished
from nbllm.executor.events import Event
from nbllm.executor.runner import CONVERSATIONS_PER_SLOT
from nbllm.executor.slots import RequestSlots


def conversations(turns: list[int]) -> list[Conversation]:
    return [
        Conversation(id=f"c{i}", questions=tuple(f"c{i} q{k}" for k in range(n)))
        for i, n in enumerate(turns)
    ]


def turn_of(request: ChatRequest) -> str:
    """``"c3.1"`` for turn 1 of conversation c3."""
    conv, question = str(request.messages[-1]["content"]).split()
    return f"{conv}.{question[1:]}"


def sleeping(latency: float, log: list[str] | None = None):
    async def handler(request: ChatRequest) -> str:
        if log is not None:
            log.append(turn_of(request))
        await asyncio.sleep(latency)
        return "ok"

    return handler


# --------------------------------------------------------------------------- the slot pool


async def test_a_freed_slot_goes_to_the_smallest_priority_then_to_the_first_to_ask():
    slots = RequestSlots(1)
    await slots.acquire()
    served: list[str] = []

    async def wait(name: str, priority: tuple[int, ...]) -> None:
        await slots.acquire(priority)
        served.append(name)
        slots.release()

    waiters = [
        asyncio.create_task(wait(name, priority))
        for name, priority in [("late", (2,)), ("urgent", (0,)), ("tie-1", (1,)), ("tie-2", (1,))]
    ]
    await asyncio.sleep(0)
    assert slots.waiting == 4
    slots.release()
    await asyncio.gather(*waiters)
    assert served == ["urgent", "tie-1", "tie-2", "late"]
    assert slots.free == 1 and slots.waiting == 0


async def test_the_releasing_task_is_weighed_with_the_others():
    """A slot freed by a turn is handed over after its conversation asked for the next."""
    slots = RequestSlots(1)
    await slots.acquire((0,))
    served: list[str] = []

    async def other() -> None:
        await slots.acquire((5,))
        served.append("other")
        slots.release()

    waiter = asyncio.create_task(other())
    await asyncio.sleep(0)
    slots.release()
    await slots.acquire((1,))  # asked in the same step as the release: goes first
    served.append("releaser")
    slots.release()
    await waiter
    assert served == ["releaser", "other"]


async def test_a_waiter_cancelled_while_waiting_leaves_no_slot_behind():
    slots = RequestSlots(2)
    await slots.acquire()
    await slots.acquire()
    waiters = [asyncio.create_task(slots.acquire((i,))) for i in range(3)]
    await asyncio.sleep(0)
    waiters[0].cancel()
    waiters[2].cancel()
    await asyncio.sleep(0)
    assert slots.waiting == 1
    slots.release()
    await waiters[1]  # the one left gets the slot, the cancelled ones are skipped
    slots.release()
    slots.release()
    assert slots.free == 2 and slots.waiting == 0
    await slots.acquire()  # and the pool still works
    assert slots.free == 1


async def test_a_slot_handed_to_a_waiter_cancelled_at_that_moment_passes_on():
    slots = RequestSlots(1)
    await slots.acquire()
    first = asyncio.create_task(slots.acquire((0,)))
    second = asyncio.create_task(slots.acquire((1,)))
    await asyncio.sleep(0)
    slots.release()
    await asyncio.sleep(0)  # the hand-over: ``first``'s future is set, it has not run yet
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 1)  # the slot went on to the next waiter
    slots.release()
    assert slots.free == 1 and slots.waiting == 0


def test_a_release_of_a_slot_not_held_is_refused():
    with pytest.raises(RuntimeError, match="not held"):
        RequestSlots(1).release()


@pytest.mark.parametrize("capacity", [0, -1, 1.5, True])
def test_a_bad_capacity_is_refused(capacity):
    with pytest.raises(ConfigError, match=r"^concurrency= expected a whole number >= 1"):
        RequestSlots(capacity)


# --------------------------------------------------------------------------- the executor


@on_fake_clock
async def test_a_freed_slot_goes_to_the_conversation_with_the_most_turns_left():
    sent: list[str] = []
    executor = Executor(FakeEngine(sleeping(1.0, sent)), model="m", concurrency=1)
    result = await executor.run(conversations([1, 3, 2]))
    assert result.summary.turns_ok == 6
    # c1 has 3 turns left, then 2 (ties with c2's 2, but c1 is the longer conversation),
    # then 1 while c2 has 2; and so on. First come, first served would interleave them.
    assert sent == ["c1.0", "c1.1", "c2.0", "c1.2", "c2.1", "c0.0"]


async def fifo_wall(turns: list[int], concurrency: int, latency: float) -> float:
    """Wall time of a loop that starts every conversation at once behind one FIFO
    semaphore per request: what a hand-written loop does."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)

    async def conversation(n: int) -> None:
        for _ in range(n):
            async with gate:
                await asyncio.sleep(latency)

    t0 = loop.time()
    await asyncio.gather(*(conversation(n) for n in turns))
    return loop.time() - t0


@on_fake_clock
async def test_the_longest_chain_never_waits_so_wall_time_is_the_lower_bound():
    """One conversation of 4 turns and six of 1 on 2 slots: the lower bound is
    max(critical path 4 s, 10 s of work / 2 slots) = 5 s. A FIFO queue sends the long
    chain's second turn behind the short ones (6 s); priority reaches the bound."""
    loop = asyncio.get_running_loop()
    turns = [1, 1, 1, 4, 1, 1, 1]
    assert await fifo_wall(turns, 2, 1.0) == pytest.approx(6.0)
    executor = Executor(FakeEngine(sleeping(1.0)), model="m", concurrency=2)
    t0 = loop.time()
    result = await executor.run(conversations(turns))
    assert result.summary.turns_ok == 10
    assert loop.time() - t0 == pytest.approx(5.0)


class Census:
    """Requests in flight and conversations in progress, at their peak."""

    def __init__(self) -> None:
        self.in_flight = self.peak_in_flight = 0
        self.started: set[str] = set()
        self.finished: set[str] = set()
        self.peak_in_progress = 0

    async def handler(self, request: ChatRequest) -> str:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        await asyncio.sleep(1.0)
        self.in_flight -= 1
        return "ok"

    def listener(self, event: Event) -> None:
        if isinstance(event, RequestSent) and event.turn == 0:
            self.started.add(str(event.conversation_id))
        elif isinstance(event, TurnFinished) and event.conversation_done:
            self.finished.add(str(event.record.conversation_id))
        self.peak_in_progress = max(self.peak_in_progress, len(self.started - self.finished))


@on_fake_clock
@pytest.mark.parametrize(
    ("max_conversations", "expected"),
    [(None, CONVERSATIONS_PER_SLOT * 3), (3, 3), (5, 5)],
)
async def test_caps_on_requests_and_conversations_hold_and_are_used(max_conversations, expected):
    census = Census()
    executor = Executor(
        FakeEngine(census.handler),
        model="m",
        concurrency=3,
        max_conversations=max_conversations,
        listeners=[census.listener],
    )
    assert executor.max_conversations == expected
    result = await executor.run(conversations([4] * 40))
    assert result.summary.turns_ok == 160
    assert census.peak_in_flight == 3
    assert census.peak_in_progress == expected


@on_fake_clock
async def test_rpm_stays_exact_with_many_conversations_waiting():
    loop = asyncio.get_running_loop()
    sent: list[float] = []

    def handler(request: ChatRequest) -> str:
        sent.append(loop.time())
        return "ok"

    executor = Executor(FakeEngine(handler), model="m", concurrency=4, rpm=20, rate_window_s=2.0)
    result = await executor.run(conversations([3] * 20))
    assert result.summary.turns_ok == 60
    for t in sent:
        assert sum(1 for s in sent if t - 2.0 < s <= t) <= 20


@on_fake_clock
async def test_a_stop_leaves_every_slot_free():
    executor: Executor
    loop = asyncio.get_running_loop()

    async def handler(request: ChatRequest) -> str:
        if request.messages[-1]["content"] == "c0 q1":
            loop.call_soon(executor.stop)
        await asyncio.sleep(1.0)
        return "ok"

    executor = Executor(FakeEngine(handler), model="m", concurrency=3)
    result = await executor.run(conversations([4] * 30))
    assert result.interrupted
    assert 0 < result.summary.turns_ok < 120
    # Dozens of turns were waiting for a slot when the stop came; every one let go.
    assert executor._slots.free == 3 and executor._slots.waiting == 0


@on_fake_clock
async def test_a_cancelled_run_leaves_every_slot_free():
    executor = Executor(FakeEngine(sleeping(1.0)), model="m", concurrency=3)
    task = asyncio.create_task(executor.run(conversations([4] * 30)))
    await asyncio.sleep(2.5)
    task.cancel()
    result = await task
    assert result.interrupted and result.summary.turns_ok == 6
    assert executor._slots.free == 3 and executor._slots.waiting == 0


# --------------------------------------------------------------------------- timeouts


class SlowLocalEngine(Engine):
    """A local engine's shape: answers take 2 s and it applies ``request.timeout`` itself
    (to the wait for a batch slot, which here is never long)."""

    name = "slow-local"
    bounds_own_timeout = True

    async def _complete(self, request: ChatRequest) -> ChatResponse:
        await asyncio.sleep(2.0)
        return ChatResponse("done", request.model)


class SlowApiEngine(SlowLocalEngine):
    name = "slow-api"
    bounds_own_timeout = False


@on_fake_clock
async def test_an_engine_that_bounds_its_own_timeout_is_not_timed_out_by_the_run():
    local = await Executor(SlowLocalEngine(), model="m", timeout=0.5).run(conversations([1]))
    assert local.df["answer"].tolist() == ["done"]
    assert local.df["attempts"].tolist() == [1]
    api = Executor(SlowApiEngine(), model="m", timeout=0.5, retry=RetryPolicy(retries=0))
    result = await api.run(conversations([1]))
    assert result.df["error"].iloc[0].startswith("RequestTimeout")


# --------------------------------------------------------------------------- bad options


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"concurrency": 0}, "concurrency= expected a whole number >= 1, got 0"),
        ({"max_conversations": 0}, "max_conversations= expected a whole number >= 1, got 0"),
        ({"max_conversations": 2.5}, "max_conversations= expected a whole number >= 1, got 2.5"),
        ({"rpm": -1}, "rpm= expected a number > 0, got -1"),
        ({"rpm": 0}, "rpm= expected a number > 0, got 0"),
        ({"tpm": float("nan")}, "tpm= expected a number > 0, got nan"),
        ({"rpm": 10, "rate_window_s": 0}, "rate_window_s= expected a number > 0, got 0"),
        ({"timeout": -5}, "timeout= expected a number > 0 or None, got -5"),
        ({"stop_grace_s": -1}, "stop_grace_s= expected a number >= 0, got -1"),
        ({"stop_grace_s": None}, "stop_grace_s= expected a number >= 0, got None"),
    ],
)
def test_bad_options_are_refused_naming_the_option(options, message):
    with pytest.raises(ConfigError) as caught:
        Executor(FakeEngine(), model="m", **options)
    assert str(caught.value) == message
