"""Preparing a run: every check that needs the data or the engine, before any request.

``check_run`` validates the options and loads the data; ``open_run`` makes the engine
(a local model loads here), opens the checkpoint and the cache, and gives a
``PreparedRun`` that ``execute`` runs once. ``prepare_run`` does both (``aprepare_run``
makes the engine off the event loop, for ``arun``). ``nbllm.run``, ``arun`` and
``submit`` all come through here, so a bad option, a missing key or a checkpoint made
for another call is refused the same way, whichever was called.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbllm import run_checks
from nbllm.config import RunConfig
from nbllm.dataset import load_conversations
from nbllm.engines import (
    EMBEDDED_MODEL,
    Engine,
    check_credentials,
    check_engine,
    create_engine,
    is_local,
)
from nbllm.engines.keys import checked_key_for_api_base
from nbllm.errors import ConfigError
from nbllm.executor import Event, Executor
from nbllm.executor.cache import ResponseCache, resolve_cache_path
from nbllm.executor.checkpoint import (
    CheckpointStore,
    RunIdentity,
    dataset_hash,
    resolve_checkpoint_path,
)
from nbllm.executor.deployments import DeploymentList
from nbllm.executor.events import EnginePhase, EventBus
from nbllm.executor.lanes import Routes
from nbllm.executor.limits import AUTO_CONCURRENCY
from nbllm.executor.routing import RoutingOptions
from nbllm.executor.storage import MAX_PENDING
from nbllm.images import check_engine_takes_images
from nbllm.redact import public_url
from nbllm.results import RunResult
from nbllm.run_call import call_text
from nbllm.types import Conversation

if TYPE_CHECKING:
    from nbllm.alerts import AlertWatcher

__all__ = [
    "CheckedRun",
    "Listener",
    "MakeView",
    "PreparedRun",
    "RunStop",
    "aprepare_run",
    "check_run",
    "open_run",
    "prepare_run",
]

Listener = Callable[[Event], None]
MakeView = Callable[["RunStop"], Listener | None]


class RunStop:
    """The Stop of one run: pressed from any thread, before or while the run goes.

    Presses that come before the executor exists are handed to it when it does; each
    press is one ``Executor.stop()`` (the first lets requests in flight finish, the
    second cancels them).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._presses = 0
        self._executor: Executor | None = None

    def __call__(self) -> None:
        with self._lock:
            self._presses += 1
            executor = self._executor
        if executor is not None:
            executor.stop()

    @property
    def presses(self) -> int:
        return self._presses

    def attach(self, executor: Executor) -> None:
        with self._lock:
            self._executor = executor
            presses = self._presses
        for _ in range(presses):
            executor.stop()


def _api_key_for(engine: Any, api_base: str | None, api_key: str | None) -> str | None:
    """The key for ``api_base`` when ``api_key=`` is not given (``nbllm.engines.keys``): a
    provider's variable only to its own host, ``NBLLM_API_KEY`` to any other server; an
    ``Engine`` instance keeps the key it was made with."""
    return api_key if isinstance(engine, Engine) else checked_key_for_api_base(api_base, api_key)


def _run_repr(kind: str, turns: int, conversations: int, model: str, more: str) -> str:
    # Short and secret-free: counts, not conversations; no options (params may hold keys).
    return f"<{kind} {conversations:,} conversations, {turns:,} turns, model {model!r}{more}>"


