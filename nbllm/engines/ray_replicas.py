"""Replicas as Ray actors: the same local model on every GPU of a Ray cluster.

``cluster="ray"`` (or ``ray_address="ray://head:10001"``) with a local model starts the
replicas as Ray actors instead of worker processes of this machine: ``replicas="auto"`` puts
one on each GPU of the cluster (``num_gpus=1``), or one on a cluster without GPUs; a number
asks for that many, each with an equal share of the cluster's CPUs where it has no GPUs. Ray
places them and starts an actor again when it dies (``max_restarts``); nbllm manages no
cluster of its own. The run, and its executor, stays in the notebook: requests are spread
over the actors as over worker replicas (``nbllm.engines.replicas``), a conversation stays
on its actor, and the requests of an actor that died go to the others at once.

Where Ray is already initialised (``ray.init(...)`` in the notebook), that connection is
used. Otherwise ``ray_address`` is connected to (checked first: an address that does not
answer is a one-line ``EngineUnavailable``), or, with ``cluster="ray"`` alone, a local
instance is started (Ray's own default: ``$RAY_ADDRESS`` when set). Every machine of the
cluster needs nbllm with its local engines installed.
"""

from __future__ import annotations

import asyncio
import importlib
import socket
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from nbllm.engines.replicas import SpreadEngine
from nbllm.errors import ConfigError, EngineError, EngineUnavailable
from nbllm.types import ChatRequest, ChatResponse

__all__ = ["RayEngine", "RayReplicas", "connect_ray", "shared_ray_replicas"]

#: Seconds to wait for a Ray address to accept a connection before calling it unreachable.
CONNECT_CHECK_S = 3.0
#: Seconds to wait for every actor to load its model.
LOAD_TIMEOUT_S = 900.0


def require_ray() -> Any:
    try:
        return importlib.import_module("ray")
    except ImportError:
        msg = "cluster='ray' needs Ray, which is not installed: pip install 'nbllm[ray]'"
        raise ConfigError(msg) from None


