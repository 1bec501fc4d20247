"""``nbllm.run`` and ``nbllm.arun``: the public way in.

``run`` blocks until the batch is done and works everywhere: in a plain script it
drives its own event loop; where a loop is already running (a Jupyter kernel) it runs
the batch on a private loop in a worker thread, so there is never an "event loop is
already running" error. Ctrl-C (or the kernel's interrupt) stops the batch and returns
what finished: the first lets the requests in flight finish (up to ``stop_grace_s``), a
second cancels them; every answer that arrived is kept and checkpointed. ``arun`` is the
same as a coroutine, for ``await``; cancelling its task cancels the requests in flight
at once (their answers never arrived), keeping the rest.

Each builds one ``RunConfig`` from its options; ``prepare_run`` (``aprepare_run`` for
``arun``, which makes the engine off the loop) does every check that needs the data or
the engine, before any request: an unknown engine, a missing model, a provider's API key
missing from the environment, the data, the checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nbllm.config import RunConfig, config_of_call
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
from nbllm.executor.events import EnginePhase, EventBus
from nbllm.executor.storage import MAX_PENDING
from nbllm.redact import public_url
from nbllm.results import RunResult
from nbllm.retry import RetryPolicy
from nbllm.run_thread import RunThread
from nbllm.types import Conversation

__all__ = [
    "CheckedRun",
    "PreparedRun",
    "RunStop",
    "aprepare_run",
    "arun",
    "check_run",
    "open_run",
    "prepare_run",
    "run",
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
    engine: Engine
    owns_engine: bool
    listeners: list[Callable[[Event], None]]
    store: CheckpointStore | None = None
    cache: ResponseCache | None = None
    stop: RunStop = field(default_factory=RunStop)
    view: Listener | None = None

    @property
    def turns(self) -> int:
        return sum(len(c) for c in self.conversations)

    def __repr__(self) -> str:
        more = f", engine {self.engine.describe()}"  # describe(): secret-free, URLs public
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
            timeout=self.config.timeout,
            retry=self.config.retry_policy,
            system=self.config.system,
            params=self.config.sampling_params,
            listeners=self.listeners,
            checkpoint=self.store,
            cache=self.cache,
            stop_grace_s=self.config.stop_grace_s,
        )
        self.stop.attach(executor)
        try:
            return await executor.run(self.conversations)
        except BaseException:
            _close_view(self.view)  # ended before RunFinished: the view says so, not waits
            raise
        finally:
            self.release()
            if self.owns_engine:
                await self.engine.aclose()

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

    @property
    def turns(self) -> int:
        return sum(len(c) for c in self.conversations)

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
    model = config.model
    if model is None:
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
    stop = RunStop()
    run_listeners = [*config.listeners, *listeners]
    view = make_view(stop) if make_view is not None else None
    if view is not None:
        run_listeners.append(view)
    return CheckedRun(config, conversations, model, cache_path, stop, run_listeners, view)


def _close_view(view: Listener | None) -> None:
    close = getattr(view, "close", None)
    if callable(close):
        close()


def _discard(plan: PreparedRun) -> None:
    """Release a plan that will never run."""
    plan.release()
    if plan.owns_engine:
        _close_unused(plan.engine)


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
    config, model, conversations = checked.config, checked.model, checked.conversations
    engine = config.engine
    api_key = None if config.api_key is None else config.api_key.get_secret_value()
    check_credentials(engine, model, config.api_base, api_key)
    phases = EventBus(checked.listeners)

    def on_phase(phase: str, done: float | None, total: float | None, detail: str = "") -> None:
        event = EnginePhase(phase, done, total, time.time(), detail)
        if deliver is None:
            phases.emit(event)
        else:
            deliver(phases, event)

    chosen = create_engine(
        engine,
        model=model,
        api_base=config.api_base,
        api_key=_api_key_for(engine, config.api_base, api_key),
        max_connections=max(config.concurrency, 8),
        worker=config.worker,
        on_phase=on_phase,
    )
    if chosen.max_in_flight is not None and chosen.max_in_flight < config.concurrency:
        # More would only queue inside the engine, where their timeouts would run out.
        config = config.model_copy(update={"concurrency": chosen.max_in_flight})
    plan = PreparedRun(
        config,
        model,
        conversations,
        chosen,
        chosen is not engine,
        checked.listeners,
        stop=checked.stop,
        view=checked.view,
    )
    try:
        if config.checkpoint is not False and config.checkpoint is not None:
            identity = RunIdentity(
                dataset=dataset_hash(conversations),
                model=model,
                # Under auto, a local model's checkpoint survives a changed pick (llama.cpp
                # installed since, say): rows name the engine that answered each turn.
                engine=(
                    "auto"
                    if engine == "auto" and is_local(engine, model, config.api_base)
                    else chosen.identity()
                ),
                params=config.sampling_params,
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


def _close_unused(engine: Engine) -> None:
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


def _blocking_view(progress: bool | None) -> MakeView:
    """The live progress that ``progress=`` asks for, for a run the caller waits for (no
    Stop button: the kernel is busy; its interrupt stops the run)."""

    def make(stop: RunStop) -> Listener | None:
        from nbllm.ui.frontend import progress_listener

        return progress_listener(progress)

    return make


def _with_gpu_samples(result: RunResult, progress: Any) -> RunResult:
    from nbllm.ui.frontend import with_gpu_samples

    return with_gpu_samples(result, progress)


async def arun(
    data: Any,
    *,
    model: str | None = None,
    api_base: str | None = None,
    api_key: str | None = None,
    concurrency: int = 32,
    rpm: float | None = None,
    tpm: float | None = None,
    timeout: float | None = 120.0,
    retries: int | RetryPolicy = 5,
    system: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    progress: bool | None = None,
    checkpoint: bool | str | os.PathLike[str] | None = True,
    cache: bool | str | os.PathLike[str] | None = True,
    resume: bool = True,
    engine: str | Engine = "auto",
    worker: bool | None = None,
    max_conversations: int | None = None,
    stop_grace_s: float = 10.0,
    listeners: Iterable[Callable[[Event], None]] = (),
    **params: Any,
) -> RunResult:
    """Run a dataset of conversations and return one row per turn; see ``run``.

    The engine is made (a local model loaded, seconds) in a worker thread, so the
    caller's loop, a kernel's widgets included, goes on meanwhile.
    """
    config = config_of_call(locals())
    plan = await aprepare_run(data, config, make_view=_blocking_view(config.progress))
    return _with_gpu_samples(await plan.execute(), plan.view)


def run(
    data: Any,
    *,
    model: str | None = None,
    api_base: str | None = None,
    api_key: str | None = None,
    concurrency: int = 32,
    rpm: float | None = None,
    tpm: float | None = None,
    timeout: float | None = 120.0,
    retries: int | RetryPolicy = 5,
    system: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    progress: bool | None = None,
    checkpoint: bool | str | os.PathLike[str] | None = True,
    cache: bool | str | os.PathLike[str] | None = True,
    resume: bool = True,
    engine: str | Engine = "auto",
    worker: bool | None = None,
    max_conversations: int | None = None,
    stop_grace_s: float = 10.0,
    listeners: Iterable[Callable[[Event], None]] = (),
    **params: Any,
) -> RunResult:
    """Run a dataset of (multi-turn) conversations in parallel; return a ``RunResult``.

    ``data``: a long or wide DataFrame, a list of ``{"id", "turns", ...}`` records, a
    JSONL path, or ``Conversation`` objects (see ``nbllm.dataset``). Options:
    ``model`` (any litellm model string), ``api_base`` / ``api_key`` (any
    OpenAI-compatible server), ``concurrency`` (requests in flight), ``rpm`` / ``tpm``
    (per-minute budgets), ``timeout`` (seconds per attempt), ``retries`` (an int or a
    ``RetryPolicy``), ``system`` (default system prompt), ``max_tokens``,
    ``temperature``, ``progress`` (the dashboard in a notebook, a text bar in a
    terminal; default: when interactive), ``engine`` ("auto", "openai", "litellm", a
    local engine — "vllm", "deepspeed", "onnx", "torch", "llamacpp" — or an ``Engine``),
    ``worker`` (run a local engine in a child process; default: on a CUDA GPU),
    ``max_conversations``, ``stop_grace_s`` (after a first Ctrl-C, seconds the requests
    in flight may take to finish; a second Ctrl-C cancels them), ``listeners``
    (callables receiving executor events).
    ``nbllm.RunConfig`` describes each option and checks it.

    Without ``model`` and ``api_base``, the embedded SmolLM2-135M-Instruct answers on
    this machine; ``model`` may also be a Hugging Face model directory or a GGUF file.

    ``checkpoint`` (default True: ``.nbllm/runs/<id>/``; a path; False): every answered
    turn is committed to SQLite within a quarter of a second, and re-running the same
    call sends no request for a finished turn (``resumed`` rows); ``resume=False``
    starts over. ``cache`` (default True: ``.nbllm/cache.sqlite``; a path; "always";
    False): identical requests are answered from earlier runs (``cached`` rows), except
    those with a non-zero ``temperature`` unless ``cache="always"``.

    Any other keyword is passed to the engine as a sampling parameter (``top_p=0.9``,
    ``seed=1``, ...).
    """
    config = config_of_call(locals())
    plan = prepare_run(data, config, make_view=_blocking_view(config.progress))
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _with_gpu_samples(asyncio.run(_execute_stopping_on_ctrl_c(plan)), plan.view)
    return _with_gpu_samples(_run_beside_running_loop(plan), plan.view)


def _press(plan: PreparedRun) -> None:
    """A Ctrl-C or kernel interrupt: a press of the run's Stop, said on stderr where no
    progress view says it."""
    plan.stop()
    presses = plan.stop.presses
    if plan.view is not None or presses > 2:
        return
    if presses == 1:
        grace = f"{plan.config.stop_grace_s:g}"
        text = f"those in flight may finish (up to {grace} s); interrupt again to cancel them"
        print(f"nbllm: stopping: no new requests; {text}", file=sys.stderr, flush=True)
    else:
        print("nbllm: stopping: cancelling the requests in flight", file=sys.stderr, flush=True)


async def _execute_stopping_on_ctrl_c(plan: PreparedRun) -> RunResult:
    """``plan.execute()`` where Ctrl-C stops the batch (which then returns what finished):
    the first lets the requests in flight finish, a second cancels them."""
    loop = asyncio.get_running_loop()
    previous = None
    if threading.current_thread() is threading.main_thread():
        # Through the loop: a signal handler must not take the lock the loop may hold.
        previous = signal.signal(signal.SIGINT, lambda *_: loop.call_soon_threadsafe(_press, plan))
    try:
        return await plan.execute()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _run_beside_running_loop(plan: PreparedRun) -> RunResult:
    """Run in a ``RunThread`` while the caller's loop (a kernel's) waits."""
    runner = RunThread(plan.execute, name="nbllm-run", stop=plan.stop)
    plan.listeners.append(runner.listener)
    # While the batch runs, Ctrl-C (or a kernel interrupt) stops the batch rather than
    # whatever the caller's loop would do with it; the previous handler comes back after.
    previous = None
    if threading.current_thread() is threading.main_thread():
        with contextlib.suppress(ValueError):
            previous = signal.signal(
                signal.SIGINT, lambda *_: None if runner.listener.seen else _press(plan)
            )
    try:
        runner.start()
        try:
            runner.wait()
        except KeyboardInterrupt:
            runner.stop()
            runner.wait()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    runner.thread.join()
    return runner.outcome()
