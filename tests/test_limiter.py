"""RateLimiter: the window promise holds, waiters are served in order, nothing spins."""

from __future__ import annotations

import asyncio

import pytest

from nbllm.executor.limiter import RateLimiter


def max_in_window(times: list[float], period: float) -> int:
    times = sorted(times)
    best = 0
    start = 0
    for end, t in enumerate(times):
        while times[start] <= t - period:
            start += 1
        best = max(best, end - start + 1)
    return best


async def test_no_window_holds_more_than_rate():
    limiter = RateLimiter(20, period=0.5)
    loop = asyncio.get_running_loop()
    times: list[float] = []

    async def one() -> None:
        await limiter.acquire()
        times.append(loop.time())

    t0 = loop.time()
    await asyncio.gather(*(one() for _ in range(70)))
    elapsed = loop.time() - t0
    assert max_in_window(times, 0.5) <= 20
    # 70 acquisitions at 20 per 0.5 s need at least ~1.25 s after the first 20 ...
    assert elapsed >= 1.2
    # ... and the limiter does not leave much of the budget unused.
    assert elapsed < 2.2


async def test_burst_is_small_and_then_the_rate_is_smooth():
    limiter = RateLimiter(600, period=60)  # 10 per second, burst of one second's worth
    assert limiter.burst == 10
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for _ in range(10):
        await limiter.acquire()
    assert loop.time() - t0 < 0.05  # the burst goes at once
    await limiter.acquire()
    assert 0.07 < loop.time() - t0 < 0.3  # the 11th waits about 1/10 s


async def test_waiters_are_served_in_arrival_order():
    limiter = RateLimiter(10, period=1.0, burst=1)
    order: list[int] = []

    async def one(i: int) -> None:
        await limiter.acquire()
        order.append(i)

    tasks = []
    for i in range(6):
        tasks.append(asyncio.create_task(one(i)))
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert order == list(range(6))


async def test_tokens_estimate_is_settled_with_real_usage():
    limiter = RateLimiter(1000, period=1.0, burst=1000)
    grant = await limiter.acquire(900)
    # The request really used 100 tokens: 900 more may go at once.
    limiter.settle(grant, 100)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await asyncio.wait_for(limiter.acquire(850), 0.1)
    assert loop.time() - t0 < 0.05


async def test_settling_upward_makes_later_requests_wait():
    limiter = RateLimiter(100, period=1.0, burst=100)
    grant = await limiter.acquire(10)
    limiter.settle(grant, 100)  # it cost far more than estimated
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(limiter.acquire(50), 0.2)


async def test_an_acquisition_bigger_than_the_rate_still_goes():
    limiter = RateLimiter(100, period=0.3)
    await asyncio.wait_for(limiter.acquire(500), 1.0)


async def test_a_cancelled_waiter_does_not_block_the_next():
    limiter = RateLimiter(5, period=1.0, burst=1)
    await limiter.acquire()
    first = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)
    second = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.wait_for(second, 1.0)


async def test_waiting_does_not_spin():
    """One timer per wait, not a polling loop: few loop iterations while blocked."""
    limiter = RateLimiter(2, period=0.4, burst=1)
    await limiter.acquire()
    ticks = 0
    stop = False

    async def count_ticks() -> None:
        nonlocal ticks
        while not stop:
            ticks += 1
            await asyncio.sleep(0.01)

    counter = asyncio.create_task(count_ticks())
    calls = 0
    real_wake = limiter._wake

    def wake() -> None:
        nonlocal calls
        calls += 1
        real_wake()

    limiter._wake = wake  # type: ignore[method-assign]
    await limiter.acquire()
    stop = True
    await counter
    assert calls <= 3


@pytest.mark.parametrize(("rate", "period"), [(0, 60), (-1, 60), (10, 0)])
def test_bad_limits_are_refused(rate, period):
    with pytest.raises(ValueError, match="must be > 0"):
        RateLimiter(rate, period)
