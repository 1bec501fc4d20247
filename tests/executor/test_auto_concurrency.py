"""concurrency="auto": a slot count found while running, from a provider's 429s."""

from __future__ import annotations

import asyncio

import pytest

import nbllm
from nbllm.engines import FakeEngine
from nbllm.errors import ConfigError, RateLimitError
from nbllm.executor import Executor
from nbllm.executor.events import Event, LimitChanged
from nbllm.executor.limits import AUTO_CONCURRENCY
from nbllm.executor.slots import RequestSlots
from nbllm.retry import RetryPolicy
from nbllm.types import ChatRequest, Conversation


async def settle() -> None:
    for _ in range(3):  # the hand-over, then the waiter's own step
        await asyncio.sleep(0)


async def test_a_raise_lets_waiters_go_and_a_cut_holds_back_released_slots():
    slots = RequestSlots(2)
    await slots.acquire()
    await slots.acquire()
    waiter = asyncio.ensure_future(slots.acquire())
    await settle()
    assert not waiter.done()
    slots.set_capacity(3)
    await settle()
    assert waiter.done()  # the raise let it go at once
    slots.set_capacity(1)  # three held, one allowed
    slots.release()
    slots.release()
    late = asyncio.ensure_future(slots.acquire())
    await settle()
    assert not late.done()  # two released, still at the new count of one
    slots.release()
    await settle()
    assert late.done()


async def test_auto_concurrency_settles_under_what_the_provider_takes_at_once():
    """A provider that answers 429 to a fifth request in flight: the run halves its slot
    count from 8 and every turn is answered."""
    in_flight = 0
    most_after_cut = 0
    cut = False

    async def provider(request: ChatRequest) -> str:
        nonlocal in_flight, most_after_cut
        in_flight += 1
        try:
            if in_flight > 4:
                raise RateLimitError("HTTP 429: too many at once")
            await asyncio.sleep(0.01)
            if cut:
                most_after_cut = max(most_after_cut, in_flight)
            return "ok"
        finally:
            in_flight -= 1

    events: list[Event] = []

    def listen(event: Event) -> None:
        nonlocal cut
        events.append(event)
        if isinstance(event, LimitChanged) and event.kind == "concurrency":
            cut = True

    executor = Executor(
        FakeEngine(provider),
        model="m",
        concurrency="auto",
        retry=RetryPolicy(retries=8, initial=0.01, maximum=0.05),
        listeners=[listen],
    )
    conversations = [Conversation(id=i, questions=(f"q{i}",)) for i in range(60)]
    result = await executor.run(conversations)
    assert result.summary.turns_ok == 60
    limits = [e.limit for e in events if isinstance(e, LimitChanged)]
    assert limits and limits[0] == AUTO_CONCURRENCY["start"] / 2
    assert most_after_cut <= 4


def test_auto_concurrency_is_an_option_everywhere_and_a_bad_word_is_refused():
    with pytest.raises(ConfigError, match="concurrency= expected a whole number >= 1 or 'auto'"):
        nbllm.RunConfig(concurrency="many")
    assert nbllm.RunConfig(concurrency="auto").concurrency == "auto"
    from nbllm.config import parse_run_option

    assert parse_run_option("concurrency", "auto") == "auto"
    result = nbllm.run(
        [{"id": 1, "turns": ["a", "b"]}],
        engine=FakeEngine(),
        concurrency="auto",
        checkpoint=False,
        cache=False,
        progress=False,
    )
    assert result.summary.turns_ok == 2
