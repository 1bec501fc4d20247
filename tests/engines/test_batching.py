"""The dynamic batcher: batches by size or by wait, never mixes groups, keeps order, and
times out only a request still waiting for its batch, never one that generates."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from nbllm.engines.local.batching import DynamicBatcher, ModelThread
from nbllm.errors import ConfigError, RequestTimeout


class Recorder:
    """A batch function that records the batches it ran and answers each item doubled."""

    def __init__(self, delay: float = 0.0, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.delay = delay
        self.fail_on = fail_on
        self.threads: set[str] = set()
        self.started: list[float] = []  # time.monotonic() as each batch starts

    def __call__(self, items):
        self.started.append(time.monotonic())
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(items))
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError(f"cannot do {self.fail_on}")
        if self.delay:
            time.sleep(self.delay)
        return [2 * item for item in items]


async def test_concurrent_requests_share_a_batch_and_get_their_own_answers():
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch_size=4, max_wait_s=0.05)
    answers = await asyncio.gather(*(batcher.submit(i) for i in range(4)))
    assert answers == [0, 2, 4, 6]
    assert run.batches == [[0, 1, 2, 3]]
    assert threading.current_thread().name not in run.threads  # the model runs off the loop
    await batcher.aclose()


async def test_a_full_batch_starts_without_waiting_for_the_wait_bound():
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch_size=2, max_wait_s=30)
    t0 = time.monotonic()
    assert await asyncio.gather(batcher.submit(1), batcher.submit(2)) == [2, 4]
    assert time.monotonic() - t0 < 5
    await batcher.aclose()


async def test_a_lone_request_waits_the_wait_bound_and_no_longer():
    wait = 0.2
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch_size=64, max_wait_s=wait)
    t0 = time.monotonic()
    assert await batcher.submit(21) == 42
    waited = run.started[0] - t0
    # The margin covers a timer firing late and the hop to the model thread on a busy
    # machine, not a second wait or a polling loop.
    assert wait <= waited < wait + 0.1
    await batcher.aclose()


async def test_more_requests_than_a_batch_are_split_in_arrival_order():
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch_size=3, max_wait_s=0.02)
    answers = await asyncio.gather(*(batcher.submit(i) for i in range(7)))
    assert answers == [2 * i for i in range(7)]
    assert [len(b) for b in run.batches] == [3, 3, 1]
    assert [i for b in run.batches for i in b] == list(range(7))
    await batcher.aclose()


async def test_groups_never_share_a_batch():
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch_size=8, max_wait_s=0.02)
    answers = await asyncio.gather(
        *(batcher.submit(i, group="even" if i % 2 == 0 else "odd") for i in range(6))
    )
    assert answers == [2 * i for i in range(6)]
    assert sorted(map(sorted, run.batches)) == [[0, 2, 4], [1, 3, 5]]
    await batcher.aclose()


async def test_batch_size_one_runs_each_request_alone():
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch_size=1, max_wait_s=0.5)
    t0 = time.monotonic()
    assert await asyncio.gather(*(batcher.submit(i) for i in range(3))) == [0, 2, 4]
    assert run.batches == [[0], [1], [2]]
    assert time.monotonic() - t0 < 1  # a full batch of one never waits
    await batcher.aclose()


async def test_requests_arriving_during_a_batch_form_the_next_one():
    run = Recorder(delay=0.2)
    batcher = DynamicBatcher(run, max_batch_size=4, max_wait_s=0.01)
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0.05)  # batch [0] is generating now
    later = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2, 3)]
    assert await first == 0
    assert [await f for f in later] == [2, 4, 6]
    assert run.batches == [[0], [1, 2, 3]]
    await batcher.aclose()


async def test_a_failed_batch_fails_its_requests_only():
    run = Recorder(fail_on=1)
    batcher = DynamicBatcher(run, max_batch_size=2, max_wait_s=0.01)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(4)), return_exceptions=True)
    assert isinstance(results[0], RuntimeError) and isinstance(results[1], RuntimeError)
    assert results[2:] == [4, 6]
    await batcher.aclose()


async def test_a_cancelled_request_leaves_the_queue():
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch_size=8, max_wait_s=0.2)
    doomed = asyncio.ensure_future(batcher.submit(99))
    await asyncio.sleep(0.01)
    doomed.cancel()
    assert await batcher.submit(1) == 2
    assert 99 not in [i for b in run.batches for i in b]
    await batcher.aclose()


def test_the_batcher_works_again_on_a_new_event_loop():
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch_size=2, max_wait_s=0.01)
    assert asyncio.run(batcher.submit(1)) == 2
    assert asyncio.run(batcher.submit(2)) == 4  # the first loop is closed by now
    asyncio.run(batcher.aclose())


@pytest.mark.parametrize(
    ("size", "wait", "option"),
    [
        (0, 0.01, "batch_size"),
        (2.5, 0.01, "batch_size"),
        (True, 0.01, "batch_size"),
        (2, -1, "batch_wait_s"),
        (2, float("nan"), "batch_wait_s"),
        (2, "0.1", "batch_wait_s"),
    ],
)
def test_bad_settings_are_refused_naming_the_option(size, wait, option):
    with pytest.raises(ConfigError, match=rf"^{option} must be .*, got "):
        DynamicBatcher(Recorder(), max_batch_size=size, max_wait_s=wait)


async def test_one_request_at_a_time_stops_paying_the_wait():
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch_size=8, max_wait_s=0.2)
    assert await batcher.submit(1) == 2  # the first waits: company may come
    t0 = time.monotonic()
    for i in range(3):
        assert await batcher.submit(i) == 2 * i
    assert time.monotonic() - t0 < 0.2  # after a batch of one, no more waiting
    # Company arriving together is still batched.
    assert await asyncio.gather(*(batcher.submit(i) for i in range(4))) == [0, 2, 4, 6]
    assert run.batches[-1] == [0, 1, 2, 3]
    await batcher.aclose()


async def test_a_model_call_given_up_before_it_starts_is_skipped():
    ran: list[str] = []
    release = threading.Event()

    def call(name: str) -> str:
        if name == "first":
            release.wait(5)
        ran.append(name)
        return name

    thread = ModelThread("test-model")
    first = thread.call(call, "first")
    doomed = thread.call(call, "doomed")
    doomed.cancel()  # still queued behind "first"
    release.set()
    assert await first == "first"
    assert await thread.call(call, "last") == "last"
    assert ran == ["first", "last"]
    thread.stop()


async def test_stopping_the_model_thread_cancels_the_calls_still_queued():
    started, release = threading.Event(), threading.Event()

    def block(_: object) -> str:
        started.set()
        release.wait(5)
        return "done"

    thread = ModelThread("test-model")
    running = thread.call(block, None)
    queued = thread.call(str, "late")
    assert await asyncio.to_thread(started.wait, 5)
    thread.stop()
    release.set()
    assert await running == "done"  # the call under way ends normally
    with pytest.raises(asyncio.CancelledError):
        await queued


class Gate:
    """A batch function that blocks each batch until released, and records what ran."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, items):
        self.batches.append(list(items))
        self.started.set()
        assert self.release.wait(10)
        return [2 * item for item in items]


