"""Background runs: ``nbllm.submit`` starts a batch and hands back a ``Job`` while it runs.

::

    job = nbllm.submit(df, model="openai/gpt-4o-mini", concurrency=64)
    job             # <Job 1 running: 120/400 turns, 12.3 s, model 'openai/gpt-4o-mini'>
    nbllm.jobs()    # every job of this process, most recent first
    job.result()    # blocks until the end; job.stop() ends it early, keeping what finished

``submit`` checks the options and loads the data in the calling cell, so bad input
raises there; for a server or a provider it also makes the engine and opens the checkpoint
there (``nbllm.api.prepare_run``, as ``nbllm.run`` does). Then the run goes on, on its own
event loop in a daemon thread named ``nbllm-job-<id>`` (a ``nbllm.run_thread.RunThread``),
and the kernel stays free for other cells. A local model is loaded in that thread instead
(seconds; minutes for a first conversion), with the dashboard saying so: a model that
cannot load, or a checkpoint that cannot be opened then, makes the job ``"failed"``
(``job.result()`` raises the error) rather than raising in the cell.

In a notebook its dashboard, shown in the calling cell, has a Stop button: the
first press (or ``job.stop()``) sends nothing new and lets the requests in flight finish
(up to ``stop_grace_s``), a second cancels them.

Status: ``"running"``, then ``"done"`` (every turn has its row, answered or failed),
``"stopped"`` (``stop()`` ended it early: the result has ``interrupted=True``; or the run
ended by itself, e.g. nothing could be reached: ``result.stop_reason`` says why) or
``"failed"`` (the run itself raised; ``result()`` raises it again).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from nbllm.api import CheckedRun, PreparedRun, RunStop, check_run, open_run, prepare_run
from nbllm.engines import Engine, is_local
from nbllm.executor.events import Event
from nbllm.executor.stats import RunStats
from nbllm.redact import redact
from nbllm.results import RunResult
from nbllm.retry import RetryPolicy
from nbllm.run_thread import RunThread
from nbllm.settings import resolve_call

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Job", "JobStatus", "jobs", "submit"]

log = logging.getLogger("nbllm")

JobStatus = Literal["running", "done", "failed", "stopped"]
JOB_COLUMNS = ("id", "status", "turns_done", "turns_total", "started", "wall_s", "model")

_ids = itertools.count(1)
_registry: list[Job] = []
_registry_lock = threading.Lock()


class Job:
    """One batch running in the background; made by ``nbllm.submit``.

    ``turns_done`` / ``turns_total`` follow the run's progress; ``started_at`` is a Unix
    time; ``wall_s`` counts seconds from submit to the end (or to now while running).
    """

    def __init__(self, plan: PreparedRun | CheckedRun, stats: RunStats) -> None:
        self.id = next(_ids)
        self.model = plan.model
        self.started_at = time.time()
        self.stats = stats  # the run's one RunStats, fed by a listener of the plan
        self.turns_total = plan.turns
        self._t0 = time.perf_counter()
        self._wall_s: float | None = None
        self._status: JobStatus = "running"
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[Job], Any]] | None = []
        self._finished = threading.Event()  # the status is set and done callbacks have run
        execute = plan.execute if isinstance(plan, PreparedRun) else _opened(plan)
        self._run = RunThread(
            execute, name=f"nbllm-job-{self.id}", settle=self._settle, stop=plan.stop
        )
        self._thread = self._run.thread
        plan.listeners.append(self._run.listener)

    # -- what callers see ------------------------------------------------------------

    @property
    def status(self) -> JobStatus:
        return self._status

    @property
    def turns_done(self) -> int:
        return self.stats.turns_done

    @property
    def wall_s(self) -> float:
        wall = self._wall_s
        return wall if wall is not None else time.perf_counter() - self._t0

    def done(self) -> bool:
        """True once the run has ended, whatever the outcome."""
        return self._status != "running"

    def result(self, timeout: float | None = None) -> RunResult:
        """The run's ``RunResult``, waiting up to ``timeout`` seconds (default: as long as it
        takes); raises ``TimeoutError`` if it is still running then, or the run's own
        exception if it failed."""
        if threading.current_thread() is not self._thread:
            if not self._finished.wait(timeout):
                msg = f"job {self.id} is still running after {timeout} s"
                raise TimeoutError(msg)
        elif self._status == "running":
            msg = f"job {self.id}: result() was called from the job's own run (a listener)"
            raise RuntimeError(msg)
        return self._run.outcome()

    def stop(self, timeout: float | None = None) -> RunResult:
        """Stop the batch and return what finished once it has ended: nothing new is sent,
        the requests in flight finish (up to ``stop_grace_s``; calling ``stop()`` again
        cancels them), every answer that arrived is kept and checkpointed, the turns that
        never ran carry a "not run" error, and the result has ``interrupted=True``. A job
        that has already ended just returns its result."""
        self._run.stop()
        return self.result(timeout)

    def add_done_callback(self, fn: Callable[[Job], Any]) -> None:
        """Call ``fn(job)`` when the run ends, in the job's thread; at once (in this thread)
        if it has ended already. An exception in ``fn`` is logged, not raised."""
        with self._lock:
            if self._callbacks is not None:
                self._callbacks.append(fn)
                return
        self._call(fn)

    def __repr__(self) -> str:
        text = (
            f"<Job {self.id} {self._status}: {self.turns_done}/{self.turns_total} turns, "
            f"{self.wall_s:.1f} s, model {self.model!r}"
        )
        error = self._run.error
        if error is not None:
            text += f", {type(error).__name__}: {redact(str(error))}"
        return text + ">"

    # -- the job's thread ------------------------------------------------------------

    def _settle(self, result: RunResult | None, error: BaseException | None) -> None:
        with self._lock:
            self._wall_s = time.perf_counter() - self._t0
            if error is not None:
                self._status = "failed"
            elif result is not None and (result.interrupted or result.stop_reason):
                self._status = "stopped"
            else:
                self._status = "done"
            callbacks, self._callbacks = self._callbacks or [], None
        for fn in callbacks:
            self._call(fn)
        self._finished.set()

    def _call(self, fn: Callable[[Job], Any]) -> None:
        try:
            fn(self)
        except Exception:
            log.exception("nbllm: done callback %r of job %s failed", fn, self.id)


def _opened(checked: CheckedRun) -> Callable[[], Awaitable[RunResult]]:
    """The run of a job whose model loads in the job's own thread, then runs."""

    async def execute() -> RunResult:
        return await open_run(checked).execute()

    return execute