def connect_ray(address: str | None) -> Any:
    """The ``ray`` module, connected: to the running connection, to ``address``, or to a
    local instance started here."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    if address is not None:
        _check_reachable(address)
    try:
        ray.init(
            address=address, ignore_reinit_error=True, log_to_driver=False, include_dashboard=False
        )
    except Exception as exc:
        where = address or "a local instance"
        msg = f"Ray could not connect to {where}: {type(exc).__name__}: {exc}"
        raise EngineUnavailable(msg) from exc
    return ray


def _check_reachable(address: str) -> None:
    """Refuse, in a few seconds and one line, a ``host:port`` (or ``ray://host:port``) that
    does not accept a connection; ``"auto"`` and the like are left to Ray."""
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    if not parts.hostname or parts.port is None:
        return
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=CONNECT_CHECK_S):
            pass
    except OSError as exc:
        msg = f"no Ray cluster answers at {address}: {exc}"
        raise EngineUnavailable(msg) from None


class _Replica:
    """A Ray actor holding one local engine (made into an actor class by ``_actor_class``)."""

    def __init__(self, engine: str, model: str | None, options: dict[str, Any]) -> None:
        from nbllm.engines.local import create_local_engine

        self.engine = create_local_engine(engine, model, **options)

    def ready(self) -> dict[str, Any]:
        return {
            "engine": self.engine.name,
            "model": self.engine.model.name,
            "max_in_flight": self.engine.max_in_flight,
            "identity": self.engine.identity(),
        }

    async def complete(self, request: ChatRequest) -> ChatResponse:
        return await self.engine.complete(request)


class RayReplicas:
    """``count`` actors of one local engine and model on the connected Ray cluster."""

    def __init__(
        self,
        ray: Any,
        engine: str,
        model: str | None,
        count: int | str,
        *,
        options: dict[str, Any] | None = None,
        allow_oversubscribe: bool = False,
    ) -> None:
        self.ray = ray
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
        room, what = (gpus, "GPUs") if gpus else (cpus, "CPUs")
        if count == "auto":
            count = max(1, gpus)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            msg = f"replicas must be a whole number >= 1 or 'auto', got {count!r}"
            raise ConfigError(msg)
        if count > room and not allow_oversubscribe:
            msg = (
                f"replicas={count} is more than the Ray cluster's {room} {what}; pass "
                "allow_oversubscribe=True to share them"
            )
            raise ConfigError(msg)
        self.count = count
        share = room / count if count > room else max(1, room // count)
        if gpus:
            self.resources: dict[str, Any] = {"num_gpus": min(1.0, gpus / count)}
        else:
            threads = str(max(1, int(share)))
            self.resources = {
                "num_cpus": min(float(share), float(cpus)),
                "runtime_env": {"env_vars": {"OMP_NUM_THREADS": threads}},
            }
        actor = ray.remote(max_restarts=-1, max_task_retries=0)(_Replica)
        self.actors = [
            actor.options(**self.resources).remote(engine, model, dict(options or {}))
            for _ in range(count)
        ]
        self.info: dict[str, Any] = {}
        self.engine_name = engine

    def start(self) -> RayReplicas:
        """Wait until every actor has loaded its model."""
        try:
            infos = self.ray.get([a.ready.remote() for a in self.actors], timeout=LOAD_TIMEOUT_S)
        except Exception as exc:
            self.stop()
            msg = f"the Ray replicas could not load the model: {type(exc).__name__}: {exc}"
            raise EngineUnavailable(msg) from exc
        self.info = infos[0]
        return self

    def stop(self) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:  # already gone, or Ray shut down: nothing to stop
                continue

    @property
    def running(self) -> bool:
        return self.ray.is_initialized()

    def engine(self) -> RayEngine:
        return RayEngine(self)


class RayEngine(SpreadEngine):
    """Sends each request to a live actor of ``RayReplicas`` (see the module)."""

    def __init__(self, replicas: RayReplicas) -> None:
        super().__init__(replicas.count)
        self.replicas = replicas
        info = replicas.info
        self.name = f"{info.get('engine', replicas.engine_name)} ray"
        self.default_model = info.get("model")
        limit = info.get("max_in_flight")
        self.max_in_flight = limit * replicas.count if isinstance(limit, int) else None
        self._identity = str(info.get("identity") or self.name)
        self._down: set[int] = set()
        self._probes: dict[int, asyncio.Task[None]] = {}
        lost = replicas.ray.exceptions
        self._lost_errors: tuple[type[BaseException], ...] = tuple(
            getattr(lost, name)
            for name in ("RayActorError", "ActorDiedError", "ActorUnavailableError")
            if hasattr(lost, name)
        )

    def identity(self) -> str:
        return self._identity

    def describe(self) -> str:
        return f"{self.name} x{self.count}"

    async def _send(self, index: int, request: ChatRequest) -> ChatResponse:
        ray = self.replicas.ray
        try:
            response: ChatResponse = await self.replicas.actors[index].complete.remote(request)
        except self._lost_errors as exc:
            msg = f"Ray actor {index + 1} was lost: {type(exc).__name__}"
            raise _ReplicaLost(msg) from exc
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, EngineError):
                raise cause from None
            msg = f"the Ray replica failed: {type(cause or exc).__name__}: {cause or exc}"
            raise EngineError(msg) from None
        return response

    def _live(self, index: int) -> bool:
        return index not in self._down

    def _coming_back(self) -> bool:
        return self.replicas.running

    async def _died(self, index: int, error: BaseException) -> bool:
        if not isinstance(error, _ReplicaLost):
            return False
        if index not in self._down:
            self._down.add(index)
            self._probes[index] = asyncio.ensure_future(self._probe(index))
        return True

    async def _probe(self, index: int) -> None:
        """Ray starts a dead actor again; it is live once it answers."""
        actor = self.replicas.actors[index]
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                await actor.ready.remote()
            except Exception:
                await asyncio.sleep(0.5)
                continue
            self._down.discard(index)
            return

    async def aclose(self) -> None:
        for probe in self._probes.values():
            probe.cancel()
        self._probes.clear()
        await super().aclose()


class _ReplicaLost(EngineError):
    """The actor a request went to died with it."""


_shared: dict[tuple[Any, ...], RayReplicas] = {}
_shared_lock = threading.Lock()


def shared_ray_replicas(
    address: str | None,
    engine: str,
    model: str | None,
    count: int | str,
    options: dict[str, Any],
    *,
    allow_oversubscribe: bool = False,
) -> RayReplicas:
    """Started ``RayReplicas``, shared within the process for the same arguments while the
    Ray connection lasts."""
    ray = connect_ray(address)
    key = (address, engine, model, count, tuple(sorted(options.items())))
    with _shared_lock:
        found = _shared.get(key)
        if found is None or not found.running or found.ray is not ray:
            found = RayReplicas(
                ray, engine, model, count, options=options, allow_oversubscribe=allow_oversubscribe
            ).start()
            _shared[key] = found
        return found
