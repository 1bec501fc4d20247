"""SharedRateLimiter against a real redis-server on loopback: one budget for every process,
smooth, exact per window; Redis going away mid-run falls back to a fair local share without a
lost grant or a raised error, and comes back; no password ever shows.

These run on the real clock (Redis keeps its own), with periods of 0.5-2 s so that a few
windows pass in a second or two. Grant times are taken just after each grant; the limiter
keeps a margin of 2 % of the period, which absorbs that lag.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import threading

import pytest
from redis_server import RedisServer

from nbllm.errors import ConfigError
from nbllm.executor.shared_limit import SharedRateLimiter, check

DEPLOYMENT = "nbllm-test@127.0.0.1:8000"


@pytest.fixture
def redis_server(tmp_path):
    """A redis-server of this test alone (skipped with the reason where there is none)."""
    with RedisServer(tmp_path) as server:
        yield server


def first(times: list[float], seconds: float) -> list[float]:
    """The grants of the first ``seconds`` from the first grant on."""
    start = min(times)
    return [t for t in times if t < start + seconds]


def max_in_window(times: list[float], period: float) -> int:
    times = sorted(times)
    best = 0
    start = 0
    for end, t in enumerate(times):
        while times[start] <= t - period:
            start += 1
        best = max(best, end - start + 1)
    return best


async def acquire_for(
    limiter: SharedRateLimiter, seconds: float, times: list[float], workers: int = 2
) -> None:
    """``workers`` tasks that take grants one by one for ``seconds``, noting each grant's time;
    those still waiting then are cancelled."""
    loop = asyncio.get_running_loop()

    async def worker() -> None:
        while True:
            await limiter.acquire()
            times.append(loop.time())

    tasks = [asyncio.ensure_future(worker()) for _ in range(workers)]
    await asyncio.wait(tasks, timeout=seconds)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_two_limiters_share_one_budget_exactly_and_use_it(redis_server):
    rate, period, seconds = 20, 0.5, 1.5
    a = SharedRateLimiter(redis_server.url, DEPLOYMENT, "rpm", rate, period)
    b = SharedRateLimiter(redis_server.url, DEPLOYMENT, "rpm", rate, period)
    times_a: list[float] = []
    times_b: list[float] = []
    try:
        await asyncio.gather(
            acquire_for(a, seconds + 0.2, times_a), acquire_for(b, seconds + 0.2, times_b)
        )
    finally:
        await a.aclose()
        await b.aclose()
    every = times_a + times_b
    assert max_in_window(every, period) <= rate
    # three windows: at least 0.9 of the budget of each went out
    assert len(first(every, seconds)) >= 0.9 * rate * seconds / period
    # both got a real part of it: neither starves behind the other
    assert min(len(times_a), len(times_b)) >= 0.25 * len(every)
    # another deployment's budget is another key
    other = SharedRateLimiter(redis_server.url, "other@127.0.0.1:9", "rpm", rate, period)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await other.acquire(rate)
    await other.aclose()
    assert loop.time() - t0 < 0.2


async def test_the_budget_is_smoothed_not_sent_at_once(redis_server):
    # 20 per 2 s: a burst of one second's worth (10), then one every 0.1 s
    limiter = SharedRateLimiter(redis_server.url, DEPLOYMENT, "rpm", 20, 2.0)
    assert limiter.burst == 10
    times: list[float] = []
    try:
        await acquire_for(limiter, 0.8, times, workers=4)
    finally:
        await limiter.aclose()
    t0 = min(times)
    assert sum(t - t0 < 0.05 for t in times) <= 10
    assert max_in_window(times, 0.3) <= 10 + 3 + 1  # burst + 0.3 s of refill (+1 at the edge)
    assert len(times) >= 15  # 10 at once, then ~10 a second


async def test_settle_gives_back_what_was_not_used(redis_server):
    tpm = SharedRateLimiter(redis_server.url, DEPLOYMENT, "tpm", 20, 1.0)
    other = SharedRateLimiter(redis_server.url, DEPLOYMENT, "tpm", 20, 1.0)
    loop = asyncio.get_running_loop()
    try:
        grant = await tpm.acquire(10)
        tpm.settle(grant, 2)  # the answer used 2 of the 10 estimated
        t0 = loop.time()
        await tpm.acquire(18)  # 2 + 18 = the whole budget, at once
        assert loop.time() - t0 < 0.2
        # and now it is spent, for every process
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(other.acquire(1), 0.3)
    finally:
        await tpm.aclose()
        await other.aclose()


async def test_scripts_are_sent_again_after_the_server_forgets_them(redis_server):
    import redis.asyncio

    fallbacks: list[str] = []
    limiter = SharedRateLimiter(
        redis_server.url, DEPLOYMENT, "rpm", 100, 1.0, on_fallback=fallbacks.append
    )
    admin = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        await limiter.acquire()
        await admin.script_flush()
        await limiter.acquire()  # EVALSHA answers NOSCRIPT: EVAL instead, not a fallback
        assert limiter.state == "shared"
        assert fallbacks == []
        assert await admin.exists(f"nbllm:{{{DEPLOYMENT}:rpm}}:log")
    finally:
        await limiter.aclose()
        await admin.aclose()


async def test_a_redis_that_lost_its_data_gets_our_recent_grants_back(redis_server):
    import redis.asyncio

    limiter = SharedRateLimiter(redis_server.url, DEPLOYMENT, "rpm", 10, 1.0)
    admin = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        for _ in range(10):  # the whole budget, in its burst
            await limiter.acquire()
        await admin.flushall()  # as a restart without persistence would
        # the grant counter went backwards: the 10 grants are written back, so the window
        # is still full and the 11th waits for it, instead of a fresh budget
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(limiter.acquire(), 0.3)
        assert limiter.state == "shared"
        assert float(await admin.get(f"nbllm:{{{DEPLOYMENT}:rpm}}:sum")) == 10
    finally:
        await limiter.aclose()
        await admin.aclose()


async def test_redis_going_away_falls_back_to_a_fair_share_and_comes_back(redis_server, caplog):
    # 40 per 2 s: a burst of 20, then 20 a second; each of two processes' share is half that
    rate, period = 40, 2.0
    events: list[str] = []

    def limiter(name: str) -> SharedRateLimiter:
        return SharedRateLimiter(
            redis_server.url, DEPLOYMENT, "rpm", rate, period, retry_s=0.3,
            on_fallback=lambda reason: events.append(f"{name} fallback: {reason}"),
            on_recover=lambda: events.append(f"{name} back"),
        )  # fmt: skip

    a, b = limiter("a"), limiter("b")
    times: dict[str, list[float]] = {"a": [], "b": []}
    loop = asyncio.get_running_loop()
    phases: dict[str, float] = {}

    async def outage() -> None:
        await asyncio.sleep(1.0)
        redis_server.kill()
        phases["killed"] = loop.time()
        await asyncio.sleep(2.5)
        redis_server.start()  # empty: nothing of the shared log survives
        phases["restarted"] = loop.time()

    caplog.set_level(logging.INFO, logger="nbllm")
    try:
        await asyncio.gather(
            acquire_for(a, 5.5, times["a"]), acquire_for(b, 5.5, times["b"]), outage()
        )
        assert a.state == b.state == "shared"
    finally:
        await a.aclose()
        await b.aclose()

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # one line for the outage, not one per limiter or per call
    assert f"127.0.0.1:{redis_server.port}" in warnings[0].getMessage()
    assert sum("is back" in r.getMessage() for r in caplog.records) == 1
    happened = sorted(e.split(":")[0] for e in events)
    assert happened == ["a back", "a fallback", "b back", "b fallback"]  # once each
    assert a.local_rate == b.local_rate == rate / 2  # two participants were seen

    every = times["a"] + times["b"]
    # the promise holds before, during and after the outage: the local limiters start with
    # what each process already spent, and give it back to Redis when it returns
    assert max_in_window(every, period) <= rate
    killed, restarted = phases["killed"], phases["restarted"]
    for name in "ab":
        during = [t for t in times[name] if killed < t < restarted]
        assert max_in_window(during, period) <= rate / 2
        # its share (10 a second) went on once its own grants of the last window expired
        assert len(during) >= 0.8 * (rate / 2 / period) * (restarted - killed - period)
    after = [t for t in every if t > restarted + 0.5]
    assert len(after) >= 0.8 * (rate / period) * (loop.time() - restarted - 0.5 - 0.3)


async def test_no_password_in_logs_errors_or_reprs(tmp_path, caplog):
    password = "s3cret-Passw0rd-123"
    server = RedisServer(tmp_path, password=password)
    server.start()
    reasons: list[str] = []
    caplog.set_level(logging.DEBUG, logger="nbllm")
    try:
        with pytest.raises(ConfigError) as wrong:
            await check(server.url.replace(password, "wrong-Passw0rd-456"))
        assert "redis_url=" in str(wrong.value)
        assert "wrong-Passw0rd-456" not in str(wrong.value)
        await check(server.url)
        limiter = SharedRateLimiter(
            server.url, DEPLOYMENT, "rpm", 100, 1.0, on_fallback=reasons.append
        )
        await limiter.acquire()
        server.kill()
        await limiter.acquire()  # falls back, quietly for the run
        assert limiter.state == "local"
        shown = [repr(limiter), *reasons, caplog.text]
        with pytest.raises(ConfigError) as down:
            await check(server.url)
        shown.append(str(down.value))
        await limiter.aclose()
    finally:
        server.kill()
    assert f"redis://127.0.0.1:{server.port}/0" in str(down.value)
    assert reasons and "unreachable" in caplog.text
    for text in shown:
        assert password not in text


async def test_bad_options_are_refused_before_any_request():
    with pytest.raises(ConfigError, match=r"^kind= expected one of rpm, tpm"):
        SharedRateLimiter("redis://127.0.0.1:1/0", DEPLOYMENT, "rps", 10)
    with pytest.raises(ConfigError, match=r"^rpm= expected a number > 0"):
        SharedRateLimiter("redis://127.0.0.1:1/0", DEPLOYMENT, "rpm", 0, names=("rpm", "p", "b"))
    with pytest.raises(ConfigError, match=r"^redis_url= expected a redis://") as bad:
        await check("http://user:hunter2hunter2@127.0.0.1:1/")
    assert "hunter2hunter2" not in str(bad.value)
    with pytest.raises(ConfigError, match=r"^redis_url= cannot reach Redis at redis://127"):
        await check("redis://:hunter2hunter2@127.0.0.1:1/0", timeout_s=0.5)


_CHILD = """
import asyncio, json, sys, time
import redis.asyncio  # imported before the start, as check() does before a run
from nbllm.executor.shared_limit import SharedRateLimiter