def submit(
    data: Any,
    *,
    model: str | list[str] | None = None,
    api_base: str | None = None,
    api_key: str | None = None,
    concurrency: int | Literal["auto"] = 32,
    rpm: float | Literal["auto"] | None = None,
    tpm: float | Literal["auto"] | None = None,
    max_rpm: float | None = None,
    max_tpm: float | None = None,
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
    replicas: int | Literal["auto"] | None = None,
    cluster: Literal["ray"] | None = None,
    ray_address: str | None = None,
    allow_oversubscribe: bool = False,
    prefix_cache: bool = True,
    prefix_cache_bytes: int | None = None,
    max_conversations: int | None = None,
    stop_grace_s: float = 10.0,
    redis_url: str | None = None,
    max_cost_usd: float | None = None,
    max_tokens_total: int | None = None,
    cost_per_1k_tokens: float | None = None,
    batch_api: bool = False,
    batch_fallback: Literal["batch", "live"] = "batch",
    max_batches: int = 4,
    batch_max_requests: int | None = None,
    batch_poll_s: float = 30.0,
    router: list[Any] | dict[str, Any] | str | os.PathLike[str] | None = None,
    routing: str | None = None,
    fallbacks: list[Any] | dict[str, Any] | None = None,
    cooldown_s: float | None = None,
    allowed_fails: int | None = None,
    ensemble: Literal["first", "vote"] | None = None,
    response_format: Any = None,
    parse: Any = None,
    parse_retries: int = 2,
    score: Any = None,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    trace_content: bool = False,
    alerts: Any = None,
    on_alert: Callable[[Any], Any] | None = None,
    listeners: Iterable[Callable[[Event], None]] = (),
    **params: Any,
) -> Job:
    """Start a run in the background and return its ``Job`` at once.

    Takes the same options as ``nbllm.run``. Bad options or data raise here, in the
    calling cell, before any request is sent; a local model loads in the job's thread
    (see the module docstring). In a notebook the dashboard has a Stop button.
    """
    config = resolve_call(locals())
    stats = RunStats()

    def make_view(stop: RunStop) -> Callable[[Event], None] | None:
        from nbllm.ui.frontend import progress_listener

        return progress_listener(config.progress, stop=stop, stats=stats)

    # The job's statistics listen first, before the engine is made, so the view (which
    # reads them) shows a local engine's preparation too.
    run: PreparedRun | CheckedRun
    models = config.models or (config.model if isinstance(config.model, str) else None,)
    if any(is_local(config.engine, m, config.api_base) for m in models):
        # The model loads in the job's thread (seconds; minutes for a first conversion),
        # not in the calling cell.
        run = check_run(data, config, listeners=[stats.update], make_view=make_view)
    else:
        run = prepare_run(data, config, listeners=[stats.update], make_view=make_view)
    job = Job(run, stats=stats)
    job._run.start()
    with _registry_lock:
        _registry.append(job)
    return job


def jobs() -> pd.DataFrame:
    """The jobs of this process, most recent first, finished ones included: ``id``,
    ``status``, ``turns_done``, ``turns_total``, ``started`` (local time), ``wall_s``,
    ``model``."""
    import pandas as pd

    with _registry_lock:
        listed = list(reversed(_registry))
    rows = [
        (
            job.id,
            job.status,
            job.turns_done,
            job.turns_total,
            datetime.fromtimestamp(job.started_at),
            job.wall_s,
            job.model,
        )
        for job in listed
    ]
    return pd.DataFrame.from_records(rows, columns=list(JOB_COLUMNS))
