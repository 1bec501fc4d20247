"""A requests- or tokens-per-minute budget shared through Redis by every process that uses it.

Two kernels, or two machines, that run against one deployment with ``rpm=600`` and the same
``redis_url`` together stay under 600 a minute::

    await check(redis_url)                       # before any request: ConfigError if unreachable
    limiter = SharedRateLimiter(redis_url, "gpt-4o@api.openai.com:443", "rpm", 600)
    grant = await limiter.acquire(1)             # waits until the shared budget allows it
    limiter.settle(grant, used)                  # the real amount (tokens), once known
    await limiter.aclose()

``SharedRateLimiter`` has ``RateLimiter``'s interface (``acquire``, ``settle``, ``rate``,
``period``, ``burst``) and its promise, now across processes: no window of ``period`` seconds
holds more than ``rate`` units granted by all of them together. The budget lives under keys
named by the deployment id and the kind (``nbllm:{<deployment>:<kind>}:*``); all keys expire
on their own a little after the budget goes idle.

How, and why this way. One Lua script does each step atomically, timed by the Redis server's
own clock (``TIME``), so the processes' clocks never have to agree:

- a *sliding log* (a sorted set of grants, with a running sum) keeps the promise exactly, as
  the local limiter's log does; a fixed window would let ``2 × rate`` through at its edge;
- a *GCRA token bucket* with a one-second burst (one second's worth of the rate) spreads the
  grants out, so a minute's budget does not go out in its first millisecond.

A request that cannot go yet gets back how long to wait; the caller sleeps that long and asks
again (no polling). Within a process, waiters queue in arrival order behind one lock, so one
round trip is in flight per limiter: about 0.3 ms of client CPU each (redis-py), some 2,400
grants a second per limiter on loopback (measured on a 2-core machine). Scripts run by
``EVALSHA``, falling back to ``EVAL`` when the server does not know them (``NOSCRIPT``: a
restart or ``SCRIPT FLUSH``). ``settle`` is synchronous, as ``RateLimiter.settle`` is: its
write to Redis runs in the background, and the next ``acquire`` waits for it.

Redis going away mid-run never raises into the run. The first failed call (acquire, or the
background write of a ``settle``) switches the limiter to a local ``RateLimiter`` at this
process's *fair share*: ``rate`` divided by the number of processes seen using the key within
``participant_ttl_s`` (each call registers this limiter in an expiring set in Redis, so the
count is known before the outage; when it was never known, half the rate). The outage is
logged once per Redis URL and process (one WARNING, the URL without its password), and
``on_fallback(reason)`` is called once per limiter. Every ``retry_s`` seconds an ``acquire``
quietly tries Redis again; when it answers, the return is logged once (INFO) and
``on_recover()`` is called.

The promise across the switches: the fallback starts with this process's own grants of the
current window and with what the others had spent beyond their shares (known from the
window's sum at the last answer), so the window that spans the switch does not open afresh;
this is exact for two processes, and for more when they had spent alike. On the way back,
the grants made locally in the last period are written into the shared log, and for
``retry_s + period`` more the local share stays a second gate, since other processes may
still be local for up to ``retry_s``. A Redis that lost its data (restarted empty) is noticed
by its grant counter going backwards, and gets this process's recent grants written back.

The ``redis`` package (``pip install 'nbllm[redis]'``) is imported only when a limiter is used.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from nbllm.errors import ConfigError
from nbllm.executor.limiter import Grant, RateLimiter
from nbllm.executor.redis_link import (
    DEFAULT_TIMEOUT_S,
    Script,
    check,
    close_quietly,
    reason,
    redis_client,
    report_down,
    report_up,
    text,
)
from nbllm.redact import public_url

__all__ = ["KINDS", "SharedGrant", "SharedRateLimiter", "check", "redis_client"]

log = logging.getLogger("nbllm")

KINDS = ("rpm", "tpm")


@dataclass(slots=True, eq=False)
class SharedGrant(Grant):
    """A grant of a ``SharedRateLimiter``: ``t`` is this process's loop time; ``member`` names
    the grant in the shared log, ``local`` the grant of the local limiter ``issuer`` (the
    fallback while Redis is away, and for a while after it is back)."""

    member: str | None = None
    local: Grant | None = None
    issuer: RateLimiter | None = None


_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function amount_of(member) return tonumber(string.match(member, ':(.*)$')) end
local function num(key) return tonumber(redis.call('GET', key) or '0') end
local function fmt(x) return string.format('%.17g', x) end
"""

