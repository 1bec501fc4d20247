"""A worker: ``nbllm serve`` in a child process, and an engine that talks to it.

::

    with Worker("torch", "models/Qwen2.5-0.5B-Instruct", options=["--batch-size", "16"]) as worker:
        result = nbllm.run(data, model=worker.model, engine=worker.engine())

The model lives in its own process (its own GPU context, its own crash), behind the same
OpenAI-compatible HTTP API that vLLM serves; ``worker.engine()`` is the lean HTTP client
(``ServeEngine``, an ``OpenAIEngine``) pointed at it. ``start()`` returns once the model
is loaded.

A request's ``timeout`` means what it means in process (``ServeEngine``): the worker's
engine applies it, a local model to the wait for a batch slot only, and nothing sets a
deadline on an answer that is being generated. A request given up (a stopped run) closes
its connection, and the server then cancels its generation (a local model cuts it at its
next token), so that a retry never queues behind it.

The child does not outlive this process. ``stop()`` (and, at exit, ``stop_all_workers``)
stops it with a drain. Where this process ends without either (a SIGKILL, ``os._exit``, a
crash), the child sees its parent go (``--parent-pid``, ``--stop-on-stdin-eof``): at once
through its stdin, and on Linux through a parent-death signal, else within a second. It
then cuts off what was in flight, closes its engine and exits, forced out after
``nbllm.serve.command.PARENT_GONE_EXIT_S`` (5 s) if its engine does not let go.
"""

from __future__ import annotations

import asyncio
import atexit
import enum
import json
import secrets
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import aiohttp

from nbllm.engines.child_process import ServerProcess
from nbllm.engines.local.models import EMBEDDED_MODEL
from nbllm.engines.openai import OpenAIEngine
from nbllm.engines.openai_wire import SERVE_API_KEY_ENV, SERVE_URL_LINE_PREFIX, TIMEOUT_HEADER
from nbllm.errors import ConfigError, EngineUnavailable
from nbllm.types import ChatRequest

__all__ = [
    "ServeEngine",
    "Worker",
    "WorkerEngine",
    "WorkerState",
    "local_option_args",
    "shared_worker",
    "stop_all_workers",
]

_POLL_S = 0.15
_STDERR_TAIL_CHARS = 2000
# Options the worker sets itself: where it listens, the key (never on a command line), and
# the parent whose end stops the child.
_RESERVED_OPTIONS = ("--host", "--port", "--api-key", "--parent-pid")
#: Seconds a ``ServeEngine`` waits for a connection to its server (the one deadline it sets).
CONNECT_TIMEOUT_S = 10.0
# urllib would send even 127.0.0.1 through $http_proxy.
_LOCAL_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class WorkerState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


