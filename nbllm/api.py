"""``nbllm.run`` and ``nbllm.arun``: the public way in.

``run`` blocks until the batch is done and works everywhere: in a plain script it
drives its own event loop; where a loop is already running (a Jupyter kernel) it runs
the batch on a private loop in a worker thread, so there is never an "event loop is
already running" error. Ctrl-C (or the kernel's interrupt) stops the batch cleanly
and returns what finished. ``arun`` is the same as a coroutine, for ``await``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sys
import threading
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from nbllm.config import RunConfig
from nbllm.dataset import load_conversations
from nbllm.engines import EMBEDDED_MODEL, Engine, create_engine, is_local
from nbllm.errors import ConfigError
from nbllm.executor import Event, Executor
from nbllm.executor.cache import ResponseCache, resolve_cache_path
from nbllm.executor.checkpoint import (
    CheckpointStore,
    RunIdentity,
    dataset_hash,
    resolve_checkpoint_path,
)
from nbllm.results import RunResult
from nbllm.types import Conversation

__all__ = ["PreparedRun", "arun", "prepare_run", "progress_listener", "run"]


def _api_key_for(engine: Any, api_base: str | None, api_key: str | None) -> str | None:
    """The key for a server given by ``api_base`` when ``api_key=`` is not given.

    ``OPENAI_API_KEY`` is only ever sent to OpenAI's own host, never to another server;
    ``NBLLM_API_KEY`` is for any other server. Without ``api_base``, litellm reads its
    usual variables itself.
    """
    if api_key is not None or api_base is None or isinstance(engine, Engine):
        return api_key
    host = urllib.parse.urlsplit(api_base).hostname or ""
    if host == "api.openai.com":
        return os.environ.get("OPENAI_API_KEY")
    return os.environ.get("NBLLM_API_KEY")


def _in_notebook() -> bool:
    """Whether this code runs in a Jupyter kernel (where widgets can be shown)."""
    if "IPython" not in sys.modules:
        return False
    from IPython import get_ipython

    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def progress_listener(
    progress: Any, *, stop: Callable[[], None] | None = None
) -> Callable[[Event], None] | None:
    """The live progress for ``progress=``: the dashboard in a notebook, tqdm in a terminal.

    Call it in the thread that runs the cell, so the dashboard lands in that cell's output.
    ``None`` means: in a notebook or a terminal, not when output goes to a file or a pipe.
    ``stop`` gives the dashboard a Stop button (only useful where the kernel is free to
    handle the click, i.e. for a run in the background).
    """
    if progress is False or not isinstance(progress, (bool, type(None))):
        return None  # a bad value is reported by RunConfig
    if _in_notebook():
        try:
            from nbllm.ui.dashboard import Dashboard
        except ImportError:  # ipywidgets missing: text it is
            pass
        else:
            from IPython.display import display

            dashboard = Dashboard(stop=stop)
            display(dashboard)
            return dashboard
    if progress is None and not sys.stderr.isatty():
        return None
    from nbllm.ui.progress import TextProgress

    return TextProgress()


@dataclass
class PreparedRun:
    """A validated run, ready to execute: data loaded, engine chosen, checkpoint opened.

    Made by ``prepare_run`` (all checks happen there, before any request); ``execute``
    runs it once and releases the engine, the checkpoint and the cache.
    """

    config: RunConfig
    conversations: list[Conversation]
    engine: Engine
    owns_engine: bool
    listeners: list[Callable[[Event], None]]
    store: CheckpointStore | None = None
    cache: ResponseCache | None = None

    @property
    def turns(self) -> int:
        return sum(len(c) for c in self.conversations)

    async def execute(self) -> RunResult:
        executor = Executor(
            self.engine,
            model=self.config.model,
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
        )
        try:
            return await executor.run(self.conversations)
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
    *,
    model: str | None = None,
    api_base: str | None = None,
    api_key: str | None = None,
    concurrency: int = 32,
    rpm: float | None = None,
    tpm: float | None = None,
    timeout: float | None = 120.0,
    retries: Any = 5,
    system: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    progress: bool | None = None,
    checkpoint: Any = True,
    cache: Any = True,
    resume: bool = True,
    engine: str | Engine = "auto",
    worker: bool | None = None,
    max_conversations: int | None = None,
    listeners: Iterable[Callable[[Event], None]] = (),
    **params: Any,
) -> PreparedRun:
    """Check every option and the data, choose the engine, open the checkpoint.

    Raises ``ConfigError`` / ``DatasetError`` / ``CheckpointError`` before any request.
    ``progress`` is checked here but no progress is attached: see ``progress_listener``.
    """
    if model is None:
        if isinstance(engine, Engine):
            model = engine.default_model or engine.name
        elif is_local(engine, model, api_base):
            model = EMBEDDED_MODEL
        else:
            msg = (
                "model= is required with api_base= or a provider: a litellm model string such "
                "as 'openai/gpt-4o-mini', or the model name a server at api_base= serves"
            )
            raise ConfigError(msg)
    config = RunConfig(
        model=model,
        api_base=api_base,
        api_key=api_key,
        concurrency=concurrency,
        max_conversations=max_conversations,
        rpm=rpm,
        tpm=tpm,
        timeout=timeout,
        retries=retries,
        system=system,
        max_tokens=max_tokens,
        temperature=temperature,
        progress=progress,
        params=params,
    )
    if not isinstance(resume, bool):
        msg = f"resume= expected True or False, got {resume!r}"
        raise ConfigError(msg)
    cache_path = resolve_cache_path(cache)
    conversations = load_conversations(data)
    chosen = create_engine(
        engine,
        model=config.model,
        api_base=config.api_base,
        api_key=_api_key_for(engine, config.api_base, config.api_key),
        max_connections=max(config.concurrency, 8),
        worker=worker,
    )
    if chosen.max_in_flight is not None and chosen.max_in_flight < config.concurrency:
        # More would only queue inside the engine, where their timeouts would run out.
        config = dataclasses.replace(config, concurrency=chosen.max_in_flight)
    plan = PreparedRun(config, conversations, chosen, chosen is not engine, list(listeners))
    try:
        if checkpoint is not False and checkpoint is not None:
            identity = RunIdentity(
                dataset=dataset_hash(conversations),
                model=config.model,
                engine=chosen.identity(),
                params=config.sampling_params,
                system=config.system,
            )
            path = resolve_checkpoint_path(checkpoint, identity.fingerprint)
            if path is not None:
                plan.store = CheckpointStore.open(
                    path,
                    identity,
                    conversations=len(conversations),
                    turns=plan.turns,
                    resume=resume,
                )
        if cache_path is not None:
            plan.cache = ResponseCache(cache_path, reuse_sampled=cache == "always")
    except BaseException:
        plan.release()
        raise
    return plan


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
    retries: Any = 5,
    system: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    progress: bool | None = None,
    checkpoint: Any = True,
    cache: Any = True,
    resume: bool = True,
    engine: str | Engine = "auto",
    worker: bool | None = None,
    max_conversations: int | None = None,
    listeners: Iterable[Callable[[Event], None]] = (),
    **params: Any,
) -> RunResult:
    """Run a dataset of conversations and return one row per turn; see ``run``."""
    options = dict(locals())
    del options["data"], options["params"]
    options.update(params)
    plan = prepare_run(data, **options)
    bar = progress_listener(progress)
    if bar is not None:
        plan.listeners.append(bar)
    return _with_gpu_samples(await plan.execute(), bar)


def _with_gpu_samples(result: RunResult, bar: Any) -> RunResult:
    """Hand the GPU readings the dashboard took during the run to the result's plots."""
    monitor = getattr(bar, "gpu_monitor", None)
    if monitor is not None:
        result.gpu_samples = [s for device in monitor.history() for s in device]
    return result


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
    retries: Any = 5,
    system: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    progress: bool | None = None,
    checkpoint: Any = True,
    cache: Any = True,
    resume: bool = True,
    engine: str | Engine = "auto",
    worker: bool | None = None,
    max_conversations: int | None = None,
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
    ``temperature``, ``progress`` (a text bar; default: when interactive),
    ``engine`` ("auto", "openai", "litellm", a local engine — "vllm", "deepspeed",
    "onnx", "torch" — or an ``Engine``), ``worker`` (run a local engine in a child
    process; default: on a CUDA GPU), ``max_conversations``, ``listeners`` (callables
    receiving executor events).

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
    options = dict(locals())
    del options["data"], options["params"]
    options.update(params)
    plan = prepare_run(data, **options)
    bar = progress_listener(progress)
    if bar is not None:
        plan.listeners.append(bar)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _with_gpu_samples(asyncio.run(_execute_stopping_on_ctrl_c(plan)), bar)
    return _with_gpu_samples(_run_beside_running_loop(plan), bar)


