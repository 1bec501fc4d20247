"""RateLimiter: the window promise holds, waiters are served in order, nothing spins.

Every test runs on a fake clock (``helpers.FakeClockLoop``): waits take no real time and
the times read are exact, so the bounds below are tight and no test is at the mercy of a
busy machine.
"""

from __future__ import annotations

import asyncio

import pytest
from helpers import on_fake_clock

from nbllm.errors import ConfigError
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


@on_fake_clock
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
    # 70 acquisitions at 20 per 0.5 s: the 61st cannot go before 1.5 s ...
    assert elapsed >= 1.5
    # ... and the limiter leaves none of the budget unused (but a small safety margin).
    assert elapsed < 1.6


@on_fake_clock
async def test_burst_is_small_and_then_the_rate_is_smooth():
    limiter = RateLimiter(600, period=60)  # 10 per second, burst of one second's worth
    assert limiter.burst == 10
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for _ in range(10):
        await limiter.acquire()
    assert loop.time() == t0  # the burst goes at once
    await limiter.acquire()
    assert loop.time() - t0 == pytest.approx(0.1)  # the 11th waits 1/10 s
    await limiter.acquire()
    assert loop.time() - t0 == pytest.approx(0.2)  # and so does each one after it


@on_fake_clock
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


@on_fake_clock
async def test_tokens_estimate_is_settled_with_real_usage():
    limiter = RateLimiter(1000, period=1.0, burst=1000)
    grant = await limiter.acquire(900)
    # The request really used 100 tokens: 900 more may go at once.
    limiter.settle(grant, 100)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await limiter.acquire(850)
    assert loop.time() == t0


@on_fake_clock
async def test_settling_upward_makes_later_requests_wait():
    limiter = RateLimiter(100, period=1.0, burst=100)
    loop = asyncio.get_running_loop()
    grant = await limiter.acquire(10)
    limiter.settle(grant, 100)  # it cost far more than estimated
    t0 = loop.time()
    await limiter.acquire(50)
    # The window is full until the grant leaves it, one period (and the margin) later.
    assert loop.time() - t0 >= 1.0


@on_fake_clock
async def test_an_acquisition_bigger_than_the_rate_still_goes():
    limiter = RateLimiter(100, period=0.3)
    loop = asyncio.get_running_loop()
    await limiter.acquire(50)
    t0 = loop.time()
    await limiter.acquire(500)  # waits for an empty window, then goes alone
    assert 0.3 <= loop.time() - t0 < 0.4


@on_fake_clock
async def test_a_cancelled_waiter_does_not_block_the_next():
    limiter = RateLimiter(5, period=1.0, burst=1)
    loop = asyncio.get_running_loop()
    await limiter.acquire()
    first = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)
    second = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)
    first.cancel()
    t0 = loop.time()
    await second
    assert loop.time() - t0 == pytest.approx(0.2)  # the first one's turn, not a later one


@on_fake_clock
async def test_waiting_does_not_spin():
    """One timer per wait, not a polling loop: the limiter wakes once per grant."""
    limiter = RateLimiter(2, period=0.4, burst=1)
    loop = asyncio.get_running_loop()
    await limiter.acquire()
    calls = 0
    real_wake = limiter._wake

    def wake() -> None:
        nonlocal calls
        calls += 1
        real_wake()

    limiter._wake = wake  # type: ignore[method-assign]
    t0 = loop.time()
    await limiter.acquire()
    assert loop.time() - t0 == pytest.approx(0.2)
    assert calls == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rate": 0}, "rate= expected a number > 0, got 0"),
        ({"rate": -1}, "rate= expected a number > 0, got -1"),
        ({"rate": float("inf")}, "rate= expected a number > 0, got inf"),
        ({"rate": "10"}, "rate= expected a number > 0, got '10'"),
        ({"rate": 10, "period": 0}, "period= expected a number > 0, got 0"),
        ({"rate": 10, "burst": -2}, "burst= expected a number > 0, got -2"),
    ],
)
def test_bad_limits_are_refused_naming_the_option(options, message):
    with pytest.raises(ConfigError) as caught:
        RateLimiter(**options)
    assert str(caught.value) == message


def test_the_message_names_the_option_as_the_user_knows_it():
    with pytest.raises(ConfigError, match=r"^rpm= expected a number > 0, got -1$"):
        RateLimiter(-1, names=("rpm", "rate_window_s", "burst"))
