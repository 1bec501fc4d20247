"""SharedSlots against a real redis-server on loopback: at most ``limit`` in flight across
processes, a waiter wakes when a slot frees anywhere, a killed process's slots come back after
the lease, and Redis going away falls back to a local share without raising."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading

import pytest
from redis_server import RedisServer

from nbllm.errors import ConfigError
from nbllm.executor.shared_slots import SharedSlots

DEPLOYMENT = "nbllm-test@127.0.0.1:8000"


@pytest.fixture
def redis_server(tmp_path):
    """A redis-server of this test alone (skipped with the reason where there is none)."""
    with RedisServer(tmp_path) as server:
        yield server


async def test_two_instances_never_hold_more_than_the_limit_together(redis_server):
    a = SharedSlots(redis_server.url, DEPLOYMENT, 3)
    b = SharedSlots(redis_server.url, DEPLOYMENT, 3)
    in_flight = 0
    most = 0
    done = 0

    async def request(slots: SharedSlots) -> None:
        nonlocal in_flight, most, done
        lease = await slots.acquire()
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.02)
        in_flight -= 1
        slots.release(lease)
        done += 1

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        await asyncio.gather(*(request(s) for s in (a, b) for _ in range(15)))
    finally:
        await a.aclose()
        await b.aclose()
    assert done == 30
    assert most == 3
    # 30 requests of 20 ms, 3 at a time: ~0.2 s when a release wakes a waiter at once
    # (it would take seconds if waiters slept until a lease expired)
    assert loop.time() - t0 < 1.0


async def test_redis_going_away_falls_back_to_a_local_share_and_comes_back(redis_server, caplog):
    events: list[str] = []
    slots = SharedSlots(
        redis_server.url, DEPLOYMENT, 4, retry_s=0.2,
        on_fallback=lambda why: events.append("fallback"),
        on_recover=lambda: events.append("back"),
    )  # fmt: skip
    other = SharedSlots(redis_server.url, DEPLOYMENT, 4)
    caplog.set_level(logging.INFO, logger="nbllm")
    try:
        held = [await other.acquire(), await slots.acquire()]  # two participants seen
        other.release(held.pop(0))
        await other.aclose()
        redis_server.kill()
        slots.release(held.pop())  # the give-back fails in the background: no error
        leases = [await slots.acquire(), await slots.acquire()]
        assert slots.state == "local"
        assert slots.local_limit == 2
        with pytest.raises(asyncio.TimeoutError):  # a third would pass the share
            await asyncio.wait_for(slots.acquire(), 0.3)
        redis_server.start()
        await asyncio.sleep(0.25)
        slots.release(leases.pop())
        leases.append(await slots.acquire())  # Redis is asked again, and answers
        assert slots.state == "shared"
        for lease in leases:
            slots.release(lease)
    finally:
        await slots.aclose()
    assert events == ["fallback", "back"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unreachable" in warnings[0]
    assert sum("is back" in r.getMessage() for r in caplog.records) == 1


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match=r"^max_parallel_requests= expected a whole number"):
        SharedSlots("redis://127.0.0.1:1/0", DEPLOYMENT, 0)
    with pytest.raises(ConfigError, match=r"^lease_s= expected a number > 0"):
        SharedSlots("redis://127.0.0.1:1/0", DEPLOYMENT, 2, lease_s=0)


_CHILD = """
import asyncio, sys
from nbllm.executor.shared_slots import SharedSlots

async def main(url):
    slots = SharedSlots(url, "nbllm-test@127.0.0.1:8000", 2, lease_s=1.0)
    await slots.acquire()
    await slots.acquire()
    print("held", flush=True)
    await asyncio.sleep(60)

asyncio.run(main(sys.argv[1]))
"""


async def test_a_killed_process_gives_its_slots_back_after_the_lease(redis_server):
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, redis_server.url], stdout=subprocess.PIPE, text=True
    )
    watchdog = threading.Timer(60, child.kill)  # bounded even if the child hangs
    watchdog.start()
    slots = SharedSlots(redis_server.url, DEPLOYMENT, 2, lease_s=1.0)
    loop = asyncio.get_running_loop()
    try:
        assert child.stdout is not None
        line = await loop.run_in_executor(None, child.stdout.readline)
        assert line.strip() == "held"
        await asyncio.sleep(1.2)  # longer than a lease: the child has been renewing them
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(slots.acquire(), 0.2)
        child.kill()  # SIGKILL: nothing gives the slots back
        child.wait()
        killed = loop.time()
        lease = await asyncio.wait_for(slots.acquire(), 5)
        assert loop.time() - killed < 1.0 + 0.3  # within one lease of the kill
        slots.release(lease)
    finally:
        watchdog.cancel()
        watchdog.join()
        child.kill()
        child.wait()
        assert child.stdout is not None
        child.stdout.close()
        await slots.aclose()