# KEYS: log, sum, tat, seq, procs
# ARGV: amount, rate, period, burst, margin, participant id, participant ttl
# -> {granted (0/1), wait in microseconds, participants, grant counter, member, window's sum}
_ACQUIRE = Script(
    _PRELUDE
    + """
local amount, rate, period = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local burst, margin, proc_ttl = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[7])
redis.call('ZADD', KEYS[5], now, ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - proc_ttl)
redis.call('PEXPIRE', KEYS[5], math.ceil(proc_ttl * 1000))
local procs = redis.call('ZCARD', KEYS[5])
local horizon = now - period - margin
local in_window = num(KEYS[2])
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', horizon)) do
  in_window = in_window - amount_of(member)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', horizon)
if redis.call('ZCARD', KEYS[1]) == 0 then in_window = 0 end
local interval = period / rate
local tat = math.max(num(KEYS[3]), now)
local wait = 0
local excess = in_window + math.min(amount, rate) - rate
if excess > 1e-9 then
  local freed = 0
  local entries = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
  for i = 1, #entries, 2 do
    freed = freed + amount_of(entries[i])
    if freed + 1e-9 >= excess then
      wait = tonumber(entries[i + 1]) + period + margin + 0.0001 - now
      break
    end
  end
end
local short = (tat - now) / interval - (burst - math.min(amount, burst))
if short > 1e-9 then wait = math.max(wait, short * interval) end
local seq, member = num(KEYS[4]), ''
if wait <= 0 then
  tat = tat + amount * interval
  seq = redis.call('INCR', KEYS[4])
  member = seq .. ':' .. ARGV[1]
  redis.call('ZADD', KEYS[1], now, member)
  in_window = in_window + amount
end
local ttl = math.ceil((period + margin + tat - now) * 1000) + 1000
redis.call('SET', KEYS[3], fmt(tat), 'PX', ttl)
redis.call('SET', KEYS[2], fmt(in_window), 'PX', ttl)
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[4], ttl)
if wait > 0 then return {0, math.ceil(wait * 1000000), procs, seq, '', fmt(in_window)} end
return {1, 0, procs, seq, member, fmt(in_window)}
"""
)

# KEYS: log, sum, tat; ARGV: member, actual, rate, period, margin -> the new member or ''
_SETTLE = Script(
    _PRELUDE
    + """
local actual, rate, period = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local delta = actual - amount_of(ARGV[1])
local tat = math.max(num(KEYS[3]), now) + delta * period / rate
local ttl = math.ceil((period + tonumber(ARGV[5]) + math.max(0, tat - now)) * 1000) + 1000
redis.call('SET', KEYS[3], fmt(tat), 'PX', ttl)
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return '' end
local member = string.match(ARGV[1], '^(.*):') .. ':' .. ARGV[2]
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], score, member)
redis.call('SET', KEYS[2], fmt(num(KEYS[2]) + delta), 'KEEPTTL')
return member
"""
)

# KEYS: log, sum, seq; ARGV: period, margin, then (age in seconds, amount) pairs -> counter
_RECORD = Script(
    _PRELUDE
    + """
local period, margin = tonumber(ARGV[1]), tonumber(ARGV[2])
local in_window = num(KEYS[2])
if redis.call('ZCARD', KEYS[1]) == 0 then in_window = 0 end
for i = 3, #ARGV, 2 do
  local when = now - tonumber(ARGV[i])
  if when > now - period - margin then
    local seq = redis.call('INCR', KEYS[3])
    redis.call('ZADD', KEYS[1], when, seq .. ':' .. ARGV[i + 1])
    in_window = in_window + tonumber(ARGV[i + 1])
  end
end
local ttl = math.ceil((period + margin) * 1000) + 1000
redis.call('SET', KEYS[2], fmt(in_window), 'PX', ttl)
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[3], ttl)
return num(KEYS[3])
"""
)


