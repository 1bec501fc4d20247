"""The server of ``nbllm serve``: one nbllm ``Engine`` behind an OpenAI-compatible HTTP API.

Routes:

- ``POST /v1/chat/completions``: one chat completion (no streaming);
- ``GET /v1/models``: the one served model (with ``max_model_len``, its context, where the
  engine knows it);
- ``GET /health``: 200 while the process is up, also while the model loads;
- ``GET /ready``: 200 once the engine is loaded, 503 while loading, after a failed load
  and while draining.

The engine is loaded in a thread, so the server answers ``/health`` and ``/ready`` from
the first moment. At most ``max_queue`` chat requests are admitted at once; one more gets
429 with ``Retry-After``, never a silent drop. With an API key every ``/v1/`` request
must carry ``Authorization: Bearer KEY``.

Limits, each checked before the body is read where it can be: the key, then the queue,
then ``Content-Length`` against ``max_body_mb`` (413; a body without a length is cut at
the limit). Then what the body holds is checked (``nbllm.serve.chat_request``: JSON nested
too deep, too many messages, a ``max_tokens`` beyond the model's context are 400). A local
engine refuses a prompt that leaves no room for ``max_tokens`` in its context: its
``RequestRejected`` is a 400 with the figures. Bodies over 256 KiB are parsed in a
thread, two at a time (a parsed body may take 15 times its size).
An engine's error reaches the client with its own message only where ``relays_errors``
(not for an API engine, whose provider may quote the key: a generic text instead).

``aclose()`` drains: new requests get 503,
those admitted are answered (for up to ``grace`` seconds), then the engine is closed.

Timeouts: the server sets none of its own. A request may carry the ``X-Nbllm-Timeout``
header (seconds; a worker's engine sends it), which becomes its ``ChatRequest.timeout``
for the engine to apply as it does in process (a local model: to the wait for a batch
slot, never to a started generation); the engine's ``RequestTimeout`` is answered 504
with the code ``request_timeout``. A client that disconnects gives up its request: the
engine call is cancelled (a local model cuts the generation at its next token), so that
nothing generates an answer nobody will read, and a retry does not queue behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hmac
import logging
import math
import threading
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from nbllm.engines.base import Engine
from nbllm.engines.litellm import LiteLLMEngine
from nbllm.engines.openai import OpenAIEngine
from nbllm.engines.openai_wire import (
    TIMEOUT_ERROR_CODE,
    TIMEOUT_HEADER,
    BadChatRequest,
    completion_body,
    error_body,
    error_type,
    parse_timeout,
)
from nbllm.errors import (
    ConfigError,
    EngineError,
    RequestRejected,
    RequestTimeout,
    RetryableError,
)
from nbllm.serve.chat_request import MAX_MESSAGES, MAX_TOKENS_CAP, context_length, parse_chat
from nbllm.types import ChatResponse

__all__ = [
    "DEFAULT_MAX_BODY_MB",
    "MAX_MESSAGES",
    "MAX_TOKENS_CAP",
    "EngineServer",
    "EngineSource",
    "ServeState",
]

_log = logging.getLogger("nbllm.serve")

EngineSource = Engine | Callable[[], Engine]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_RETRY_AFTER_S = 1
#: The default body limit in MiB: aiohttp's 1 MiB is less than one long conversation with a
#: large context; each MiB admitted may cost tens in parsed objects.
DEFAULT_MAX_BODY_MB = 8.0
# Bodies above this are parsed in a thread, so that /health and other requests go on.
_PARSE_IN_THREAD_BYTES = 256 * 1024
# Large bodies parsed at once: a parsed body may take 15 times its size in objects.
_PARALLEL_LARGE_PARSES = 2
# By then every admitted request is answered or past its grace: this bounds writing out.
_CLEANUP_TIMEOUT_S = 1.0


class ServeState(enum.Enum):
    NEW = "new"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    DRAINING = "draining"
    CLOSED = "closed"


# --------------------------------------------------------------------- answers


def _error(
    status: int,
    message: str,
    type_: str,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    return web.json_response(error_body(message, type_, code), status=status, headers=headers)


def _generic_message(status: int) -> str:
    if status == 429:
        return "the engine is rate limited; retry later"
    if 400 <= status < 500:
        return f"the engine refused the request (HTTP {status})"
    return f"the engine failed (HTTP {status})"


def _engine_error(exc: EngineError, *, relay: bool) -> web.Response:
    """The answer for a failed request: the engine's status (else 400 for a refused
    request, 504 for a timeout, 500 for a failure) and, if ``relay``, its message.

    Without ``relay`` the client reads a generic text: a provider's message may quote the
    key this server spent on its behalf. The log keeps the error's type only.
    """
    if isinstance(exc, RequestTimeout):
        # Its own code: to an OpenAI client a retryable 5xx, to nbllm's a RequestTimeout.
        message = str(exc) if relay else "the engine did not answer in time"
        return _error(504, message, "server_error", TIMEOUT_ERROR_CODE)
    status = 400 if isinstance(exc, RequestRejected) else 500
    if exc.status is not None and 400 <= exc.status <= 599:
        status = exc.status
    headers = None
    if isinstance(exc, RetryableError) and exc.retry_after is not None:
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    if not relay:
        _log.warning("the engine answered %s (%s)", status, type(exc).__name__)
    message = str(exc) if relay else _generic_message(status)
    return _error(status, message, error_type(status), headers=headers)


# --------------------------------------------------------------------- loading


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
        max_body_mb: float = DEFAULT_MAX_BODY_MB,
        relay_errors: bool | None = None,
    ) -> None:
        if max_queue < 1:
            msg = f"max_queue must be >= 1, got {max_queue!r}"
            raise ConfigError(msg)
        if grace < 0:
            msg = f"grace must be >= 0 seconds, got {grace!r}"
            raise ConfigError(msg)
        if not 0 < max_body_mb < math.inf:
            msg = f"max_body_mb must be a finite number > 0, got {max_body_mb!r}"
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
        self.max_body_bytes = max(1, int(max_body_mb * 1024 * 1024))
        self._relay_errors = relay_errors
        self._expected_auth = f"Bearer {api_key}".encode() if api_key else None
        self.state = ServeState.NEW
        self.load_error: str | None = None
        self._engine: Engine | None = None
        self._loading: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        # Engine calls admitted and not yet ended.
        self._answers: set[asyncio.Future[ChatResponse]] = set()
        # Chat requests admitted whose body is still being read or parsed.
        self._receiving = 0
        self._large_parses = asyncio.Semaphore(_PARALLEL_LARGE_PARSES)
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
    def receiving(self) -> int:
        """Chat requests admitted whose body is still being read or parsed; they count
        towards ``max_queue``."""
        return self._receiving

    @property
    def relays_errors(self) -> bool:
        """Whether clients read the engine's error messages rather than a generic text.

        ``relay_errors`` decides; by default (None) every engine but one that calls an API
        server (``OpenAIEngine``, ``LiteLLMEngine``), whose messages may quote the key this
        server spends for its clients.
        """
        if self._relay_errors is not None:
            return self._relay_errors
        return not isinstance(self._engine, (OpenAIEngine, LiteLLMEngine))

    @property
    def engine(self) -> Engine | None:
        """The engine answering, once made (None while it loads, or if it failed)."""
        return self._engine

    @property
    def in_flight(self) -> int:
        """Chat requests admitted whose engine call has not ended (a cancelled one counts
        until the engine lets go of it)."""
        return len(self._answers)

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> EngineServer:
        """Listen, then begin loading the engine; returns once listening."""
        if self.state is not ServeState.NEW:
            msg = f"the server was already started (it is {self.state.value})"
            raise RuntimeError(msg)
        app = web.Application(
            middlewares=[self._check_api_key], client_max_size=self.max_body_bytes
        )
        app.router.add_post("/v1/chat/completions", self._handle_chat)
        app.router.add_get("/v1/models", self._handle_models)
        app.router.add_get("/health", self._handle_health)
        app.router.add_get("/ready", self._handle_ready)
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=_CLEANUP_TIMEOUT_S,
            # A client that disconnects cancels its handler, which cancels the engine call.
            handler_cancellation=True,
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

    async def wait_loaded(self) -> ServeState:
        """Wait until the engine has loaded or its load failed; returns the state then.

        Returns at once for an engine given as an instance, or once the server is closing.
        """
        if self._loading is not None:
            await asyncio.wait({self._loading})  # never cancels the load, never raises
        return self.state

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
        if not self._has_key(request):
            return _error(
                401, "missing or incorrect API key", "invalid_request_error", "invalid_api_key"
            )
        return await handler(request)

    def _has_key(self, request: web.Request) -> bool:
        if self._expected_auth is None:
            return False
        given = request.headers.get("Authorization", "").encode("utf-8", "replace")
        return hmac.compare_digest(given, self._expected_auth)

    def _admission(self, request: web.Request) -> Engine | web.Response:
        """The engine to answer a chat request now, or why it cannot be admitted.

        No await: nothing changes between this and the admission.
        """
        retry = {"Retry-After": str(_RETRY_AFTER_S)}
        if self.state is ServeState.LOADING:
            return _error(503, "the model is still loading", "server_error", "loading", retry)
        if self.state is ServeState.FAILED:
            # Why (paths, memory figures) only to a caller holding the key; the log has it.
            message = "the engine failed to load"
            if self._has_key(request):
                message += f": {self.load_error}"
            return _error(503, message, "server_error", "load_failed")
        if self.state is not ServeState.READY or self._engine is None:
            return _error(503, "the server is shutting down", "server_error", "draining", retry)
        # A body being read holds its place: slow senders cannot pile up bodies in memory.
        if len(self._answers) + self._receiving >= self.max_queue:
            message = f"the server's queue is full ({self.max_queue} requests); retry later"
            return _error(429, message, "rate_limit_error", "queue_full", retry)
        return self._engine

    # ----------------------------------------------------------------- routes

    async def _handle_chat(self, request: web.Request) -> web.Response:
        # The key (middleware), the queue and the size are checked before the body is read.
        refused = self._admission(request)
        if isinstance(refused, web.Response):
            return refused
        length = request.content_length
        if length is not None and length > self.max_body_bytes:
            message = f"the request body is over the server's limit of {self.max_body_bytes} bytes"
            return _error(413, message, "invalid_request_error", "body_too_large")
        context = context_length(refused)
        self._receiving += 1
        try:
            timeout = parse_timeout(request.headers.get(TIMEOUT_HEADER))
            raw = await request.read()  # a body without a length: 413 past the limit
            if len(raw) > _PARSE_IN_THREAD_BYTES:
                async with self._large_parses:
                    chat = await asyncio.to_thread(parse_chat, raw, self.model, timeout, context)
            else:
                chat = parse_chat(raw, self.model, timeout, context)
        except BadChatRequest as exc:
            return _error(400, str(exc), "invalid_request_error")
        finally:
            self._receiving -= 1
        engine = self._admission(request)  # again: the state may have changed during the read
        if isinstance(engine, web.Response):
            return engine  # refused
        # A task of its own, so that the end of the grace period can cut it off with a 503.
        answer = asyncio.ensure_future(engine.complete(chat))
        self._answers.add(answer)
        self._idle.clear()
        # Counted until the engine has let go of it, also after a cancel.
        answer.add_done_callback(self._answered)
        try:
            await asyncio.wait({answer})
        except asyncio.CancelledError:
            # The client disconnected (handler_cancellation) or the server is closing:
            # nobody will read this answer, so the engine stops working on it.
            answer.cancel()
            raise
        return self._reply(answer)

    def _answered(self, answer: asyncio.Future[ChatResponse]) -> None:
        self._answers.discard(answer)
        if not self._answers:
            self._idle.set()

    def _reply(self, answer: asyncio.Future[ChatResponse]) -> web.Response:
        """The HTTP answer for a finished engine call, errors mapped to statuses."""
        if answer.cancelled():
            message = "the server shut down before the answer was ready"
            return _error(503, message, "server_error", "shutdown")
        exc = answer.exception()
        if exc is None:
            response = answer.result()
            body = completion_body(
                f"chatcmpl-{uuid.uuid4().hex}",
                self.served_model_name,
                response.text,
                response.prompt_tokens,
                response.completion_tokens,
                # "stop" only where the engine said nothing: a cut answer says "length".
                response.finish_reason or "stop",
                response.cached_tokens,
            )
            return web.json_response(body)
        if isinstance(exc, EngineError):
            return _engine_error(exc, relay=self.relays_errors)
        # A bug in an engine: the traceback goes to the log, not to the client.
        _log.error("the engine raised an unexpected error", exc_info=exc)
        return _error(500, f"the engine failed: {type(exc).__name__}", "server_error")

    async def _handle_models(self, request: web.Request) -> web.Response:
        model: dict[str, Any] = {
            "id": self.served_model_name,
            "object": "model",
            "created": 0,
            "owned_by": "nbllm",
        }
        context = context_length(self._engine)
        if context is not None:  # vLLM's name for it, which OpenAI-compatible tools read
            model["max_model_len"] = context
        return web.json_response({"object": "list", "data": [model]})

    async def _handle_health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _handle_ready(self, request: web.Request) -> web.Response:
        if self.state is ServeState.READY and self._engine is not None:
            body = {
                "status": "ready",
                "model": self.served_model_name,
                "engine": self._engine.name,
                "max_in_flight": self._engine.max_in_flight,
            }
            return web.json_response(body)
        if self.state is ServeState.FAILED:
            failed = {"status": "failed"}
            if self._has_key(request):  # /ready is open to all: why only with the key
                failed["error"] = self.load_error or ""
            return web.json_response(failed, status=503)
        if self.state is ServeState.LOADING:
            return web.json_response({"status": "loading"}, status=503)
        return web.json_response({"status": "draining"}, status=503)
