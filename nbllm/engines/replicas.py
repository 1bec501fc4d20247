"""Replicas: one local model in several ``nbllm serve`` workers, one per GPU (or a share of the
CPU's cores each), and an engine that spreads a run's requests over them.

``replicas=N`` (or ``"auto"``: one per visible GPU, one on a CPU) with a local engine starts N
workers (``nbllm.engines.worker``). On GPUs each worker sees one of them
(``CUDA_VISIBLE_DEVICES``); on a CPU each gets an equal share of the cores (its torch threads).
More replicas than GPUs (or cores) is refused unless ``allow_oversubscribe=True``.

The run's engine (``ReplicaEngine``) sends a conversation's first request to the least busy
live replica and its later turns to the same one while it is live, so the replica's prefix
cache holds the conversation. A replica whose process dies is started again in the
background; the requests it had in flight, and the ones that would have gone to it, go to the
others at once (not counted as retries: no answer was refused), so no turn is lost. The row's
``engine`` names the replica that answered (``"torch worker 1/2"``).

The workers are shared within the process, like a single worker: a later run with the same
engine, model, options and count uses them again; all stop when the process exits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from nbllm.engines.base import Engine
from nbllm.engines.hardware import hardware
from nbllm.engines.worker import Worker, WorkerEngine
from nbllm.errors import ConfigError, EngineError, EngineUnavailable
from nbllm.types import ChatRequest, ChatResponse

__all__ = [
    "ReplicaEngine",
    "ReplicaSet",
    "SpreadEngine",
    "replica_places",
    "resolve_replicas",
    "shared_replicas",
]

# Seconds a request waits for some replica to be live again when none is.
_COMING_BACK_S = 900.0
# Seconds to wait for the operating system to report a worker's exit after its connection
# broke, before the failure is taken for the request's own.
_DEATH_GRACE_S = 0.5


def resolve_replicas(replicas: int | str, *, allow_oversubscribe: bool = False) -> int:
    """How many replicas ``replicas`` asks for here; refuses 0, a word other than "auto",
    and more than the GPUs (or the CPU's cores) without ``allow_oversubscribe``."""
    machine = hardware()
    gpus = _visible_gpus() if machine.has_cuda else []
    if replicas == "auto":
        return max(1, len(gpus))
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        msg = f"replicas must be a whole number >= 1 or 'auto', got {replicas!r}"
        raise ConfigError(msg)
    room, what = (len(gpus), "visible GPUs") if gpus else (machine.cpu_count, "CPU cores")
    if replicas > room and not allow_oversubscribe:
        msg = (
            f"replicas={replicas} is more than the {room} {what}; pass "
            "allow_oversubscribe=True to share them"
        )
        raise ConfigError(msg)
    return replicas


def replica_places(n: int) -> list[dict[str, str]]:
    """The environment of each of ``n`` replicas: a GPU each (round-robin when they share),
    or an equal share of the CPU's cores."""
    machine = hardware()
    gpus = _visible_gpus() if machine.has_cuda else []
    if gpus:
        return [{"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} for i in range(n)]
    threads = str(max(1, machine.cpu_count // n))
    return [{"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} for _ in range(n)]


def _visible_gpus() -> list[str]:
    """The ids of the GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [part.strip() for part in listed.split(",") if part.strip()]
    return [str(gpu.index) for gpu in hardware().gpus if gpu.kind in ("cuda", "rocm")]


class ReplicaSet:
    """N workers of one engine and model, started together and started again when one dies.

    ``places``: each worker's extra environment (``replica_places``). ``start()`` returns
    once every model is loaded; ``engine()`` gives a run's ``ReplicaEngine``.
    """

    def __init__(
        self,
        engine: str,
        model: str | None,
        places: Sequence[Mapping[str, str]],
        *,
        options: Sequence[str] = (),
    ) -> None:
        if not places:
            msg = "a ReplicaSet needs at least one replica"
            raise ConfigError(msg)
        self.engine_name = engine
        self.model_option = model
        self.options = tuple(options)
        self.places = [dict(place) for place in places]
        self.workers: list[Worker] = [self._new_worker(i) for i in range(len(places))]
        self._restarting: set[int] = set()
        self._lock = threading.Lock()
        #: Workers started again after their process died.
        self.restarts = 0

    def __repr__(self) -> str:
        return f"<ReplicaSet {self.engine_name} x{len(self.workers)} {self.workers[0].model!r}>"

    def __len__(self) -> int:
        return len(self.workers)

    def _new_worker(self, index: int) -> Worker:
        return Worker(
            self.engine_name, self.model_option, options=self.options, env=self.places[index]
        )

    def start(self) -> ReplicaSet:
        """Start every worker (their models load at the same time) and wait for them."""
        try:
            for worker in self.workers:
                worker.start(wait=False)
            for worker in self.workers:
                worker.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()

    @property
    def running(self) -> bool:
        """At least one worker runs or is being started again."""
        return any(w.running for w in self.workers) or bool(self._restarting)

    def live(self, index: int) -> bool:
        return index not in self._restarting and self.workers[index].running

    def restart(self, index: int) -> bool:
        """Start worker ``index`` again in a thread, unless that is under way; True when
        this call started it."""
        with self._lock:
            if index in self._restarting or self.workers[index].running:
                return False
            self._restarting.add(index)
        threading.Thread(target=self._restart, args=(index,), daemon=True).start()
        return True

    def _restart(self, index: int) -> None:
        old = self.workers[index]
        old.stop(timeout=5)
        worker = self._new_worker(index)
        try:
            worker.start()
        except Exception:
            worker.stop(timeout=5)
            with self._lock:
                self._restarting.discard(index)  # a later failure tries again
            return
        with self._lock:
            self.workers[index] = worker
            self.restarts += 1
            self._restarting.discard(index)

    def engine(self, **kwargs: Any) -> ReplicaEngine:
        """A run's engine over these replicas (kwargs go to each worker's HTTP client)."""
        return ReplicaEngine(self, **kwargs)


class SpreadEngine(Engine):
    """Spreads requests over ``count`` replicas (see the module): a conversation's first
    request to the least busy live one, its later turns to the same one while it lives, and
    a request whose replica died to another at once. A subclass says how to send
    (``_send``), which replicas are live (``_live``), whether a failure means the replica
    died (``_died``, which also sees to its restart) and whether any may come back
    (``_coming_back``)."""

    bounds_own_timeout = True

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count
        self._in_flight = [0] * count
        self._home: dict[Hashable, int] = {}

    async def _send(self, index: int, request: ChatRequest) -> ChatResponse:
        raise NotImplementedError

    def _live(self, index: int) -> bool:
        raise NotImplementedError

    async def _died(self, index: int, error: BaseException) -> bool:
        raise NotImplementedError

    def _coming_back(self) -> bool:
        raise NotImplementedError

    def _choose(self, request: ChatRequest, avoid: set[int]) -> int | None:
        """The conversation's replica while it is live, else the least busy live one."""
        live = [i for i in range(self.count) if i not in avoid and self._live(i)]
        if not live:
            return None
        key = _conversation_key(request)
        home = self._home.get(key)
        if home in live:
            return home
        chosen = min(live, key=lambda i: (self._in_flight[i], i))
        self._home[key] = chosen
        return chosen

    async def _complete(self, request: ChatRequest) -> ChatResponse:
        avoid: set[int] = set()
        while True:
            index = self._choose(request, avoid)
            if index is None:
                avoid.clear()  # every one was tried or is down: wait for one to be back
                index = await self._wait_for_a_replica()
            self._in_flight[index] += 1
            try:
                response = await self._send(index, request)
            except EngineError as error:
                if not await self._died(index, error):
                    raise  # the replica lives: the request's own failure
                avoid.add(index)
                continue  # sent again to another replica, at once
            finally:
                self._in_flight[index] -= 1
            return dataclasses.replace(response, engine=f"{self.name} {index + 1}/{self.count}")

    async def _wait_for_a_replica(self) -> int:
        deadline = time.monotonic() + _COMING_BACK_S
        while self._coming_back() and time.monotonic() < deadline:
            live = [i for i in range(self.count) if self._live(i)]
            if live:
                return min(live, key=lambda i: (self._in_flight[i], i))
            await asyncio.sleep(0.1)
        msg = f"every replica of the {self.name} has stopped and none could be started again"
        raise EngineUnavailable(msg)


class ReplicaEngine(SpreadEngine):
    """Sends each request to a live worker of a ``ReplicaSet`` (see the module)."""

    def __init__(self, replicas: ReplicaSet, **client_options: Any) -> None:
        super().__init__(len(replicas))
        self.replicas = replicas
        self._client_options = client_options
        first = replicas.workers[0]
        served = first.served_engine or replicas.engine_name
        self.name = f"{served} worker"
        self.default_model = str(first.model)
        limits = [w.max_in_flight for w in replicas.workers]
        self.max_in_flight = None if None in limits else sum(x or 0 for x in limits)
        self._clients: dict[int, tuple[Worker, WorkerEngine]] = {}
        self._retired: list[WorkerEngine] = []
        self._identity = WorkerEngine(first).identity()

    def identity(self) -> str:
        # One replica's answers are any replica's: a run resumes with another count.
        return self._identity

    def describe(self) -> str:
        return f"{self.name} x{self.count}"

    def _client(self, index: int) -> WorkerEngine:
        """The HTTP client of replica ``index``'s current worker (a new one after a restart)."""
        worker = self.replicas.workers[index]
        held = self._clients.get(index)
        if held is None or held[0] is not worker:
            if held is not None:
                self._retired.append(held[1])  # its worker died: closed with the engine
            held = (worker, worker.engine(**self._client_options))
            self._clients[index] = held
        return held[1]

    async def _send(self, index: int, request: ChatRequest) -> ChatResponse:
        return await self._client(index).complete(request)

    def _live(self, index: int) -> bool:
        return self.replicas.live(index)

    def _coming_back(self) -> bool:
        return self.replicas.running

    async def _died(self, index: int, error: BaseException) -> bool:
        """Whether replica ``index``'s process has died (then it is started again)."""
        worker = self.replicas.workers[index]
        for _ in range(int(_DEATH_GRACE_S / 0.05)):
            if not worker.running:
                self.replicas.restart(index)
                return True
            await asyncio.sleep(0.05)
        return False

    async def aclose(self) -> None:
        for client in [*(c for _, c in self._clients.values()), *self._retired]:
            await client.aclose()
        self._clients.clear()
        self._retired.clear()
        await super().aclose()


def _conversation_key(request: ChatRequest) -> Hashable:
    """What the turns of one conversation share: its first system and user messages."""
    firsts: list[str] = []
    for message in request.messages:
        role = message.get("role")
        if role in ("system", "user"):
            content = message.get("content")
            firsts.append(content if isinstance(content, str) else repr(content))
        if role == "user":
            break
    return tuple(firsts)


# --------------------------------------------------------------------- shared in the process

_shared: dict[tuple[Any, ...], ReplicaSet] = {}
_shared_lock = threading.Lock()


def shared_replicas(
    engine: str, model: str | None, count: int, options: Sequence[str] = ()
) -> ReplicaSet:
    """A started ``ReplicaSet`` of ``count`` workers, shared within the process like a single
    worker (``shared_worker``)."""
    key = (engine, model, count, tuple(options))
    with _shared_lock:
        found = _shared.get(key)
        if found is None or not found.running:
            found = ReplicaSet(engine, model, replica_places(count), options=options).start()
            _shared[key] = found
        return found