async def test_a_queued_request_times_out_and_a_running_one_never_does():
    gate = Gate()
    batcher = DynamicBatcher(gate, max_batch_size=1, max_wait_s=0)
    # The first request's batch starts at once and then outlasts the timeout of both.
    running = asyncio.ensure_future(batcher.submit(1, timeout=0.05))
    assert await asyncio.to_thread(gate.started.wait, 5)
    with pytest.raises(RequestTimeout, match=r"0\.05 s timeout.*never started"):
        await batcher.submit(2, timeout=0.05)
    assert batcher._queue == []  # the timed-out request left the queue
    await asyncio.sleep(0.1)  # well past the running request's timeout
    assert not running.done()
    gate.release.set()
    assert await running == 2  # it ran to its end, once
    # Sent again (a retry), the timed-out request runs after it, without restarting it.
    assert await batcher.submit(2, timeout=0.05) == 4
    assert gate.batches == [[1], [2]]
    await batcher.aclose()


async def test_a_model_call_that_waits_past_its_timeout_never_runs():
    gate = Gate()
    thread = ModelThread("test-model")
    running = thread.call(gate, [1], timeout=0.05)
    assert await asyncio.to_thread(gate.started.wait, 5)
    with pytest.raises(RequestTimeout, match="never started"):
        await thread.call(gate, [2], timeout=0.05)
    gate.release.set()
    assert await running == [2]  # past its own timeout, it was not cut
    assert await thread.call(gate, [3], timeout=0.05) == [6]
    assert gate.batches == [[1], [3]]
    thread.stop()