class SharedRateLimiter:
    """At most ``rate`` units in any ``period`` seconds across every process sharing
    ``(redis_url, deployment, kind)``, smoothed to a burst of ``burst`` (see the module).

    ``names`` gives the option names that a bad ``rate``, ``period`` or ``burst`` is reported
    under, as for ``RateLimiter``. ``on_fallback(reason)`` (``reason`` without passwords) and
    ``on_recover()`` are called, on the event loop, when Redis goes away and comes back; they
    must not raise. ``state`` is ``"shared"`` or ``"local"``, and ``local_rate`` the fair
    share used while local. A process counts as sharing the key for ``participant_ttl_s``
    (default: two periods, at least 10 s) after its last call. ``timeout_s`` bounds each
    Redis call; ``retry_s`` is the pause between tries while Redis is away.
    """

    def __init__(
        self,
        redis_url: str,
        deployment: str,
        kind: str,
        rate: float,
        period: float = 60.0,
        *,
        burst: float | None = None,
        names: tuple[str, str, str] = ("rate", "period", "burst"),
        on_fallback: Callable[[str], None] | None = None,
        on_recover: Callable[[], None] | None = None,
        retry_s: float = 5.0,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        participant_ttl_s: float | None = None,
    ) -> None:
        if kind not in KINDS:
            msg = f"kind= expected one of {', '.join(KINDS)}, got {kind!r}"
            raise ConfigError(msg)
        if not isinstance(deployment, str) or not deployment:
            msg = f"deployment= expected a non-empty id, got {deployment!r}"
            raise ConfigError(msg)
        shape = RateLimiter(rate, period, burst=burst, names=names)  # validates the three
        self.rate, self.period, self.burst = shape.rate, shape.period, shape.burst
        self.deployment = deployment
        self.kind = kind
        self.url = public_url(redis_url)
        self._redis_url = redis_url
        self.retry_s = retry_s
        self.timeout_s = timeout_s
        self.participant_ttl_s = (
            participant_ttl_s if participant_ttl_s is not None else max(2 * self.period, 10.0)
        )
        self.on_fallback = on_fallback
        self.on_recover = on_recover
        self._margin = min(1.0, 0.02 * self.period)  # as RateLimiter: arrival lags a send
        base = "nbllm:{" + deployment.replace("{", "(").replace("}", ")") + ":" + kind + "}"
        self._keys = {part: f"{base}:{part}" for part in ("log", "sum", "tat", "seq", "procs")}
        self._participant = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._participants: int | None = None
        self._last_seq = 0
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._local: _LocalShare | None = None  # the fallback, while Redis is away
        self._gate: _LocalShare | None = None  # the fallback, kept for a while after it
        self._gate_until = 0.0
        # the window's sum at the last answer, this process's part of it, and when
        self._seen: tuple[float, float, float] | None = None
        self._own = 0.0
        self._retry_at = 0.0
        self._history: collections.deque[SharedGrant] = collections.deque()
        self._pending: set[asyncio.Task[None]] = set()
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"SharedRateLimiter({self.url!r}, {self.deployment!r}, {self.kind!r}, "
            f"rate={self.rate:g}, period={self.period:g}, burst={self.burst:g}, "
            f"state={self.state!r})"
        )

    @property
    def state(self) -> str:
        """``"shared"`` while the budget lives in Redis, ``"local"`` while it has fallen back."""
        return "local" if self._local is not None else "shared"

    @property
    def local_rate(self) -> float:
        """This process's fair share of ``rate``: what it may use while Redis is away."""
        return self.rate / self._participants if self._participants else self.rate / 2

    async def acquire(self, amount: float = 1.0) -> SharedGrant:
        """Wait until ``amount`` units may be spent, spend them, and return the grant."""
        if self._closed:
            msg = "this SharedRateLimiter is closed"
            raise RuntimeError(msg)
        self._bind()
        assert self._lock is not None
        async with self._lock:
            if self._pending:  # a settle made before this acquire counts before it
                await asyncio.gather(*list(self._pending))
            gated: Grant | None = None
            gate: _LocalShare | None = None
            while True:
                now = self._now()
                if self._local is not None and now >= self._retry_at:
                    await self._try_recover()
                if self._local is not None:
                    if gated is None or gate is not self._local:
                        gate, gated = self._local, await self._local.acquire(amount)
                    return self._remember(SharedGrant(gated.t, amount, local=gated, issuer=gate))
                if self._gate is not None and now >= self._gate_until:
                    self._gate = None
                if self._gate is not None and gated is None:
                    gate, gated = self._gate, await self._gate.acquire(amount)
                try:
                    args = self._acquire_args(amount)
                    reply = await _ACQUIRE(self._redis(), self._key_list(), args)
                except Exception as exc:
                    await self._fall_back(exc)
                    continue
                granted, wait_us, participants, seq, member, in_window = reply
                self._participants = max(1, int(participants))
                if int(seq) < self._last_seq:  # the server lost its data (restarted empty)
                    lost = bool(self._history)
                    await self._restore_lost()
                    if lost and int(granted):
                        # granted on a log that did not hold our grants yet: hand it back
                        # (as spent 0) and ask again now that they are in
                        await self._settle_shared(SharedGrant(0.0, amount, text(member)), 0.0)
                        continue
                    if self._local is not None:
                        continue
                else:
                    self._last_seq = int(seq)
                now = self._now()
                if int(granted):
                    grant = SharedGrant(now, amount, text(member), gated, gate)
                    self._remember(grant)
                    self._seen = (now, float(in_window), self._own)
                    return grant
                self._seen = (now, float(in_window), self._own)
                await asyncio.sleep(int(wait_us) / 1e6)

    def settle(self, grant: Grant, actual: float) -> None:
        """Replace a grant's estimated amount by what was really spent; the shared log is
        updated in the background (the next ``acquire`` waits for it)."""
        if not isinstance(grant, SharedGrant) or actual == grant.amount:
            return
        if grant.t > self._now() - self.period - self._margin:  # still in the history
            self._own += actual - grant.amount
        grant.amount = actual
        issuer, local = grant.issuer, grant.local
        live = any(issuer is limiter for limiter in (self._local, self._gate))
        if issuer is not None and local is not None and live:  # not a stale fallback's
            issuer.settle(local, actual)
        if grant.member is None or self._closed:
            return
        task = asyncio.get_running_loop().create_task(self._settle_shared(grant, actual))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def aclose(self) -> None:
        """Finish pending settles, leave the participants' set, close the connection."""
        if self._closed:
            return
        if self._pending:
            await asyncio.gather(*list(self._pending))
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            if self._local is None:
                try:
                    await client.zrem(self._keys["procs"], self._participant)
                except Exception:  # leaving is a courtesy: the entry expires anyway
                    log.debug("nbllm: could not leave the participants of %s", self.url)
            await close_quietly(client)

    # -- Redis -------------------------------------------------------------------

    def _bind(self) -> None:
        """A client and a lock belong to one event loop: made on the first use in each."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            self._lock = asyncio.Lock()
            self._client = None  # a client of another loop cannot be awaited here
            self._pending.clear()

    def _redis(self) -> Any:
        if self._client is None:
            self._client = redis_client(self._redis_url, self.timeout_s)
        return self._client

    def _key_list(self) -> list[str]:
        return [self._keys[part] for part in ("log", "sum", "tat", "seq", "procs")]

    def _acquire_args(self, amount: float) -> list[Any]:
        return [
            repr(float(amount)),
            repr(self.rate),
            repr(self.period),
            repr(self.burst),
            repr(self._margin),
            self._participant,
            repr(float(self.participant_ttl_s)),
        ]

    async def _settle_shared(self, grant: SharedGrant, actual: float) -> None:
        keys = [self._keys["log"], self._keys["sum"], self._keys["tat"]]
        args = [grant.member, repr(float(actual)), repr(self.rate), repr(self.period)]
        try:
            member = await _SETTLE(self._redis(), keys, [*args, repr(self._margin)])
        except Exception as exc:
            await self._fall_back(exc)
            return
        if member:
            grant.member = text(member)

    async def _record(self, client: Any) -> int:
        """Write this process's grants of the last period into the shared log."""
        now = self._now()
        self._trim(now)
        pairs: list[str] = []
        for grant in self._history:
            pairs += [repr(max(0.0, now - grant.t)), repr(float(grant.amount))]
        keys = [self._keys["log"], self._keys["sum"], self._keys["seq"]]
        seq = await _RECORD(client, keys, [repr(self.period), repr(self._margin), *pairs])
        return int(seq)

    async def _restore_lost(self) -> None:
        """Write this process's recent grants back into a Redis that lost them."""
        try:
            self._last_seq = await self._record(self._redis())
        except Exception as exc:
            await self._fall_back(exc)

    # -- falling back and recovering ------------------------------------------------

    async def _fall_back(self, exc: BaseException) -> None:
        if self._local is not None:
            return
        why = reason(exc, self._redis_url)
        now = self._now()
        if self._gate is not None and now < self._gate_until:
            self._local = self._gate  # it already holds this process's recent grants
        else:
            self._local = _LocalShare(self.local_rate, self.period)
            self._local.seed(self._history, now)
            self._local.seed(self._others_excess(now), now)
        self._retry_at = now + self.retry_s
        client, self._client = self._client, None
        if client is not None:
            await close_quietly(client)
        report_down(
            self.url,
            why,
            f"shared limits go on locally at this process's share ({self.deployment} "
            f"{self.kind}: {self.local_rate:g} per {self.period:g} s) and Redis is tried again "
            f"every {self.retry_s:g} s",
        )
        if self.on_fallback is not None:
            self.on_fallback(why)

    async def _try_recover(self) -> None:
        client = redis_client(self._redis_url, self.timeout_s)
        try:
            await client.ping()
            self._last_seq = await self._record(client)
        except Exception as exc:
            log.debug("nbllm: Redis at %s still unreachable: %s", self.url, reason(exc, ""))
            self._retry_at = self._now() + self.retry_s
            await close_quietly(client)
            return
        self._client = client
        # Other processes may stay local for up to retry_s more, spending budget Redis does
        # not see yet: this one keeps its local share as a second gate until they are back
        # and their grants of the last window are written in.
        self._gate, self._local = self._local, None
        self._gate_until = self._now() + self.retry_s + self.period + self._margin
        report_up(self.url)
        if self.on_recover is not None:
            self.on_recover()

    # -- this process's own grants -------------------------------------------------

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _remember(self, grant: SharedGrant) -> SharedGrant:
        self._history.append(grant)
        self._own += grant.amount
        self._trim(grant.t)
        return grant

    def _trim(self, now: float) -> None:
        horizon = now - self.period - self._margin
        while self._history and self._history[0].t <= horizon:
            self._own -= self._history.popleft().amount
        if not self._history:
            self._own = 0.0

    def _others_excess(self, now: float) -> list[Grant]:
        """What the other processes had spent beyond their shares in the window last seen,
        as one grant at the time it was seen.

        Each process's fallback lets it spend up to its share, less its own recent grants;
        a process that had spent more than its share cannot give the difference back, so
        the others keep it out of theirs. Exact for two processes; with more, exact when
        the others had spent alike, a little generous when they had not.
        """
        if self._seen is None:
            return []
        seen_at, in_window, own = self._seen
        if seen_at <= now - self.period - self._margin:
            return []
        others = max(1, (self._participants or 2) - 1)
        excess = in_window - own - others * self.local_rate
        return [Grant(seen_at, excess)] if excess > 1e-9 else []


class _LocalShare(RateLimiter):
    """The fallback: a local limiter that starts with the grants this process already made
    in the current window, so that switching to it does not open a fresh one."""

    def seed(self, grants: Iterable[Grant], now: float) -> None:
        self._refill(now)
        horizon = now - self.period - self._margin
        fresh = [Grant(g.t, g.amount) for g in grants if g.t > horizon]
        self._log = collections.deque(sorted([*self._log, *fresh], key=lambda g: g.t))
        self._in_window += sum(g.amount for g in fresh)
