"""Adaptive limits: ``RateLimiter.set_rate`` keeps its promise through a change, and
``AdaptiveLimit`` finds a provider's limit from 429s or headers.

Everything runs on a fake clock: the limiter on ``helpers.FakeClockLoop``, the controller
on the loop's time (or a number the test moves). The simulated provider at the end admits
R requests in any sliding window of a period and answers 429 beyond, like
``nbllm.testing``'s server; one variant counts per fixed window instead.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable

import pytest
from helpers import on_fake_clock

from nbllm.errors import ConfigError
from nbllm.executor.adaptive import (
    AdaptiveLimit,
    RateLimitHeaders,
    parse_duration,
    parse_rate_limit_headers,
)
from nbllm.executor.limiter import RateLimiter


def max_in_window(times: list[float], period: float) -> int:
    times = sorted(times)
    best = start = 0
    for end, t in enumerate(times):
        while times[start] <= t - period:
            start += 1
        best = max(best, end - start + 1)
    return best


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------- set_rate


@on_fake_clock
async def test_a_raise_lets_a_waiter_go_at_once():
    limiter = RateLimiter(2, period=1.0, burst=1)
    loop = asyncio.get_running_loop()
    await limiter.acquire()
    waiter = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)
    t0 = loop.time()
    limiter.set_rate(20)  # the bucket now refills at 20 a second
    await waiter
    assert loop.time() - t0 == pytest.approx(0.05)  # not the 0.5 s of the old rate


@on_fake_clock
async def test_after_a_cut_no_grant_makes_a_window_hold_more_than_the_new_rate():
    limiter = RateLimiter(20, period=1.0)
    loop = asyncio.get_running_loop()
    times: list[float] = []

    async def one() -> None:
        await limiter.acquire()
        times.append(loop.time())

    await asyncio.gather(*(one() for _ in range(20)))  # one burst: all at the same instant
    cut_at = loop.time()
    assert times == [cut_at] * 20
    limiter.set_rate(5)
    await asyncio.gather(*(one() for _ in range(15)))
    later = [t for t in times if t > cut_at]
    assert len(later) == 15
    for t in later:  # each grant after the cut, with what its window held before it
        assert sum(1 for u in times if t - 1.0 < u <= t) <= 5
    # The 20 grants before the cut keep the window over the new rate until they leave it.
    assert min(later) >= cut_at + 1.0


@on_fake_clock
async def test_waiters_keep_their_order_and_none_is_lost_through_changes():
    limiter = RateLimiter(10, period=1.0, burst=1)
    order: list[int] = []

    async def one(i: int) -> None:
        await limiter.acquire()
        order.append(i)

    tasks = []
    for i in range(30):
        tasks.append(asyncio.create_task(one(i)))
        await asyncio.sleep(0)
    for rate in (2, 50, 1, 30):
        await asyncio.sleep(0.3)
        limiter.set_rate(rate)
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
    assert order == list(range(30))


def test_the_burst_follows_the_rate_unless_it_was_given():
    follows = RateLimiter(600, period=60)
    follows.set_rate(1200)
    assert (follows.rate, follows.burst) == (1200, 20)
    fixed = RateLimiter(600, period=60, burst=3)
    fixed.set_rate(1200)
    assert fixed.burst == 3


def test_a_bad_rate_is_refused_and_changes_nothing():
    limiter = RateLimiter(10, names=("rpm", "rate_window_s", "burst"))
    with pytest.raises(ConfigError, match=r"^rpm= expected a number > 0, got 0$"):
        limiter.set_rate(0)
    assert limiter.rate == 10


# --------------------------------------------------------------------------- headers


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("1h2m3.5s", 3723.5),
        ("0.5", 0.5),
        ("17ms", 0.017),
        ("", None),
        ("soon", None),
        ("5m later", None),
        ("-3", None),
    ],
)
def test_reset_durations_in_openais_formats(text, seconds):
    assert parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_rate_limit_headers_are_read_in_any_case():
    seen = parse_rate_limit_headers(
        {
            "X-RateLimit-Limit-Requests": "60",
            "x-ratelimit-remaining-requests": "59",
            "x-ratelimit-reset-requests": "1s",
            "x-ratelimit-limit-tokens": "150000",
            "X-RATELIMIT-REMAINING-TOKENS": "149984",
            "x-ratelimit-reset-tokens": "6m0s",
            "content-type": "application/json",
        }
    )
    assert seen == RateLimitHeaders(60, 59, 1.0, 150000, 149984, 360.0)
    assert parse_rate_limit_headers(None) == RateLimitHeaders()
    assert parse_rate_limit_headers({"x-ratelimit-limit-requests": "many"}).limit_requests is None


# --------------------------------------------------------------------------- the controller


def test_a_limit_header_sets_the_rate_capped_by_the_ceiling():
    limiter = RateLimiter(10)
    clock = Clock()
    auto = AdaptiveLimit(limiter, ceiling=500, start=50, clock=clock)
    assert limiter.rate == 50
    clock.now = 1.0
    auto.on_success({"x-ratelimit-limit-requests": "300"})
    assert (auto.limit, limiter.rate, auto.provider_limit) == (300, 300, 300)
    clock.now = 2.0
    auto.on_success({"x-ratelimit-limit-requests": "900"})
    assert auto.limit == 500  # the user's ceiling wins
    assert auto.history == [(0.0, 50), (1.0, 300), (2.0, 500)]


def test_a_burst_of_429s_cuts_once_per_period():
    clock = Clock()
    auto = AdaptiveLimit(ceiling=1000, start=200, period=60, clock=clock)
    clock.now = 10.0
    for _ in range(50):
        auto.on_rate_limited()
        clock.now += 0.5
    assert auto.limit == 100  # one cut (x0.5: less than a period watched)
    assert auto.rate_limited == 50
    clock.now = 70.0
    auto.on_rate_limited()
    assert auto.limit < 100  # a period later, a 429 cuts again


def test_after_a_full_period_the_cut_aims_at_what_was_accepted():
    clock = Clock()
    auto = AdaptiveLimit(ceiling=1000, start=200, period=60, clock=clock)
    for _ in range(120):  # 120 answers in the last minute, at a limit of 200
        clock.now += 0.5
        auto.on_success()
    auto.on_rate_limited()
    assert auto.limit == pytest.approx(0.95 * 120)


def test_growth_waits_for_a_clean_period_and_needs_the_limit_used():
    clock = Clock()
    auto = AdaptiveLimit(ceiling=1000, start=100, period=60, clock=clock)
    for _ in range(59):  # 59 answers in a minute: the limit of 100 is in use
        clock.now += 1.0
        auto.on_success()
    assert auto.limit == 100  # not a full period yet
    clock.now += 1.0
    auto.on_success()
    assert auto.limit == pytest.approx(200)  # before any 429: doubled (a slow start)
    auto.on_rate_limited()  # cut to what was accepted: 95 % of 60 answers a minute
    assert auto.limit == pytest.approx(57)
    for _ in range(60):
        clock.now += 1.0
        auto.on_success()
    assert auto.limit == pytest.approx(57 * 1.05)  # after a 429, +5 %
    for _ in range(60):
        clock.now += 1.0
        auto.on_success()
    assert auto.limit == pytest.approx(57 * 1.05 * 1.10)  # the next clean period: +10 %
    # A run that sends a tenth of its limit does not push it up.
    idle = AdaptiveLimit(ceiling=1000, start=100, period=60, clock=clock)
    for _ in range(10):
        clock.now += 10.0
        idle.on_success()
    assert idle.limit == 100


def test_the_limit_stays_between_floor_and_ceiling():
    clock = Clock()
    auto = AdaptiveLimit(ceiling=110, start=100, floor=20, period=60, clock=clock)
    for _ in range(600):  # 5 minutes at 120 answers a minute
        clock.now += 0.5
        auto.on_success()
    assert auto.limit == 110
    for _ in range(20):
        clock.now += 60.0
        auto.on_rate_limited()
    assert auto.limit == 20


def test_a_429_of_the_token_budget_does_not_cut_the_request_budget():
    clock = Clock()
    rpm = AdaptiveLimit(ceiling=1000, start=100, clock=clock, unit="requests")
    tpm = AdaptiveLimit(ceiling=10**6, start=10**5, clock=clock, unit="tokens", name="tpm")
    tokens_out = {"x-ratelimit-remaining-requests": "40", "x-ratelimit-remaining-tokens": "0"}
    for auto in (rpm, tpm):
        auto.on_rate_limited(tokens_out)
    assert rpm.limit == 100
    assert tpm.limit == 5 * 10**4
    assert rpm.rate_limited == 1


def test_a_slot_count_moves_in_whole_slots():
    clock = Clock()
    capacities: list[float] = []
    auto = AdaptiveLimit(
        capacities.append, ceiling=64, start=9, unit="slots", period=10, clock=clock
    )
    clock.now = 1.0
    auto.on_rate_limited()
    assert auto.limit == 4  # 9 x 0.5, rounded down
    for _ in range(6):
        clock.now += 10.0
        auto.on_success()
    assert capacities[:3] == [9, 4, 5]
    assert all(isinstance(c, int) for c in capacities)
    assert auto.limit == capacities[-1] > 9


def test_start_defaults_to_half_the_ceiling():
    assert AdaptiveLimit(ceiling=600, clock=Clock()).limit == 300


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, r"^rpm='auto' needs a start value or a ceiling \(max_rpm=\)$"),
        ({"ceiling": -5}, r"^max_rpm= expected a number > 0, got -5$"),
        ({"start": 10, "floor": 0}, r"^floor= expected a number > 0, got 0$"),
        ({"start": 10, "decrease": 1.5}, r"^decrease= expected a factor between 0 and 1"),
        ({"start": 10, "unit": "bytes"}, r"^unit= expected one of requests, tokens, slots"),
        ({"ceiling": 5, "floor": 10}, r"^floor= expected at most the ceiling 5, got 10$"),
    ],
)
def test_bad_options_are_refused_naming_the_option(options, message):
    with pytest.raises(ConfigError, match=message):
        AdaptiveLimit(clock=Clock(), **options)


# --------------------------------------------------------------------------- a simulated provider

Phases = list[tuple[float, int]]  # (seconds, R requests per period)


async def simulate(
    phases: Phases,
    *,
    start: float,
    sliding: bool = True,
    headers: bool = False,
    period: float = 60.0,
) -> tuple[list[tuple[float, bool]], AdaptiveLimit]:
    """Saturating clients behind one adaptive RateLimiter, against a provider admitting
    R per period (and saying so in headers, as ``nbllm.testing``'s server does, where
    ``headers``); returns (arrival time, admitted) for every request."""
    loop = asyncio.get_running_loop()
    limiter = RateLimiter(start, period=period)
    auto = AdaptiveLimit(limiter, ceiling=1000, start=start, period=period, clock=loop.time)
    end = sum(seconds for seconds, _ in phases)
    admitted: collections.deque[float] = collections.deque()
    fixed = {"window": -1, "count": 0}
    log: list[tuple[float, bool]] = []

    def allowed_now(t: float) -> int:
        elapsed = 0.0
        for seconds, rate in phases:
            elapsed += seconds
            if t < elapsed:
                return rate
        return phases[-1][1]

    def admit(t: float) -> bool:
        rate = allowed_now(t)
        if sliding:
            while admitted and admitted[0] <= t - period:
                admitted.popleft()
            if len(admitted) >= rate:
                return False
            admitted.append(t)
            return True
        window = int(t // period)
        if fixed["window"] != window:
            fixed.update(window=window, count=0)
        if fixed["count"] >= rate:
            return False
        fixed["count"] += 1
        return True

    async def client() -> None:
        while True:
            await limiter.acquire()
            await asyncio.sleep(0.25)  # on the way to the provider
            t = loop.time()
            if t >= end:
                return
            ok = admit(t)
            said = None
            if headers:
                left = allowed_now(t) - len(admitted) if ok else 0
                said = {
                    "x-ratelimit-limit-requests": str(allowed_now(t)),
                    "x-ratelimit-remaining-requests": str(max(0, left)),
                }
            await asyncio.sleep(0.25)  # the answer on its way back
            log.append((t, ok))
            (auto.on_success if ok else auto.on_rate_limited)(said)

    await asyncio.gather(*(client() for _ in range(6)))
    return log, auto


def goodput(log: list[tuple[float, bool]], start: float, stop: float, period: float) -> float:
    return sum(ok for t, ok in log if start <= t < stop) / ((stop - start) / period)


def share_429(log: list[tuple[float, bool]]) -> float:
    return sum(not ok for _, ok in log) / len(log)


def run_fake(make: Callable[[], object]) -> object:
    return on_fake_clock(make)()


@pytest.mark.parametrize("sliding", [True, False], ids=["sliding-window", "fixed-window"])
def test_without_headers_it_converges_near_the_providers_limit(sliding):
    r = 60
    log, auto = run_fake(lambda: simulate([(1500.0, r)], start=15, sliding=sliding))
    # From a quarter of R it finds R within ten simulated minutes and then holds
    # at least 0.85 R with under 5 % of requests answered 429.
    assert goodput(log, 600, 1500, 60) >= 0.85 * r
    assert share_429(log) < 0.05
    assert max(limit for _, limit in auto.history) < 3 * r
    if sliding:
        assert max_in_window([t for t, ok in log if ok], 60) <= r


def test_it_follows_the_provider_down_and_up():
    phases: Phases = [(900.0, 60), (900.0, 25), (1200.0, 90)]
    log, _ = run_fake(lambda: simulate(phases, start=60))
    # The second half of each phase: converged again after the change.
    assert goodput(log, 450, 900, 60) >= 0.85 * 60
    assert goodput(log, 1350, 1800, 60) >= 0.85 * 25
    assert goodput(log, 2400, 3000, 60) >= 0.85 * 90
    assert share_429(log) < 0.05


def test_with_limit_headers_it_takes_the_providers_limit_at_once():
    phases: Phases = [(600.0, 60), (600.0, 25), (600.0, 90)]
    log, auto = run_fake(lambda: simulate(phases, start=10, headers=True))
    assert [limit for _, limit in auto.history] == [10, 60, 25, 90]
    # Each phase runs at its R from its first answers, after the cut once the old
    # requests have left the window.
    assert goodput(log, 0, 600, 60) >= 0.95 * 60
    assert goodput(log, 660, 1200, 60) >= 0.95 * 25
    assert goodput(log, 1200, 1800, 60) >= 0.95 * 90
    assert sum(not ok for _, ok in log) <= 5  # a few in flight as the limit fell
