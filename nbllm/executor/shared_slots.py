"""Concurrency slots shared through Redis: at most ``limit`` requests in flight to one
deployment, counted across every process that uses the same Redis and deployment id::

    slots = SharedSlots(redis_url, "gpt-4o@api.openai.com:443", 8)
    lease = await slots.acquire()
    try:
        ...  # the request
    finally:
        slots.release(lease)
    await slots.aclose()

A slot is a *lease* in a sorted set (``nbllm:{<deployment>:slots}:leases``, scored by its
expiry on the Redis server's clock). A process renews the leases it holds every
``lease_s / 3`` seconds, so a process that dies (``kill -9``) gives its slots back at most
``lease_s`` later without anyone cleaning up. Taking, giving back and renewing are Lua
scripts (``EVALSHA``, ``EVAL`` on ``NOSCRIPT``). A process that finds no slot free waits with
``BLPOP`` on a list that every release pushes to, bounded by the earliest lease's expiry: it
wakes when a slot frees anywhere, and never polls. Within a process, waiters queue in
arrival order; the priority order of the local ``RequestSlots`` stays in front of this.

``release`` is synchronous, as ``RequestSlots.release`` is: the lease is given back to Redis
in the background, and ``aclose()`` waits for it.

If Redis becomes unreachable at any call, nothing is raised into the run: the slots go on
locally at this process's fair share (``limit`` divided by the processes seen using the key
within ``participant_ttl_s``, at least one; ``limit // 2`` when that was never known), the
outage is logged once per Redis URL (the URL without its password) and ``on_fallback(reason)``
is called once. Every ``retry_s`` seconds an ``acquire`` tries Redis again; when it answers,
the leases held now are written back (so the count is true at once), ``on_recover()`` is
called and the return is logged once. Leases given back while Redis was away expire there.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nbllm.errors import ConfigError
from nbllm.executor.redis_link import (
    DEFAULT_TIMEOUT_S,
    Script,
    close_quietly,
    reason,
    redis_client,
    report_down,
    report_up,
)
from nbllm.redact import public_url

__all__ = ["SharedSlots", "SlotLease"]

log = logging.getLogger("nbllm")


@dataclass(slots=True, eq=False)
class SlotLease:
    """One held slot: ``id`` names it in Redis; ``shared`` is False for a slot taken locally
    while Redis was away (and not yet written back)."""

    id: str
    shared: bool


_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

# KEYS: leases, procs; ARGV: limit, lease_s, lease id, participant, participant ttl
# -> {taken (0/1), wait in microseconds until the earliest lease expires, participants}
_TAKE = Script(
    _PRELUDE
    + """
local limit, lease_s, proc_ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[5])
redis.call('ZADD', KEYS[2], now, ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - proc_ttl)
redis.call('PEXPIRE', KEYS[2], math.ceil(proc_ttl * 1000))
local procs = redis.call('ZCARD', KEYS[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now + lease_s, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], math.ceil(lease_s * 1000) + 1000)
  return {1, 0, procs}
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, math.ceil((tonumber(first[2]) - now) * 1000000), procs}
"""
)

# KEYS: leases, freed; ARGV: lease id, limit -> 1 when it was held
_GIVE = Script(
    """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('LPUSH', KEYS[2], '1')
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[2]) - 1)
redis.call('PEXPIRE', KEYS[2], 60000)
return 1
"""
)

# KEYS: leases; ARGV: lease_s, lease ids... -> how many: renews (or writes back) each lease
_RENEW = Script(
    _PRELUDE
    + """