async def main(url, rate, period, seconds):
    limiter = SharedRateLimiter(url, "nbllm-test@127.0.0.1:8000", "rpm", rate, period)
    print("ready", flush=True)
    sys.stdin.readline()
    end = time.time() + seconds
    times = []
    async def worker():
        while time.time() < end:
            await limiter.acquire()
            times.append(time.time())
    await asyncio.gather(worker(), worker())
    await limiter.aclose()
    print(json.dumps(times), flush=True)

asyncio.run(main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])))
"""


def test_two_processes_together_stay_under_the_rate(redis_server):
    rate, period, seconds = 20, 1.0, 3.0
    args = [
        sys.executable,
        "-c",
        _CHILD,
        redis_server.url,
        str(rate),
        str(period),
        str(seconds + 0.5),
    ]
    children = [
        subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    # a child stuck before "ready" would block readline(): the watchdog ends it (bounded test)
    watchdog = threading.Timer(60, lambda: [child.kill() for child in children])
    watchdog.start()
    try:
        for child in children:  # both imported and ready before either starts
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        outputs = [child.communicate(timeout=15)[0] for child in children]
    finally:
        watchdog.cancel()
        watchdog.join()
        for child in children:
            child.kill()
            child.wait()
    times = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    every = times[0] + times[1]
    assert max_in_window(every, period) <= rate
    assert len(first(every, seconds)) >= 0.9 * rate * seconds / period
    assert min(len(t) for t in times) >= 0.25 * len(every)