def _get_json(
    url: str, timeout: float = 2.0, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """GET ``url``: its status and JSON body ({} when the body is not a JSON object)."""
    try:
        request = urllib.request.Request(url, headers=headers or {})
        with _LOCAL_OPENER.open(request, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        with err:
            status, raw = err.code, err.read()
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    return status, body if isinstance(body, dict) else {}


class Worker:
    """Runs ``python -m nbllm serve`` on 127.0.0.1 (a free port) in a child process.

    ``engine`` and ``model`` are ``nbllm serve``'s ``--engine`` and ``--model`` (no model:
    a local engine's embedded one); ``options`` are more of its arguments, passed as given
    (e.g. ``["--batch-size", "8"]``). The server requires ``api_key`` (default: a random
    one), which reaches the child through the environment, never its command line;
    ``engine()`` sends it. ``start_timeout`` bounds the wait for the server to listen,
    ``load_timeout`` the wait for the model to load. ``env`` adds to the child's environment
    (``CUDA_VISIBLE_DEVICES`` to pin it to a GPU, ``OMP_NUM_THREADS`` to share a CPU).

    Use as ``with Worker(...) as worker:`` (or ``async with``), or ``start()`` / ``stop()``.
    """

    def __init__(
        self,
        engine: str = "auto",
        model: str | None = None,
        *,
        options: Sequence[str] = (),
        api_key: str | None = None,
        start_timeout: float = 60.0,
        load_timeout: float = 600.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        reserved = [o for o in options if o.split("=", 1)[0] in _RESERVED_OPTIONS]
        if reserved:
            msg = (
                f"Worker options may not set {', '.join(reserved)}: the worker listens on "
                "127.0.0.1 on a free port, takes the key as api_key=, and stops with the "
                "process that started it"
            )
            raise ConfigError(msg)
        self.engine_name = engine
        self._model_option = model
        #: The model name to put in requests (the worker answers any name).
        self.model = model or ("fake" if engine == "fake" else EMBEDDED_MODEL)
        self.options = tuple(options)
        self.start_timeout = start_timeout
        self.load_timeout = load_timeout
        # Without a key of the caller's, a random one: other users of this machine can reach
        # 127.0.0.1 too, and must not use (or stop) this process's model.
        self._api_key = api_key or secrets.token_urlsafe(32)
        self.state = WorkerState.NEW
        #: The engine the worker loaded (what ``auto`` chose there), once it is ready.
        self.served_engine: str | None = None
        #: How many requests the worker's engine takes at once (what more would only queue).
        self.max_in_flight: int | None = None
        self._url: str | None = None
        self._server = ServerProcess(
            self.command,
            url_prefix=SERVE_URL_LINE_PREFIX,
            name="nbllm serve",
            env={**(env or {}), SERVE_API_KEY_ENV: self._api_key},
            parent_pid_option="--parent-pid",
        )

    def __repr__(self) -> str:  # no api_key
        where = f" {self._url}" if self._url else ""
        return f"<Worker {self.engine_name} {self.model!r} {self.state.value}{where}>"

    @property
    def command(self) -> list[str]:
        """The child's command line (it holds no secret).

        ``start()`` adds ``--parent-pid`` and the pid of the process that starts it.
        """
        args = ["--engine", self.engine_name]
        if self._model_option is not None:
            args += ["--model", self._model_option]
        args += ["--host", "127.0.0.1", "--port", "0", "--stop-on-stdin-eof", *self.options]
        return [sys.executable, "-m", "nbllm", "serve", *args]

    @property
    def url(self) -> str:
        """The server's ``/v1`` base URL."""
        if self._url is None or self.state is not WorkerState.RUNNING:
            msg = f"the worker is {self.state.value}: no URL; call start() first"
            raise RuntimeError(msg)
        return self._url

    @property
    def running(self) -> bool:
        """Started, not stopped, and the child has not exited."""
        server = self._server
        return (
            self.state is WorkerState.RUNNING
            and server.process is not None
            and server.returncode is None
        )

    @property
    def pid(self) -> int | None:
        return self._server.pid

    def engine(self, **kwargs: Any) -> WorkerEngine:
        """A ``ServeEngine`` that sends to this worker (kwargs: e.g. ``max_connections``)."""
        return WorkerEngine(self, **kwargs)

    # ----------------------------------------------------------------- lifecycle

    def start(self, *, wait: bool = True) -> Worker:
        """Start the child and return once its model is loaded; raises ``EngineUnavailable``.

        ``wait=False`` returns as soon as the server listens (``url`` is then known), so that
        several workers can load at once; ``wait_ready()`` then waits for the load.
        """
        if self.state is not WorkerState.NEW:
            msg = f"the worker is {self.state.value}; create a new Worker to start another"
            raise RuntimeError(msg)
        self.state = WorkerState.RUNNING
        _started.add(self)
        try:
            self._url = self._server.start(self.start_timeout)
        except BaseException:
            self.stop()
            raise
        return self.wait_ready() if wait else self

    def wait_ready(self) -> Worker:
        """Return once the model is loaded; if it cannot load, stop the child and say why."""
        try:
            self._poll_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _poll_ready(self) -> None:
        """Poll ``/ready`` until the model is loaded, its load failed, or the child exits."""
        ready_url = self.url.removesuffix("/v1") + "/ready"
        deadline = time.monotonic() + self.load_timeout
        while True:
            code = self._server.returncode
            if code is not None:
                msg = f"nbllm serve exited with code {code} while loading"
                raise EngineUnavailable(self._server.with_stderr(msg))
            try:
                # With the key, /ready says why a load failed.
                auth = {"Authorization": f"Bearer {self._api_key}"}
                status, body = _get_json(ready_url, headers=auth)
            except OSError:  # not answering yet, or busy: ask again
                status, body = 0, {}
            if status == 200:
                self.served_engine = str(body.get("engine") or self.engine_name)
                limit = body.get("max_in_flight")
                self.max_in_flight = limit if isinstance(limit, int) and limit > 0 else None
                return
            if body.get("status") == "failed":
                error = body.get("error")
                msg = f"the {self.engine_name} engine could not load {self.model}: {error}"
                raise EngineUnavailable(msg)
            if time.monotonic() > deadline:
                msg = f"the {self.engine_name} engine did not load within {self.load_timeout:g} s"
                raise EngineUnavailable(self._server.with_stderr(msg))
            time.sleep(_POLL_S)

    def stderr_tail(self) -> str:
        """The end of what the child wrote to stderr (its logs)."""
        return self._server.stderr_text(_STDERR_TAIL_CHARS)

    def stop(self, timeout: float = 35.0) -> int | None:
        """Stop the child: SIGTERM, then SIGKILL after ``timeout`` s. Idempotent.

        On SIGTERM the server drains (by default for up to 30 s); a second SIGTERM cuts the
        drain short. Returns the child's exit code (None if it never started).
        """
        if self.state is not WorkerState.STOPPED:
            self.state = WorkerState.STOPPED
            _started.discard(self)
        return self._server.stop(timeout)

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Worker:
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)


class ServeEngine(OpenAIEngine):
    """The lean HTTP client for ``nbllm serve``, whose engine applies ``request.timeout``.

    The timeout travels in the ``X-Nbllm-Timeout`` header and becomes the served engine's
    ``ChatRequest.timeout``, applied there as in process: a local model bounds the wait for
    a batch slot with it, never a generation that is making progress (the fake engine
    applies none). A request that waited too long comes back 504 and is a
    ``RequestTimeout`` here, which the executor retries. The executor sets no timer of its
    own around this engine (``bounds_own_timeout``), and the HTTP client bounds only the
    connection (``CONNECT_TIMEOUT_S``). A request given up (a stopped run) closes its
    connection, on which the server cancels the engine's work on it.
    """

    bounds_own_timeout = True

    def _client_timeout(self, request: ChatRequest) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S)

    def _timeout_headers(self, request: ChatRequest) -> dict[str, str]:
        if request.timeout is None:
            return {}
        return {TIMEOUT_HEADER: repr(float(request.timeout))}


class WorkerEngine(ServeEngine):
    """The lean HTTP client pointed at a worker (``ServeEngine``).

    Rows name the worker's engine (``"torch worker"``), and a run's fingerprint names the
    engine and model rather than the port, which changes with every worker started, so a
    run resumes with a new worker too.
    """

    def __init__(self, worker: Worker, **kwargs: Any) -> None:
        super().__init__(worker.url, api_key=worker._api_key, **kwargs)
        served = worker.served_engine or worker.engine_name
        self.name = f"{served} worker"
        self.max_in_flight = worker.max_in_flight
        self.default_model = str(worker.model)
        self._identity = " ".join(["worker", served, str(worker.model), *worker.options])

    def identity(self) -> str:
        return self._identity


# --------------------------------------------------------------------- workers of the process

# Every worker started and not yet stopped. Strong references: a worker whose process runs
# is never dropped unstopped, whether or not its caller still holds it.
_started: set[Worker] = set()
_shared: dict[tuple[str, str | None, tuple[str, ...]], Worker] = {}
_shared_lock = threading.Lock()


def local_option_args(
    *,
    batch_size: int | None = None,
    batch_wait_s: float | None = None,
    device: str | None = None,
    prefix_cache: bool = True,
    prefix_cache_bytes: int | None = None,
) -> list[str]:
    """``nbllm serve`` arguments for a local engine's keyword options."""
    args: list[str] = []
    if not prefix_cache:
        args.append("--no-prefix-cache")
    if prefix_cache_bytes is not None:
        args += ["--prefix-cache-bytes", str(prefix_cache_bytes)]
    if batch_size is not None:
        args += ["--batch-size", str(batch_size)]
    if batch_wait_s is not None:
        args += ["--batch-wait-ms", f"{batch_wait_s * 1000:g}"]
    if device is not None:
        args += ["--device", device]
    return args


def shared_worker(engine: str, model: str | None, **local_options: Any) -> Worker:
    """A started worker for this engine, model and options, shared within the process.

    The first call starts it and waits for the model to load; later calls with the same
    arguments get the same worker while it runs. ``local_options``: ``batch_size``,
    ``batch_wait_s``, ``device``, ``prefix_cache``, ``prefix_cache_bytes``. Every worker is
    stopped when the interpreter exits.
    """
    try:
        options = tuple(local_option_args(**local_options))
    except TypeError as exc:
        msg = (
            "a local engine takes batch_size, batch_wait_s, device, prefix_cache and "
            f"prefix_cache_bytes, got {local_options!r}"
        )
        raise ConfigError(msg) from exc
    key = (engine, model, options)
    with _shared_lock:
        worker = _shared.get(key)
        if worker is None or not worker.running:
            worker = Worker(engine, model, options=options).start()
            _shared[key] = worker
        return worker


@atexit.register
def stop_all_workers() -> None:
    """Stop every worker this process started (no model process outlives its user)."""
    with _shared_lock:
        _shared.clear()
    for worker in list(_started):
        worker.stop()