local lease_s = tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], now + lease_s, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], math.ceil(lease_s * 1000) + 1000)
return #ARGV - 1
"""
)


class SharedSlots:
    """At most ``limit`` leases held at once across every process sharing
    ``(redis_url, deployment)`` (see the module). ``state`` is ``"shared"`` or ``"local"``;
    ``local_limit`` is the fair share used while local."""

    def __init__(
        self,
        redis_url: str,
        deployment: str,
        limit: int,
        *,
        lease_s: float = 30.0,
        on_fallback: Callable[[str], None] | None = None,
        on_recover: Callable[[], None] | None = None,
        retry_s: float = 5.0,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        participant_ttl_s: float = 60.0,
    ) -> None:
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            msg = f"max_parallel_requests= expected a whole number >= 1, got {limit!r}"
            raise ConfigError(msg)
        if not isinstance(lease_s, (int, float)) or not math.isfinite(lease_s) or lease_s <= 0:
            msg = f"lease_s= expected a number > 0, got {lease_s!r}"
            raise ConfigError(msg)
        if not isinstance(deployment, str) or not deployment:
            msg = f"deployment= expected a non-empty id, got {deployment!r}"
            raise ConfigError(msg)
        self.limit = limit
        self.lease_s = float(lease_s)
        self.deployment = deployment
        self.url = public_url(redis_url)
        self._redis_url = redis_url
        self.on_fallback = on_fallback
        self.on_recover = on_recover
        self.retry_s = retry_s
        self.timeout_s = timeout_s
        self.participant_ttl_s = participant_ttl_s
        base = "nbllm:{" + deployment.replace("{", "(").replace("}", ")") + ":slots}"
        self._keys = {part: f"{base}:{part}" for part in ("leases", "freed", "procs")}
        self._participant = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._ids = itertools.count(1)
        self._participants: int | None = None
        self._held: set[SlotLease] = set()
        self._local = False
        self._retry_at = 0.0
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._freed: asyncio.Future[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"SharedSlots({self.url!r}, {self.deployment!r}, limit={self.limit}, "
            f"held={len(self._held)}, state={self.state!r})"
        )

    @property
    def state(self) -> str:
        """``"shared"`` while the slots are counted in Redis, ``"local"`` while fallen back."""
        return "local" if self._local else "shared"

    @property
    def held(self) -> int:
        """Leases this process holds now."""
        return len(self._held)

    @property
    def local_limit(self) -> int:
        """This process's fair share of ``limit``: what it may hold while Redis is away."""
        processes = self._participants or 2
        return max(1, self.limit // processes)

    async def acquire(self) -> SlotLease:
        """Wait for a slot and hold it until ``release(lease)``."""
        if self._closed:
            msg = "these SharedSlots are closed"
            raise RuntimeError(msg)
        self._bind()
        assert self._lock is not None
        async with self._lock:
            while True:
                loop = asyncio.get_running_loop()
                if self._local and loop.time() >= self._retry_at:
                    await self._try_recover()
                if self._local:
                    if len(self._held) < self.local_limit:
                        return self._hold(SlotLease(self._new_id(), shared=False))
                    self._freed = loop.create_future()
                    await self._freed
                    continue
                lease_id = self._new_id()
                try:
                    taken, wait_us, participants = await _TAKE(
                        self._redis(), [self._keys["leases"], self._keys["procs"]],
                        [self.limit, repr(self.lease_s), lease_id, self._participant,
                         repr(float(self.participant_ttl_s))],
                    )  # fmt: skip
                except Exception as exc:
                    await self._fall_back(exc)
                    continue
                self._participants = max(1, int(participants))
                if int(taken):
                    return self._hold(SlotLease(lease_id, shared=True))
                # Wake on a release anywhere, or when the earliest lease expires; the
                # bound keeps the blocking read inside the client's socket timeout.
                wait = min(max(int(wait_us) / 1e6, 0.01), self.timeout_s / 2)
                try:
                    await self._redis().blpop([self._keys["freed"]], timeout=wait)
                except Exception as exc:
                    await self._fall_back(exc)

    def release(self, lease: SlotLease) -> None:
        """Give a slot back (to Redis in the background, when it was taken there)."""
        if lease not in self._held:
            return
        self._held.discard(lease)
        if self._freed is not None and not self._freed.done():
            self._freed.set_result(None)
        if lease.shared and not self._local and not self._closed:
            task = asyncio.get_running_loop().create_task(self._give(lease))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def aclose(self) -> None:
        """Give back what was released, stop renewing, close the connection. Leases still
        held expire in Redis within ``lease_s``."""
        if self._closed:
            return
        if self._pending:
            await asyncio.gather(*list(self._pending))
        self._closed = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        client, self._client = self._client, None
        if client is not None:
            await close_quietly(client)

    # -- internals ---------------------------------------------------------------

    def _bind(self) -> None:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            self._lock = asyncio.Lock()
            self._client = None
            self._heartbeat = None
            self._pending.clear()

    def _redis(self) -> Any:
        if self._client is None:
            self._client = redis_client(self._redis_url, self.timeout_s)
        return self._client

    def _new_id(self) -> str:
        return f"{self._participant}:{next(self._ids)}"

    def _hold(self, lease: SlotLease) -> SlotLease:
        self._held.add(lease)
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.get_running_loop().create_task(self._renew_forever())
        return lease

    async def _give(self, lease: SlotLease) -> None:
        try:
            await _GIVE(self._redis(), [self._keys["leases"], self._keys["freed"]],
                        [lease.id, self.limit])  # fmt: skip
        except Exception as exc:
            await self._fall_back(exc)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            shared = [lease.id for lease in self._held if lease.shared]
            if self._local or not shared:
                continue
            try:
                await _RENEW(self._redis(), [self._keys["leases"]], [repr(self.lease_s), *shared])
            except Exception as exc:
                await self._fall_back(exc)

    async def _fall_back(self, exc: BaseException) -> None:
        if self._local:
            return
        why = reason(exc, self._redis_url)
        self._local = True
        self._retry_at = asyncio.get_running_loop().time() + self.retry_s
        client, self._client = self._client, None
        if client is not None:
            await close_quietly(client)
        report_down(
            self.url,
            why,
            f"shared slots go on locally at this process's share ({self.deployment}: "
            f"{self.local_limit} of {self.limit}) and Redis is tried again every "
            f"{self.retry_s:g} s",
        )
        if self.on_fallback is not None:
            self.on_fallback(why)

    async def _try_recover(self) -> None:
        client = redis_client(self._redis_url, self.timeout_s)
        held = list(self._held)
        try:
            await client.ping()
            ids = [lease.id for lease in held]
            await _RENEW(client, [self._keys["leases"]], [repr(self.lease_s), *ids])
        except Exception as exc:
            log.debug("nbllm: Redis at %s still unreachable: %s", self.url, reason(exc, ""))
            self._retry_at = asyncio.get_running_loop().time() + self.retry_s
            await close_quietly(client)
            return
        for lease in held:
            lease.shared = True
        self._client = client
        self._local = False
        report_up(self.url)
        if self.on_recover is not None:
            self.on_recover()