async def _execute_stopping_on_ctrl_c(plan: PreparedRun) -> RunResult:
    """``plan.execute()`` where Ctrl-C cancels the batch (which then returns what finished)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    previous = None
    if task is not None and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, lambda *_: loop.call_soon_threadsafe(task.cancel))
    try:
        return await plan.execute()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _run_beside_running_loop(plan: PreparedRun) -> RunResult:
    """Run on a private loop in a worker thread while the caller's loop (a kernel's) waits."""
    box: dict[str, Any] = {}
    stop_requested = threading.Event()
    done = threading.Event()

    def stop_batch(*_: Any) -> None:
        stop_requested.set()
        loop, task = box.get("loop"), box.get("task")
        if loop is not None and task is not None and not loop.is_closed():
            loop.call_soon_threadsafe(task.cancel)

    def target() -> None:
        async def main() -> RunResult:
            box["loop"] = asyncio.get_running_loop()
            box["task"] = task = asyncio.current_task()
            if stop_requested.is_set() and task is not None:
                task.cancel()  # Ctrl-C came before this task existed
            return await plan.execute()

        try:
            box["result"] = asyncio.run(main())
        except BaseException as exc:
            box["error"] = exc
        finally:
            done.set()

    # While the batch runs, Ctrl-C (or a kernel interrupt) stops the batch rather than
    # whatever the caller's loop would do with it; the previous handler comes back after.
    previous = None
    if threading.current_thread() is threading.main_thread():
        try:
            previous = signal.signal(signal.SIGINT, stop_batch)
        except ValueError:
            previous = None
    thread = threading.Thread(target=target, name="nbllm-run", daemon=True)
    try:
        thread.start()
        try:
            done.wait()
        except KeyboardInterrupt:
            stop_batch()
            done.wait()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]
