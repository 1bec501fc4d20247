"""``nbllm.run`` and ``nbllm.arun``: the public way in.

``run`` blocks until the batch is done and works everywhere: in a plain script it
drives its own event loop; where a loop is already running (a Jupyter kernel) it runs
the batch on a private loop in a worker thread, so there is never an "event loop is
already running" error. Ctrl-C (or the kernel's interrupt) stops the batch and returns
what finished: the first lets the requests in flight finish (up to ``stop_grace_s``), a
second cancels them; every answer that arrived is kept and checkpointed. ``arun`` is the
same as a coroutine, for ``await``; cancelling its task cancels the requests in flight
at once (their answers never arrived), keeping the rest.

Each builds one ``RunConfig`` from its options; ``nbllm.prepare.prepare_run`` (``aprepare_run`` for
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
from collections.abc import Callable, Iterable
from typing import Any, Literal

from nbllm.engines import (
    Engine,
)
from nbllm.executor import Event
from nbllm.prepare import (
    CheckedRun,
    Listener,
    MakeView,
    PreparedRun,
    RunStop,
    aprepare_run,
    check_run,
    open_run,
    prepare_run,
)
from nbllm.results import RunResult
from nbllm.retry import RetryPolicy
from nbllm.run_thread import RunThread
from nbllm.settings import resolve_call

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
) -> RunResult:
    """Run a dataset of conversations and return one row per turn; see ``run``.

    The engine is made (a local model loaded, seconds) in a worker thread, so the
    caller's loop, a kernel's widgets included, goes on meanwhile.
    """
    config = resolve_call(locals())
    plan = await aprepare_run(data, config, make_view=_blocking_view(config.progress))
    return _with_gpu_samples(await plan.execute(), plan.view)


def run(
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
) -> RunResult:
    """Run a dataset of (multi-turn) conversations in parallel; return a ``RunResult``.

    ``data``: a long or wide DataFrame, a list of ``{"id", "turns", ...}`` records, a
    JSONL path, or ``Conversation`` objects (see ``nbllm.dataset``). Options:
    ``model`` (any litellm model string), ``api_base`` / ``api_key`` (any
    OpenAI-compatible server), ``concurrency`` (requests in flight), ``rpm`` / ``tpm``
    (per-minute budgets; "auto" finds them while running, up to ``max_rpm`` /
    ``max_tpm``), ``timeout`` (seconds per attempt), ``retries`` (an int or a
    ``RetryPolicy``), ``system`` (default system prompt), ``max_tokens``,
    ``temperature``, ``progress`` (the dashboard in a notebook, a text bar in a
    terminal; default: when interactive), ``engine`` ("auto", "openai", "litellm", a
    local engine — "vllm", "deepspeed", "onnx", "torch", "llamacpp" — or an ``Engine``),
    ``worker`` (run a local engine in a child process; default: on a CUDA GPU),
    ``replicas`` (copies of a local model in worker processes, one per GPU with "auto";
    ``allow_oversubscribe=True`` lets them outnumber the GPUs; ``cluster="ray"`` or
    ``ray_address`` makes them Ray actors across a cluster), ``prefix_cache`` /
    ``prefix_cache_bytes`` (a local engine reuses the keys and values of
    the beginnings its prompts share with recent ones, the conversation's earlier turns or a
    common document, within that many bytes; rows show ``cached_tokens``),
    ``max_conversations``, ``stop_grace_s`` (after a first Ctrl-C, seconds the requests
    in flight may take to finish; a second Ctrl-C cancels them), ``redis_url`` (share
    the ``rpm``/``tpm`` budgets with every process using this Redis against the same
    deployment; default ``$NBLLM_REDIS_URL``), ``max_cost_usd`` /
    ``max_tokens_total`` (hard caps: no new request once reached; the run's
    ``stop_reason`` says which) with ``cost_per_1k_tokens`` (a price for answers whose
    engine gives no cost), ``listeners`` (callables receiving executor events).
    ``nbllm.RunConfig`` describes each option and checks it.

    Batch APIs: ``batch_api=True`` sends the run through the provider's batch API
    (OpenAI's files and batches for ``openai/...`` and any ``api_base`` serving them,
    Anthropic's Message Batches for ``anthropic/...``) at about half the price, answered
    within the provider's window (up to 24 h). Every conversation's ready turn goes in one
    batch; when a batch ends, the conversations it answered go on at once into the next
    (``max_batches`` in flight, ``batch_max_requests`` per batch, polled every
    ``batch_poll_s``). Batch ids go into the checkpoint as they are created: the same call
    run again, after a kill or the next morning, re-attaches instead of creating them
    again (``nbllm.runs.resume(id)`` picks a run up from its id). A line a batch failed or
    left unanswered is sent again in a later batch, or live with
    ``batch_fallback="live"``. Rows cost the batch price; ``summary.saved_usd`` is the
    saving. A blocking call lasts as long as the batches: ``nbllm.submit`` runs it in the
    background, and its ``stop()`` cancels the batches in flight.

    Many endpoints: ``router`` takes a deployment list in litellm's ``model_list`` format
    (a list, or a YAML file such as litellm proxy's ``config.yaml``) and ``model`` names
    one of its groups (``model_name``). Each request goes to one deployment of the group
    (``routing``: "simple-shuffle", "least-busy", "latency-based", "usage-based"), each
    deployment with its own limits, slots and circuit breaker (``allowed_fails``
    consecutive failures open it for ``cooldown_s``); ``fallbacks`` name the groups to try
    while a group is down. The ``deployment`` column says who answered each turn, and
    ``result.summary.deployments`` gives each deployment's figures.

    Several models: ``model=["a", "b"]`` asks every conversation of each model, each with
    its own history: one row per (conversation, model, turn), and ``result.compare()``
    lays them side by side. ``ensemble="first"`` sends each turn to every model and keeps
    the first valid answer (the others are cancelled; ``result.summary.ensemble`` shows
    the latency gained), ``ensemble="vote"`` the answer most models gave (``votes``).
    ``concurrency``, the limits, retries and breakers apply to each model as to one.

    Without ``model`` and ``api_base``, the embedded SmolLM2-135M-Instruct answers on
    this machine; ``model`` may also be a Hugging Face model directory or a GGUF file.

    ``checkpoint`` (default True: ``.nbllm/runs/<id>/``; a path; False): every answered
    turn is committed to SQLite as it comes (group commit: at most 5 answered turns are
    ever uncommitted), and re-running the same call sends no request for a finished turn
    (``resumed`` rows); ``resume=False`` starts over. ``cache`` (default True:
    ``.nbllm/cache.sqlite``; a path; "always"; False): identical requests to the same
    engine and server are answered from earlier runs (``cached`` rows), except those
    with a non-zero ``temperature`` unless ``cache="always"``.

    Any other keyword is passed to the engine as a sampling parameter (``top_p=0.9``,
    ``seed=1``, ...).
    """
    config = resolve_call(locals())
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
