"""``nbllm serve``: one nbllm ``Engine`` behind an OpenAI-compatible HTTP API.

::

    nbllm serve --engine torch --model models/Qwen2.5-0.5B-Instruct --port 8000
    # prints: nbllm serve listening on http://127.0.0.1:8000/v1

Any OpenAI-compatible client (``OpenAIEngine``, the ``openai`` package, another nbllm on
another machine) can then send chat requests to it. Routes:

- ``POST /v1/chat/completions``: one chat completion (no streaming);
- ``GET /v1/models``: the one served model;
- ``GET /health``: 200 while the process is up, also while the model loads;
- ``GET /ready``: 200 once the engine is loaded, 503 while loading, after a failed load
  and while draining.

The engine is loaded in a thread, so the server answers ``/health`` and ``/ready`` from
the first moment. At most ``max_queue`` chat requests are admitted at once; one more gets
429 with ``Retry-After``, never a silent drop. With an API key every ``/v1/`` request
must carry ``Authorization: Bearer KEY``. SIGTERM or SIGINT drains: new requests get 503,
those admitted are answered (for up to ``grace`` seconds), then the engine is closed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import functools
import hmac
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from nbllm.engines import EMBEDDED_MODEL, create_engine
from nbllm.engines.base import Engine
from nbllm.engines.fake import FakeEngine, echo
from nbllm.engines.worker import SERVE_API_KEY_ENV, SERVE_URL_LINE_PREFIX
from nbllm.errors import ConfigError, EngineError, RequestRejected, RetryableError
from nbllm.types import ChatRequest, ChatResponse, Message

__all__ = [
    "API_KEY_ENV",
    "URL_LINE_PREFIX",
    "EngineServer",
    "ServeState",
    "add_parser",
    "main",
]

#: The one line ``nbllm serve`` prints to stdout starts with this, then the ``/v1`` URL.
URL_LINE_PREFIX = SERVE_URL_LINE_PREFIX
#: The environment variable that holds the server's API key (safer than ``--api-key``).
API_KEY_ENV = SERVE_API_KEY_ENV

_log = logging.getLogger("nbllm.serve")

EngineSource = Engine | Callable[[], Engine]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Sampling parameters passed on to the engine, with the JSON types each may have.
_SAMPLING_PARAMS: Mapping[str, tuple[type, ...]] = {
    "max_tokens": (int,),
    "temperature": (int, float),
    "top_p": (int, float),
    "seed": (int,),
    "stop": (str, list),
    "presence_penalty": (int, float),
    "frequency_penalty": (int, float),
}
_RETRY_AFTER_S = 1
# aiohttp's default of 1 MiB is less than one long conversation with a large context.
_MAX_BODY_BYTES = 64 * 1024 * 1024
# By then every admitted request is answered or past its grace: this bounds writing out.
_CLEANUP_TIMEOUT_S = 1.0


class ServeState(enum.Enum):
    NEW = "new"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    DRAINING = "draining"
    CLOSED = "closed"


class _BadRequest(Exception):
    """The request body is not a chat completion request this server can answer (400)."""


# --------------------------------------------------------------------- answers


def _error(
    status: int,
    message: str,
    type_: str,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """An OpenAI-shaped error, which OpenAI clients turn into their typed exceptions."""
    body = {"error": {"message": message, "type": type_, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def _error_type(status: int) -> str:
    if status in (401, 403):
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    return "invalid_request_error" if status < 500 else "server_error"


def _engine_error(exc: EngineError) -> web.Response:
    """The answer for a failed request: the engine's status (else 400 for a refused
    request, 500 for a failure) and its message."""
    status = 400 if isinstance(exc, RequestRejected) else 500
    if exc.status is not None and 400 <= exc.status <= 599:
        status = exc.status
    headers = None
    if isinstance(exc, RetryableError) and exc.retry_after is not None:
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    return _error(status, str(exc), _error_type(status), headers=headers)


def _completion(response: ChatResponse, model: str) -> dict[str, Any]:
    """An OpenAI ``chat.completion`` object; token counts the engine did not know are null."""
    prompt, completion = response.prompt_tokens, response.completion_tokens
    total = prompt + completion if prompt is not None and completion is not None else None
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": response.text},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total},
    }


# --------------------------------------------------------------------- requests


def _messages(value: Any) -> list[Message]:
    if not isinstance(value, list) or not value:
        msg = "'messages' must be a non-empty list"
        raise _BadRequest(msg)
    messages: list[Message] = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            msg = f"messages[{i}] must be an object with a string 'role'"
            raise _BadRequest(msg)
        if not isinstance(m.get("content"), str):
            msg = f"messages[{i}].content must be a string (content parts are not supported)"
            raise _BadRequest(msg)
        messages.append({"role": m["role"], "content": m["content"]})
    return messages


def _sampling_params(body: Mapping[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if "max_tokens" not in body and "max_completion_tokens" in body:
        body = {**body, "max_tokens": body["max_completion_tokens"]}  # OpenAI's newer name
    for name, types in _SAMPLING_PARAMS.items():
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            msg = f"'{name}' must be {' or '.join(t.__name__ for t in types)}, got {value!r}"
            raise _BadRequest(msg)
        params[name] = value
    return params


def _parse_chat(raw: bytes, model: str) -> ChatRequest:
    """The engine request for an OpenAI chat completion body; ``model`` is the served one."""
    try:
        body = json.loads(raw)
    except ValueError:
        msg = "the request body is not valid JSON"
        raise _BadRequest(msg) from None
    if not isinstance(body, dict):
        msg = "the request body must be a JSON object"
        raise _BadRequest(msg)
    if body.get("stream"):
        msg = "streaming is not supported"
        raise _BadRequest(msg)
    if body.get("n", 1) != 1:
        msg = "only n=1 is supported"
        raise _BadRequest(msg)
    return ChatRequest(
        model=model, messages=_messages(body.get("messages")), params=_sampling_params(body)
    )


def _load_in_thread(factory: Callable[[], Engine]) -> asyncio.Future[Engine]:
    """Call ``factory`` in a daemon thread; the future settles on the calling loop.

    A daemon thread, not the loop's executor: a shutdown during a slow load must not
    wait for the load to finish.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Engine] = loop.create_future()

    def settle(engine: Engine | None, error: Exception | None) -> None:
        if future.done():  # cancelled by a shutdown during the load
            return
        if error is not None:
            future.set_exception(error)
        elif not isinstance(engine, Engine):
            msg = f"the engine factory returned {type(engine).__name__}, not an Engine"
            future.set_exception(ConfigError(msg))
        else:
            future.set_result(engine)

    def load() -> None:
        try:
            engine, error = factory(), None
        except Exception as exc:
            engine, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, engine, error)

    threading.Thread(target=load, name="nbllm-serve-load", daemon=True).start()
    return future