@dataclass(repr=False)
class PreparedRun:
    """A validated run, ready to execute: data loaded, engine chosen, checkpoint opened.

    Made by ``prepare_run`` (all checks happen there, before any request); ``execute``
    runs it once and releases the engine, the checkpoint and the cache. ``config`` is
    the options as given (``concurrency`` capped to what the engine takes at once);
    ``model`` the model asked, named by the engine or the embedded one when none was.
    ``stop`` stops it (see ``RunStop``); ``view`` is its live progress, if any.
    """

    config: RunConfig
    model: str
    conversations: list[Conversation]
    engine: Engine | None  # None with routes: an engine per deployment there
    owns_engine: bool
    listeners: list[Callable[[Event], None]]
    store: CheckpointStore | None = None
    cache: ResponseCache | None = None
    stop: RunStop = field(default_factory=RunStop)
    view: Listener | None = None
    routes: Routes | None = None
    models: tuple[tuple[str, Engine | Routes], ...] = ()  # model=[...]: what each is sent to
    alerts: AlertWatcher | None = None  # alerts=: the rules' watcher, a listener of the run

    @property
    def turns(self) -> int:
        return sum(len(c) for c in self.conversations)

    def __repr__(self) -> str:
        sends_to = self.engine if self.engine is not None else self.routes
        more = f", engine {sends_to.describe() if sends_to is not None else '-'}"  # secret-free
        more += f", checkpoint {self.store.path}" if self.store is not None else ""
        return _run_repr("PreparedRun", self.turns, len(self.conversations), self.model, more)

    async def execute(self) -> RunResult:
        executor = Executor(
            self.engine,
            model=self.model,
            concurrency=self.config.concurrency,
            max_conversations=self.config.max_conversations,
            rpm=self.config.rpm,
            tpm=self.config.tpm,
            max_rpm=self.config.max_rpm,
            max_tpm=self.config.max_tpm,
            timeout=self.config.timeout,
            retry=self.config.retry_policy,
            system=self.config.system,
            params=self.config.sampling_params,
            listeners=self.listeners,
            checkpoint=self.store,
            cache=self.cache,
            stop_grace_s=self.config.stop_grace_s,
            budget=run_checks.budget(self.config),
            redis_url=self.config.redis_url,  # $NBLLM_REDIS_URL too: nbllm.settings
            routes=self.routes,
            models=self.models,
            ensemble=self.config.ensemble,
            alerts=self.alerts.fired if self.alerts is not None else None,
            parser=self.config.parser,
            parse_retries=self.config.parse_retries,
            score=run_checks.scorer(self.config),
        )
        self.stop.attach(executor)
        try:
            return await executor.run(self.conversations)
        except BaseException:
            _close_view(self.view)  # ended before RunFinished: the view says so, not waits
            raise
        finally:
            self.release()
            if self.owns_engine and self.engine is not None:
                await self.engine.aclose()
            if self.routes is not None:
                await self.routes.aclose()
            for to in self._made():
                await to.aclose()

    def _made(self) -> list[Engine | Routes]:
        """What the run made for its models (not an ``Engine`` the caller gave)."""
        return [to for _, to in self.models if to is not self.config.engine]

    def release(self) -> None:
        """Commit and close the checkpoint and the cache (the last batch is never lost)."""
        for closeable in (self.store, self.cache):
            if closeable is not None:
                closeable.close()


def prepare_run(
    data: Any,
    config: RunConfig,
    *,
    listeners: Iterable[Listener] = (),
    make_view: MakeView | None = None,
) -> PreparedRun:
    """Check the data, choose the engine, open the checkpoint and the cache.

    ``config`` holds the options, already checked. Raises ``ConfigError`` /
    ``DatasetError`` / ``CheckpointError`` before any request. ``listeners`` join
    ``config.listeners``; ``make_view(stop)`` makes the live progress (a listener, or
    None) once the data is read and before the engine is made, so that a local
    engine's preparation (``EnginePhase`` events) shows in it.
    """
    return open_run(check_run(data, config, listeners, make_view))


async def aprepare_run(
    data: Any,
    config: RunConfig,
    *,
    listeners: Iterable[Listener] = (),
    make_view: MakeView | None = None,
) -> PreparedRun:
    """``prepare_run`` for a coroutine: the options and the data are checked here, the
    engine is made and the checkpoint opened in a worker thread, so that this loop (a
    kernel's) goes on while a local model loads; its ``EnginePhase`` events reach the
    listeners on this loop, in order. Cancelled while loading, the engine is closed as
    soon as it is made.
    """
    checked = check_run(data, config, listeners, make_view)
    loop = asyncio.get_running_loop()
    handoff = _Handoff()

    def deliver(bus: EventBus, event: Event) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody to tell
            loop.call_soon_threadsafe(bus.emit, event)

    def opened() -> PreparedRun | None:
        plan = open_run(checked, deliver)
        with handoff.lock:
            if not handoff.abandoned:
                handoff.plan = plan
                return plan
        _discard(plan)  # its caller has gone
        return None

    try:
        plan = await asyncio.to_thread(opened)
    except asyncio.CancelledError:
        with handoff.lock:
            handoff.abandoned = True
            made = handoff.plan
        if made is not None:
            _discard(made)
        _close_view(checked.view)
        raise
    assert plan is not None  # only an abandoned handoff gives None
    return plan


@dataclass
class _Handoff:
    """A plan made in a worker thread, or the word that its caller has gone."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    plan: PreparedRun | None = None
    abandoned: bool = False


@dataclass(frozen=True, repr=False)
class CheckedRun:
    """A run checked by ``check_run``, for ``open_run`` to make its engine and checkpoint."""

    config: RunConfig
    conversations: list[Conversation]
    model: str
    cache_path: Path | None
    stop: RunStop
    listeners: list[Listener]
    view: Listener | None
    deployments: DeploymentList | None = None
    routing: RoutingOptions | None = None
    models: tuple[str, ...] = ()  # model=[...]: each model (or group) asked
    alerts: AlertWatcher | None = None

    @property
    def turns(self) -> int:
        return sum(len(c) for c in self.conversations)

    def plan(
        self,
        engine: Engine | None = None,
        *,
        owns: bool = False,
        config: RunConfig | None = None,
        routes: Routes | None = None,
    ) -> PreparedRun:
        """The ``PreparedRun`` of this run, sent to ``engine`` (or ``routes``, or models set
        after), with its data, listeners, stop, view and alerts; ``config`` where an engine
        changed an option (a local one's ``concurrency``)."""
        return PreparedRun(
            config or self.config, self.model, self.conversations, engine, owns,
            self.listeners, stop=self.stop, view=self.view, alerts=self.alerts, routes=routes,
        )  # fmt: skip

    def __repr__(self) -> str:
        engine, api_base = self.config.engine, self.config.api_base
        more = f", engine {engine.describe() if isinstance(engine, Engine) else engine}"
        more += f" @ {public_url(api_base)}" if api_base else ""
        return _run_repr("CheckedRun", self.turns, len(self.conversations), self.model, more)


def check_run(
    data: Any,
    config: RunConfig,
    listeners: Iterable[Listener] = (),
    make_view: MakeView | None = None,
) -> CheckedRun:
    """The first half of ``prepare_run``: every check that makes nothing and never blocks
    (the engine's name, the model, the data), then the view; ``open_run`` does the rest."""
    engine = config.engine
    check_engine(engine)  # an unknown engine is the error to report, whatever else is missing
    model = config.model if isinstance(config.model, str) else None
    config.parser  # noqa: B018 - a schema or parser it cannot use: ConfigError now
    deployments, routing = run_checks.deployments(config)
    models = run_checks.models(config, deployments)
    if models:
        model = ", ".join(models)
    elif deployments is not None:
        model = run_checks.group(deployments, model)
    elif model is None:
        if isinstance(engine, Engine):
            model = engine.default_model or engine.name
        elif is_local(engine, model, config.api_base):
            model = EMBEDDED_MODEL
        else:
            msg = (
                "model= is required with api_base= or a provider: a litellm model string such "
                "as 'openai/gpt-4o-mini', or the model name a server at api_base= serves"
            )
            raise ConfigError(msg)
    cache_path = resolve_cache_path(config.cache)
    conversations = load_conversations(data)
    run_checks.check_score(config, conversations)
    run_checks.check_turn_formats(conversations)
    config = run_checks.for_batches(config, conversations, models, model, deployments is not None)
    local = deployments is None and any(
        is_local(engine, m, config.api_base) for m in models or (model,)
    )
    check_engine_takes_images("local" if local and engine == "auto" else engine, conversations)
    stop = RunStop()
    alerts = run_checks.alert_watcher(config)
    run_listeners = [*config.listeners, *listeners, *run_checks.watchers(config)]
    view = make_view(stop) if make_view is not None else None
    if view is not None:
        run_listeners.append(view)
    if alerts is not None:  # an Alert goes to every other listener (the view shows it)
        alerts.forward = EventBus(list(run_listeners)).emit
        run_listeners.append(alerts)
    return CheckedRun(
        config, conversations, model, cache_path, stop, run_listeners, view, deployments, routing,
        models, alerts,
    )  # fmt: skip


def _close_view(view: Listener | None) -> None:
    close = getattr(view, "close", None)
    if callable(close):
        close()


def _discard(plan: PreparedRun) -> None:
    """Release a plan that will never run."""
    plan.release()
    if plan.owns_engine and plan.engine is not None:
        close_unused(plan.engine)
    for to in (plan.routes, *plan._made()):
        if isinstance(to, Routes):
            for engine in to.engines.values():
                close_unused(engine)
        elif to is not None:
            close_unused(to)


Deliver = Callable[[EventBus, Event], None]


def open_run(checked: CheckedRun, deliver: Deliver | None = None) -> PreparedRun:
    """Make the engine, open the checkpoint and the cache: the part that may take seconds
    (a local model loads). ``deliver(bus, event)`` hands the engine's ``EnginePhase``
    events to the listeners (default: at once, in this thread)."""
    try:
        return _prepare(checked, deliver)
    except BaseException:
        _close_view(checked.view)  # shown already: say the run did not start instead of waiting
        raise


def _prepare(checked: CheckedRun, deliver: Deliver | None) -> PreparedRun:
    config, model = checked.config, checked.model
    engine = config.engine
    if checked.models:
        return _prepare_models(checked, deliver)
    if checked.deployments is not None:
        return _prepare_routed(checked)
    chosen = _engine_for(checked, model, deliver)
    if chosen.max_in_flight is not None and (
        config.concurrency == "auto" or chosen.max_in_flight < config.concurrency
    ):
        # More would only queue inside the engine, where their timeouts would run out.
        config = config.model_copy(update={"concurrency": chosen.max_in_flight})
    plan = checked.plan(chosen, owns=chosen is not engine, config=config)
    # Under auto, a local model's checkpoint survives a changed pick (llama.cpp
    # installed since, say): rows name the engine that answered each turn.
    auto = engine == "auto" and is_local(engine, model, config.api_base)
    return _open_stores(checked, plan, "auto" if auto else chosen.identity(), {})


def local_options(config: RunConfig) -> dict[str, Any]:
    """The run's options for a local engine, where they differ from an engine's own
    defaults (so that asking a provider for none of them is no error)."""
    options: dict[str, Any] = {}
    if config.replicas is not None:
        options["replicas"] = config.replicas
    if config.replicas is not None or config.allow_oversubscribe:
        options["allow_oversubscribe"] = config.allow_oversubscribe
    if config.cluster is not None or config.ray_address is not None:
        options["cluster"] = "ray"
        options["ray_address"] = config.ray_address
    if not config.prefix_cache:
        options["prefix_cache"] = False
    if config.prefix_cache_bytes is not None:
        options["prefix_cache_bytes"] = config.prefix_cache_bytes
    return options


def _engine_for(checked: CheckedRun, model: str, deliver: Deliver | None) -> Engine:
    """The engine that answers ``model``, its key and price checked first (``engine=``
    itself where it is an ``Engine``)."""
    config, engine = checked.config, checked.config.engine
    api_key = None if config.api_key is None else config.api_key.get_secret_value()
    check_credentials(engine, model, config.api_base, api_key)
    run_checks.check_price(config, model, config.api_base)
    phases = EventBus(checked.listeners)

    def on_phase(phase: str, done: float | None, total: float | None, detail: str = "") -> None:
        event = EnginePhase(phase, done, total, time.time(), detail)
        if deliver is None:
            phases.emit(event)
        else:
            deliver(phases, event)

    key = _api_key_for(engine, config.api_base, api_key)
    made = create_engine(
        engine, model=model, api_base=config.api_base, api_key=key,
        max_connections=_connections(config.concurrency), worker=config.worker,
        on_phase=on_phase, **local_options(config),
    )  # fmt: skip
    return run_checks.batched(config, model, key, made)


def _prepare_models(checked: CheckedRun, deliver: Deliver | None) -> PreparedRun:
    """A run of several models: an engine per model (the one ``engine=`` gives, where it
    is an ``Engine``), or with ``router=`` the engines of each group's deployments."""
    made: list[tuple[str, Engine | Routes]] = []
    plan = checked.plan()
    try:
        for name in checked.models:
            if checked.deployments is not None:
                made.append((name, _routes_for(checked, name)))
            else:
                made.append((name, _engine_for(checked, name, deliver)))
    except BaseException:
        plan.models = tuple(made)
        _discard(plan)
        raise
    plan.models = tuple(made)
    ensemble = checked.config.ensemble
    identity = " + ".join(to.identity() for _, to in made)
    identity += f" (ensemble {ensemble})" if ensemble else ""
    params = {} if checked.deployments is None else made[0][1].params  # type: ignore[union-attr]
    return _open_stores(checked, plan, identity, params)


def _open_stores(
    checked: CheckedRun, plan: PreparedRun, engine_identity: str, group_params: dict[str, Any]
) -> PreparedRun:
    """Open the run's checkpoint and cache; on any failure, release what the plan holds."""
    config, model, conversations = plan.config, plan.model, plan.conversations
    try:
        if config.checkpoint is not False and config.checkpoint is not None:
            identity = RunIdentity(
                dataset=dataset_hash(conversations),
                model=model,
                engine=engine_identity,
                params={**group_params, **config.sampling_params},
                system=config.system,
            )
            path = resolve_checkpoint_path(config.checkpoint, identity.fingerprint)
            if path is not None:
                plan.store = CheckpointStore.open(
                    path,
                    identity,
                    conversations=len(conversations),
                    turns=plan.turns,
                    resume=config.resume,
                )
                if config.batch_api:  # hours long: nbllm.runs.resume(id) may pick it up
                    plan.store.keep_call(call_text(config, conversations))
        if checked.cache_path is not None:
            reuse = config.cache == "always"
            if plan.store is not None:
                plan.cache = ResponseCache(checked.cache_path, reuse_sampled=reuse)
            else:  # the cache is what a re-run reads: committed as promptly as a checkpoint
                plan.cache = ResponseCache(
                    checked.cache_path, reuse_sampled=reuse, delay_s=0.0, max_pending=MAX_PENDING
                )
    except BaseException:
        _discard(plan)  # a loaded local model, a worker child: not left behind
        raise
    return plan


def _prepare_routed(checked: CheckedRun) -> PreparedRun:
    """A run over ``router=``'s deployments: an engine per deployment of the group and of
    its fallback groups (the lean OpenAI-compatible one for an ``api_base``, litellm for
    a provider), each deployment's key and price checked first."""
    routes = _routes_for(checked, checked.model)
    plan = checked.plan(routes=routes)
    # The group and its sampling parameters, not the list: adding a deployment keeps it.
    return _open_stores(checked, plan, "router", routes.params)


def _routes_for(checked: CheckedRun, group: str) -> Routes:
    """``group`` of ``router=``'s deployments, with an engine per deployment of it and of
    its fallback groups, each deployment's key and price checked first."""
    config = checked.config
    assert checked.deployments is not None and checked.routing is not None
    routes = Routes(checked.deployments, group, checked.routing, {})  # its engines come next
    engine = config.engine
    made: dict[str, Engine] = {}
    try:
        for d in routes.used:
            key = None if d.api_key is None else d.api_key.get_secret_value()
            try:
                if is_local(engine, d.model, d.api_base):
                    msg = (
                        f"litellm_params.model {d.model!r} is a model on this machine; a "
                        "router= deployment is a server (api_base) or a provider's model"
                    )
                    raise ConfigError(msg)
                check_credentials(engine, d.model, d.api_base, key)
                run_checks.check_price(config, d.model, d.api_base, d.cost_per_1k_tokens)
                key = _api_key_for(engine, d.api_base, key) if key is None else key
            except ConfigError as exc:
                msg = f"{d.where}: {exc}"
                raise ConfigError(msg) from None
            cap = d.max_parallel_requests
            made[d.id] = create_engine(
                engine,
                model=d.model,
                api_base=d.api_base,
                api_key=key,
                max_connections=_connections(cap if isinstance(cap, int) else config.concurrency),
            )
    except BaseException:
        for made_engine in made.values():
            close_unused(made_engine)
        raise
    return replace(routes, engines=made)


def _connections(concurrency: int | str) -> int:
    """Connections an API engine may open: the requests it may have in flight."""
    return max(int(AUTO_CONCURRENCY["ceiling"]) if concurrency == "auto" else int(concurrency), 8)


def close_unused(engine: Engine) -> None:
    """Close an engine that never sent a request, from synchronous code.

    Nothing of it is bound to an event loop yet, so a loop of its own closes it: here, or
    in a short-lived thread where this thread already runs one (a kernel's).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(engine.aclose())
        return
    closer = threading.Thread(target=asyncio.run, args=(engine.aclose(),), name="nbllm-close")
    closer.start()
    closer.join()