# --------------------------------------------------------------------- the server


class EngineServer:
    """Serves one engine over HTTP; ``async with`` or ``start()`` / ``aclose()``.

    ``engine`` is an ``Engine``, or a function without arguments that builds one (called
    in a thread, so that the server answers ``/ready`` while a model loads). Requests reach
    the engine with ``model`` as their model; answers report ``served_model_name`` (by
    default ``model``), whatever model name the client sent. ``port=0`` picks a free port.
    """

    def __init__(
        self,
        engine: EngineSource,
        *,
        model: str,
        served_model_name: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        max_queue: int = 256,
        api_key: str | None = None,
        grace: float = 30.0,
    ) -> None:
        if max_queue < 1:
            msg = f"max_queue must be >= 1, got {max_queue!r}"
            raise ConfigError(msg)
        if grace < 0:
            msg = f"grace must be >= 0 seconds, got {grace!r}"
            raise ConfigError(msg)
        if not 0 <= port <= 65535:
            msg = f"port must be in 0..65535, got {port!r}"
            raise ConfigError(msg)
        self._source = engine
        self.model = model
        self.served_model_name = served_model_name or model
        self.host = host
        self.max_queue = max_queue
        self.grace = grace
        self._requested_port = port
        self._expected_auth = f"Bearer {api_key}".encode() if api_key else None
        self.state = ServeState.NEW
        self.load_error: str | None = None
        self._engine: Engine | None = None
        self._loading: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._answers: set[asyncio.Task[ChatResponse]] = set()  # admitted, not yet answered
        self._idle = asyncio.Event()
        self._idle.set()

    def __repr__(self) -> str:  # no api_key
        where = self.url if self._port is not None else "not listening"
        return f"<EngineServer {self.served_model_name!r} {self.state.value} {where}>"

    @property
    def url(self) -> str:
        """The ``/v1`` base URL to give OpenAI-compatible clients."""
        if self._port is None:
            msg = "the server is not listening: call start() first"
            raise RuntimeError(msg)
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}/v1"

    @property
    def in_flight(self) -> int:
        """Chat requests admitted and not yet answered."""
        return len(self._answers)

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> EngineServer:
        """Listen, then begin loading the engine; returns once listening."""
        if self.state is not ServeState.NEW:
            msg = f"the server was already started (it is {self.state.value})"
            raise RuntimeError(msg)
        app = web.Application(middlewares=[self._check_api_key], client_max_size=_MAX_BODY_BYTES)
        app.router.add_post("/v1/chat/completions", self._handle_chat)
        app.router.add_get("/v1/models", self._handle_models)
        app.router.add_get("/health", self._handle_health)
        app.router.add_get("/ready", self._handle_ready)
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=_CLEANUP_TIMEOUT_S
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self._requested_port).start()
        except OSError as exc:  # the port is taken, the host is not this machine's, ...
            await runner.cleanup()
            msg = f"cannot listen on {self.host}:{self._requested_port}: {exc}"
            raise ConfigError(msg) from exc
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        if isinstance(self._source, Engine):
            self._engine = self._source
            self.state = ServeState.READY
        else:
            self.state = ServeState.LOADING
            self._loading = asyncio.create_task(self._load(self._source))
        return self

    async def _load(self, factory: Callable[[], Engine]) -> None:
        _log.info("loading the engine for %s", self.model)
        try:
            engine = await _load_in_thread(factory)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            self.state = ServeState.FAILED
            _log.error("the engine failed to load: %s", self.load_error)
            return
        self._engine = engine
        self.state = ServeState.READY
        _log.info("ready: the %s engine serves %s", engine.name, self.served_model_name)

    async def aclose(self) -> None:
        """Drain: refuse new requests, answer those admitted (up to ``grace`` s), then close.

        Idempotent. Requests still unanswered after the grace period are answered 503.
        """
        if self.state in (ServeState.DRAINING, ServeState.CLOSED):
            return
        self.state = ServeState.DRAINING
        if self._loading is not None:
            self._loading.cancel()  # a load in progress is abandoned, not waited for
            with contextlib.suppress(asyncio.CancelledError):
                await self._loading
        if self._answers:
            _log.info("draining %d request(s), up to %g s", len(self._answers), self.grace)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), self.grace)
        self.cut_off()
        with contextlib.suppress(asyncio.TimeoutError):  # an engine may be slow to cancel
            await asyncio.wait_for(self._idle.wait(), _CLEANUP_TIMEOUT_S)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._engine is not None:
            await self._engine.aclose()
        self.state = ServeState.CLOSED

    def cut_off(self) -> None:
        """Stop waiting for the requests still running: each is answered 503."""
        for answer in self._answers:
            answer.cancel()

    async def __aenter__(self) -> EngineServer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # ----------------------------------------------------------------- gates

    @web.middleware
    async def _check_api_key(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Middleware: every ``/v1/`` route needs the Bearer key, when one is set."""
        if self._expected_auth is None or not request.path.startswith("/v1/"):
            return await handler(request)
        given = request.headers.get("Authorization", "").encode("utf-8", "replace")
        if not hmac.compare_digest(given, self._expected_auth):
            return _error(
                401, "missing or incorrect API key", "invalid_request_error", "invalid_api_key"
            )
        return await handler(request)

    def _refusal(self) -> web.Response | None:
        """Why a chat request cannot be admitted now, or None. No await: no race with admit."""
        retry = {"Retry-After": str(_RETRY_AFTER_S)}
        if self.state is ServeState.LOADING:
            return _error(503, "the model is still loading", "server_error", "loading", retry)
        if self.state is ServeState.FAILED:
            message = f"the engine failed to load: {self.load_error}"
            return _error(503, message, "server_error", "load_failed")
        if self.state is not ServeState.READY:
            return _error(503, "the server is shutting down", "server_error", "draining", retry)
        if len(self._answers) >= self.max_queue:
            message = f"the server's queue is full ({self.max_queue} requests); retry later"
            return _error(429, message, "rate_limit_error", "queue_full", retry)
        return None

    # ----------------------------------------------------------------- routes

    async def _handle_chat(self, request: web.Request) -> web.Response:
        try:
            chat = _parse_chat(await request.read(), self.model)
        except _BadRequest as exc:
            return _error(400, str(exc), "invalid_request_error")
        refusal = self._refusal()
        if refusal is not None:
            return refusal
        assert self._engine is not None  # READY
        # A task of its own, so that the end of the grace period can cut it off with a 503.
        answer = asyncio.ensure_future(self._engine.complete(chat))
        self._answers.add(answer)
        self._idle.clear()
        try:
            await asyncio.wait({answer})
        finally:
            answer.cancel()  # only does something if this handler itself was cancelled
            self._answers.discard(answer)
            if not self._answers:
                self._idle.set()
        return self._reply(answer)

    def _reply(self, answer: asyncio.Task[ChatResponse]) -> web.Response:
        """The HTTP answer for a finished engine call, errors mapped to statuses."""
        if answer.cancelled():
            message = "the server shut down before the answer was ready"
            return _error(503, message, "server_error", "shutdown")
        exc = answer.exception()
        if exc is None:
            return web.json_response(_completion(answer.result(), self.served_model_name))
        if isinstance(exc, EngineError):
            return _engine_error(exc)
        # A bug in an engine: the traceback goes to the log, not to the client.
        _log.error("the engine raised an unexpected error", exc_info=exc)
        return _error(500, f"the engine failed: {type(exc).__name__}", "server_error")

    async def _handle_models(self, request: web.Request) -> web.Response:
        model = {"id": self.served_model_name, "object": "model", "created": 0, "owned_by": "nbllm"}
        return web.json_response({"object": "list", "data": [model]})

    async def _handle_health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _handle_ready(self, request: web.Request) -> web.Response:
        if self.state is ServeState.READY:
            assert self._engine is not None
            body = {
                "status": "ready",
                "model": self.served_model_name,
                "engine": self._engine.name,
                "max_in_flight": self._engine.max_in_flight,
            }
            return web.json_response(body)
        if self.state is ServeState.FAILED:
            return web.json_response({"status": "failed", "error": self.load_error}, status=503)
        if self.state is ServeState.LOADING:
            return web.json_response({"status": "loading"}, status=503)
        return web.json_response({"status": "draining"}, status=503)


# --------------------------------------------------------------------- the command


def _load_fake_engine(latency: float, load_s: float) -> Engine:
    time.sleep(load_s)  # in the load thread: simulates a slow model load
    return FakeEngine(echo, latency=latency)


def engine_factory(args: argparse.Namespace) -> Callable[[], Engine]:
    """What builds the engine the command's options name (called later, in a thread)."""
    if args.engine == "fake":
        return functools.partial(_load_fake_engine, args.fake_latency, args.fake_load_s)
    options: dict[str, Any] = {}
    if args.batch_size is not None:
        options["batch_size"] = args.batch_size
    if args.batch_wait_ms is not None:
        options["batch_wait_s"] = args.batch_wait_ms / 1000
    if args.device is not None:
        options["device"] = args.device
    # worker=False: this process is the worker; it must not start another one.
    return functools.partial(create_engine, args.engine, model=args.model, worker=False, **options)


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= 0:  # also refuses nan
        msg = f"expected a number >= 0, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        msg = f"expected an integer >= 1, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``serve`` command to the ``nbllm`` command's subparsers."""
    serve = subparsers.add_parser(
        "serve",
        help="serve one model over an OpenAI-compatible HTTP API",
        description=(
            "Serve one engine over an OpenAI-compatible HTTP API (/v1/chat/completions, "
            "/v1/models, /health, /ready). Prints one line, 'nbllm serve listening on URL', "
            "to stdout. SIGTERM or SIGINT drains: requests in flight are still answered."
        ),
    )
    serve.add_argument("--engine", default="auto", help="which engine (default: auto)")
    serve.add_argument(
        "--model",
        help="the model to load or send to (default for a local engine: the embedded one)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="(default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="(default: 8000; 0: a free port)")
    serve.add_argument(
        "--max-queue",
        type=_positive_int,
        default=256,
        metavar="N",
        help="requests admitted at once; one more gets 429 (default: 256)",
    )
    serve.add_argument(
        "--api-key",
        metavar="KEY",
        help=f"require this Bearer key on /v1/ (better: set ${API_KEY_ENV})",
    )
    serve.add_argument(
        "--grace",
        type=_non_negative,
        default=30.0,
        metavar="S",
        help="seconds to finish requests in flight on shutdown (default: 30)",
    )
    serve.add_argument("--served-model-name", metavar="NAME", help="the model name answers report")
    serve.add_argument("--batch-size", type=_positive_int, metavar="N", help="for local engines")
    serve.add_argument(
        "--batch-wait-ms", type=_non_negative, metavar="MS", help="for local engines"
    )
    serve.add_argument("--device", help="for local engines, e.g. cpu, cuda, cuda:1")
    serve.add_argument(
        "--fake-latency",
        type=_non_negative,
        default=0.0,
        metavar="S",
        help="--engine fake: seconds per answer (for tests)",
    )
    serve.add_argument(
        "--fake-load-s",
        type=_non_negative,
        default=0.0,
        metavar="S",
        help="--engine fake: seconds the load takes (for tests)",
    )
    serve.set_defaults(handler=main)
    return serve


def _on_signals(callback: Callable[[], None]) -> None:
    """Call ``callback`` on the running loop at each SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, callback)
        except (NotImplementedError, RuntimeError):  # Windows: no loop signal handlers
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(callback))


def _ignore_signals() -> None:
    """Once drained the process only exits: a late SIGTERM must not turn exit 0 into a kill."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)


async def _serve_until_signal(server: EngineServer) -> None:
    """Start, print the URL line, wait for SIGTERM / SIGINT, drain.

    A second signal during the drain cuts off the requests still running (answered 503).
    """
    stop = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():
            server.cut_off()
        stop.set()

    _on_signals(on_signal)
    try:
        await server.start()
        print(f"{URL_LINE_PREFIX}{server.url}", flush=True)
        await stop.wait()
        _log.info("stopping")
    finally:
        await server.aclose()
        _ignore_signals()


def main(args: argparse.Namespace) -> int:
    """Run ``nbllm serve`` with parsed options until a signal; returns the exit code."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="nbllm serve: %(message)s")
    # Without --model a local engine loads the embedded model (create_engine's rule).
    model = args.model or ("fake" if args.engine == "fake" else EMBEDDED_MODEL)
    server = EngineServer(
        engine_factory(args),
        model=model,
        served_model_name=args.served_model_name,
        host=args.host,
        port=args.port,
        max_queue=args.max_queue,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        grace=args.grace,
    )
    asyncio.run(_serve_until_signal(server))
    return 0
