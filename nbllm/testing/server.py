"""A real OpenAI-compatible chat-completions server for tests, benchmarks and teaching.

It speaks HTTP on 127.0.0.1 so that the whole client stack (sessions, retries, rate limiting,
connection errors) is exercised for real, yet it needs no API key, no network and no GPU.
Answers are deterministic in the messages and the server remembers what it answered, so a
test can prove that turn k of a conversation carried the model's real earlier answers.
It also runs OpenAI and Anthropic batches (``nbllm.testing.batches``), answered the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from aiohttp import web

from nbllm.engines.openai_wire import (
    BadChatRequest,
    completion_body,
    error_body,
)
from nbllm.images import content_text
from nbllm.testing import anthropic_batches, openai_batches
from nbllm.testing.batches import BatchBook, BatchOptions, BatchRecord
from nbllm.testing.options import Fault, Latency, as_number, refuse_unless
from nbllm.testing.prompt_cache import PromptCache
from nbllm.testing.request_log import AskedTurn, RequestLogEntry, answer_for, in_history
from nbllm.testing.structured import JsonAnswers

__all__ = ["Fault", "TestServer"]

MODEL_ID = "nbllm-test"
_JSON = "application/json"
_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 15.0
_FAULT_500 = "The server had an error (injected fault)."


def _tokens(n_chars: int) -> int:
    return max(1, n_chars // 4)


def _retry_after_text(seconds: float) -> str:
    """Whole seconds rounded up (at least 1) as HTTP wants; sub-second values stay floats."""
    if seconds < 1:
        return f"{seconds:g}"
    return str(max(1, math.ceil(seconds)))


class TestServer:
    """An OpenAI-compatible chat-completions server on a free local port.

    Runs in a daemon thread with its own event loop (``start``/``stop``, or ``with`` /
    ``async with``) so that tests in any loop, notebooks and scripts can all use it.
    See the module docs of ``nbllm.testing`` for the behaviour of each option.
    """

    __test__ = False  # its name starts with "Test": keep pytest from collecting it

    def __init__(
        self,
        latency: float | tuple[float, float] = 0.0,
        rpm: int | None = None,
        window_s: float = 60.0,
        faults: Mapping[Fault, float] | Mapping[str, float] | None = None,
        fault_first: int | None = None,
        hang_s: float = 30.0,
        retry_after: float = 1.0,
        seed: int = 0,
        api_key: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        log_path: str | os.PathLike[str] | None = None,
        shared_history: bool = False,
        bad_json_first: int = 0,
        latency_sigma: float = 0.0,
        prompt_cache: bool = False,
        batch_delay_s: float = 0.2,
        batch_max_requests: int | None = None,
        batch_fail_first: int = 0,
        batch_expire_first: int = 0,
    ) -> None:
        self.batch_options = BatchOptions(
            batch_delay_s, batch_max_requests, batch_fail_first, batch_expire_first
        )
        self._latency = Latency(latency, latency_sigma)
        refuse_unless(rpm is None or rpm >= 1, "rpm", ">= 1 or None", rpm)
        refuse_unless(as_number("window_s", window_s) > 0, "window_s", "> 0", window_s)
        refuse_unless(
            fault_first is None or fault_first >= 0, "fault_first", ">= 0 or None", fault_first
        )
        for name, value in (("hang_s", hang_s), ("retry_after", retry_after)):
            refuse_unless(as_number(name, value) >= 0, name, ">= 0", value)
        table: dict[Fault, float] = {}
        for k, p in (faults or {}).items():
            p = as_number(f"faults[{k!r}]", p)
            refuse_unless(0.0 <= p <= 1.0, f"faults[{k!r}]", "a probability in [0, 1]", p)
            table[Fault.parse(k)] = table.get(Fault.parse(k), 0.0) + p
        at_most_1 = fault_first is not None or sum(table.values()) <= 1.0 + 1e-9
        refuse_unless(at_most_1, "faults", "probabilities that add up to at most 1", table)
        self.latency = latency
        self.rpm = rpm
        self.window_s = float(window_s)
        self.faults: dict[Fault, float] = table
        self.fault_first = fault_first
        self.hang_s = float(hang_s)
        self.retry_after = float(retry_after)
        self.seed = seed
        self.api_key = api_key
        self.host = host
        self.log_path = None if log_path is None else Path(log_path)
        self.shared_history = bool(shared_history)  # see nbllm.testing: servers of a group
        self.json_answers = JsonAnswers(bad_json_first)  # answers to response_format
        # prompt_cache=True: each answer says its cached prompt tokens.
        self.prompt_cache = PromptCache() if prompt_cache else None
        self._requested_port = port
        # Cumulative table for one random draw per request; rotation list for fault_first.
        self._fault_cum: list[tuple[float, Fault]] = []
        acc = 0.0
        for kind, p in table.items():
            if p > 0:
                acc += p
                self._fault_cum.append((acc, kind))
        self._rotation: list[Fault] = [k for k, p in table.items() if p > 0] or [Fault.SERVER_ERROR]
        self._auth = None if api_key is None else f"Bearer {api_key}"
        self._retry_after_headers = {
            "Retry-After": _retry_after_text(self.retry_after),
            "retry-after-ms": str(round(self.retry_after * 1000)),
        }
        # Server state. Mutated only on the server's loop, read from any thread (GIL-atomic).
        self._answers: dict[str, str] = {}
        self._window: deque[float] = deque()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._port: int | None = None
        self._closing = False
        self._sleepers: set[asyncio.Future[bool]] = set()
        self._log_file: IO[str] | None = None
        self._in_flight = 0
        self._counter = 0
        self._batches = BatchBook(self.batch_options, self.answer_body)
        self._reset_state()

    # ----------------------------------------------------------------- public state

    def _reset_state(self) -> None:
        self._requests: list[RequestLogEntry] = []
        self._accepted: list[float] = []
        self._attempts: dict[str, int] = {}
        self._history_errors = 0
        self._max_in_flight = self._in_flight
        self._rng_faults = random.Random(self.seed)
        self._rng_latency = random.Random(self.seed + 1)
        self._batches.reset_logs()

    @property
    def port(self) -> int:
        """The port it listens on (known once started, also when asked for port 0)."""
        if self._port is None:
            msg = "TestServer is not running: call start() first"
            raise RuntimeError(msg)
        return self._port

    @property
    def url(self) -> str:
        """The ``api_base`` to give OpenAI-compatible clients, e.g. ``http://127.0.0.1:PORT/v1``."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._port is not None

    @property
    def requests(self) -> list[RequestLogEntry]:
        """A snapshot of the request log, in order of completion."""
        return list(self._requests)

    @property
    def batch_requests(self) -> list[RequestLogEntry]:
        """The lines of batches the server ran, in the order it ran them (not in ``requests``:
        that log stays the live requests); ``conversation`` is the line's ``custom_id``."""
        return list(self._batches.batch_requests)

    @property
    def batches(self) -> list[BatchRecord]:
        """The batches created (through either provider's routes), oldest first, as now."""
        return [job.record() for job in self._batches.logged]

    @property
    def accepted_times(self) -> list[float]:
        """``time.monotonic()`` at which each request answered 200 was admitted by the limiter.

        This is the instant the rate limiter counted it, so a sliding window over these times
        is exactly what ``rpm`` bounds.
        """
        return sorted(self._accepted)

    @property
    def history_errors(self) -> int:
        """Requests whose assistant messages were not what this server had answered."""
        return self._history_errors

    @property
    def max_in_flight(self) -> int:
        return self._max_in_flight

    def reset(self) -> None:
        """Clear the request log, counters and fault_first attempts (answers are kept), and
        the batch logs, counters and batch_fail_first / batch_expire_first counts (batches
        and files stay readable by id).

        The remembered answers, the rate-limit window and the prompt cache are server state,
        not logs: keeping them means a reset between runs neither breaks history checks nor
        allows a burst, and a request asked again still finds its prompt cached.
        """
        self._reset_state()

    def stats(self) -> dict[str, Any]:
        """Summary counts: total, by_status, history_errors, max_in_flight, in_flight (of
        live requests), and batches_created, batches_cancelled, files_uploaded, batch_lines
        (the lines of the batches created)."""
        by_status: dict[int, int] = {}
        for entry in self.requests:
            by_status[entry.status] = by_status.get(entry.status, 0) + 1
        return {
            "total": sum(by_status.values()),
            "by_status": dict(sorted(by_status.items())),
            "history_errors": self._history_errors,
            "max_in_flight": self._max_in_flight,
            "in_flight": self._in_flight,
            **self._batches.counts,
        }

    def __repr__(self) -> str:
        where = self.url if self._port is not None else "not running"
        return f"<TestServer {where}>"

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> TestServer:
        """Start serving in a daemon thread; returns once it listens (idempotent)."""
        with self._lock:
            if self._thread is not None:
                return self
            ready = threading.Event()
            failure: list[BaseException] = []

            def run() -> None:
                try:
                    asyncio.run(self._serve(ready.set))
                except BaseException as exc:  # reported to start() if it happens before ready
                    if not ready.is_set():
                        failure.append(exc)
                        ready.set()
                    else:
                        raise

            thread = threading.Thread(target=run, name="nbllm-test-server", daemon=True)
            thread.start()
            if not ready.wait(_START_TIMEOUT_S):
                msg = f"TestServer did not start listening within {_START_TIMEOUT_S} s"
                raise RuntimeError(msg)
            if failure:
                thread.join()
                self._port = None
                raise failure[0]
            self._thread = thread
            return self

    def stop(self) -> None:
        """Stop listening, cut off hanging handlers, join the thread (idempotent)."""
        with self._lock:
            thread, loop = self._thread, self._loop
            if thread is None:
                return
            if loop is not None and not loop.is_closed():
                # RuntimeError: the loop closed in between, so there is nothing left to stop.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._request_stop)
            thread.join(_STOP_TIMEOUT_S)
            if thread.is_alive():
                msg = f"TestServer thread did not stop within {_STOP_TIMEOUT_S} s"
                raise RuntimeError(msg)
            self._thread = None
            self._port = None

    def __enter__(self) -> TestServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> TestServer:
        # start/stop block briefly on a thread handshake: keep the caller's loop free meanwhile.
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)

    def _request_stop(self) -> None:
        """Ask ``_serve`` to shut down; must run on the server's loop."""
        if self._stop_event is not None:
            self._stop_event.set()

    async def _serve(self, on_ready: Callable[[], None]) -> None:
        """Listen, call ``on_ready``, serve until ``_request_stop``, then shut down cleanly.

        Used both by the background thread and by the foreground CLI (``python -m``).
        """
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self._closing = False
        self._sleepers = set()
        log_file: IO[str] | None = None
        if self.log_path is not None:
            log_file = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed below
        self._log_file = log_file
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle_chat)
        app.router.add_get("/v1/models", self._handle_models)
        app.router.add_get("/health", self._handle_health)
        openai_batches.add_routes(app, self._batches, self.api_key)
        anthropic_batches.add_routes(app, self._batches, self.api_key)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
        try:
            await runner.setup()
            site = web.TCPSite(runner, self.host, self._requested_port)
            await site.start()
            self._port = int(runner.addresses[0][1])
            on_ready()
            await self._stop_event.wait()
        finally:
            # Cut off hangs and latency sleeps first so the runner's graceful wait is short.
            self._closing = True
            for fut in list(self._sleepers):
                if not fut.done():
                    fut.set_result(False)
            await runner.cleanup()
            self._log_file = None
            if log_file is not None:
                log_file.close()
            self._loop = None
            self._stop_event = None

    async def _sleep(self, delay: float) -> bool:
        """Sleep ``delay`` seconds; False if server shutdown cut the sleep short."""
        if self._closing:
            return False
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        handle = loop.call_later(delay, _set_result_if_pending, fut, True)
        self._sleepers.add(fut)
        try:
            return await fut
        finally:
            handle.cancel()
            self._sleepers.discard(fut)

    # ----------------------------------------------------------------- handlers

    async def _handle_health(self, request: web.Request) -> web.Response:
        return web.Response(body=b'{"status":"ok"}', content_type=_JSON)

    async def _handle_models(self, request: web.Request) -> web.Response:
        if self._auth is not None and request.headers.get("Authorization") != self._auth:
            return self._unauthorized()
        body = {
            "object": "list",
            "data": [{"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "nbllm"}],
        }
        return web.Response(body=json.dumps(body).encode(), content_type=_JSON)

    def _unauthorized(self) -> web.Response:
        return openai_batches.unauthorized()

    def _record(
        self,
        t: float,
        conversation: str | None,
        key: str,
        status: int,
        n_messages: int,
        turn: int,
    ) -> None:
        entry = RequestLogEntry(t, conversation, key, status, n_messages, turn)
        self._requests.append(entry)
        if self._log_file is not None:
            self._log_file.write(json.dumps(asdict(entry)) + "\n")
            self._log_file.flush()

    async def _handle_chat(self, request: web.Request) -> web.Response:
        t = time.monotonic()
        self._in_flight += 1
        if self._in_flight > self._max_in_flight:
            self._max_in_flight = self._in_flight
        try:
            return await self._chat(request, t)
        finally:
            self._in_flight -= 1

    async def _chat(self, request: web.Request, t: float) -> web.Response:
        conversation = request.headers.get("X-Conversation-Id")
        if self._auth is not None and request.headers.get("Authorization") != self._auth:
            self._record(t, conversation, "", 401, 0, -1)
            return self._unauthorized()
        try:
            asked = AskedTurn.read(await request.read())
        except BadChatRequest as exc:
            self._record(t, conversation, "", 400, 0, -1)
            return _json_response(400, error_body(str(exc), "invalid_request_error"))
        key, n, turn = asked.key, len(asked.messages), asked.turn
        if (mismatch := self._history_error(asked)) is not None:
            self._record(t, conversation, key, 400, n, turn)
            return _json_response(400, mismatch)

        # --- rate limit over a sliding window of admitted requests
        rl_headers: dict[str, str] | None = None
        admitted_at = 0.0
        if self.rpm is not None:
            now = time.monotonic()
            window = self._window
            edge = now - self.window_s
            while window and window[0] <= edge:
                window.popleft()
            if len(window) >= self.rpm:
                self._record(t, conversation, key, 429, n, turn)
                headers = {
                    **self._retry_after_headers,
                    "x-ratelimit-limit-requests": str(self.rpm),
                    "x-ratelimit-remaining-requests": "0",
                }
                message = f"Rate limit reached: {self.rpm} requests per {self.window_s:g} s."
                body429 = error_body(message, "rate_limit_error", "rate_limit_exceeded")
                return _json_response(429, body429, headers)

        # --- faults (decided before admission so failed requests never count as accepted)
        fault = self._pick_fault(key)
        if fault is Fault.SERVER_ERROR:
            self._record(t, conversation, key, 500, n, turn)
            return _json_response(500, error_body(_FAULT_500, "server_error"))
        if fault is Fault.UNAVAILABLE:
            self._record(t, conversation, key, 503, n, turn)
            body503 = error_body("The server is overloaded (injected fault).", "server_error")
            return _json_response(503, body503, self._retry_after_headers)
        if fault is Fault.DROP:
            self._record(t, conversation, key, 0, n, turn)
            return _drop(request)

        if self.rpm is not None:
            admitted_at = time.monotonic()
            self._window.append(admitted_at)
            rl_headers = {
                "x-ratelimit-limit-requests": str(self.rpm),
                "x-ratelimit-remaining-requests": str(max(0, self.rpm - len(self._window))),
            }

        # --- hang / latency, both cut short by shutdown
        delay = self._latency.draw(self._rng_latency)
        if fault is Fault.HANG:
            delay += self.hang_s
        if delay > 0 and not await self._sleep(delay):
            if self.rpm is not None:
                self._window.remove(admitted_at)  # never answered: give the slot back
            self._record(t, conversation, key, -1, n, turn)
            return _drop(request)

        payload = self._answer(asked)
        self._accepted.append(admitted_at if self.rpm is not None else t)
        self._record(t, conversation, key, 200, n, turn)
        return _json_response(200, payload, rl_headers)

    def answer_body(
        self, body: Mapping[str, Any], t: float, conversation: str | None, fault: bool = False
    ) -> tuple[int, dict[str, Any], RequestLogEntry]:
        """Answer one chat request body as the live route would, with no rate limit or
        latency (a batch line): its status, the chat.completion or error body, and the log
        entry for the caller to keep. ``fault``: a 500 instead of the answer. Must run on the
        server's loop."""
        try:
            asked = AskedTurn.read(json.dumps(body).encode())
        except BadChatRequest as exc:
            entry = RequestLogEntry(t, conversation, "", 400, 0, -1)
            return 400, error_body(str(exc), "invalid_request_error"), entry
        status, payload = 400, self._history_error(asked)
        if payload is None and fault:
            status, payload = 500, error_body(_FAULT_500, "server_error")
        elif payload is None:
            status, payload = 200, self._answer(asked)
        entry = RequestLogEntry(t, conversation, asked.key, status, len(asked.messages), asked.turn)
        return status, payload, entry

    def _history_error(self, asked: AskedTurn) -> dict[str, Any] | None:
        """The 400 body when an assistant message is not what this server answered."""
        shared, messages = self.shared_history, asked.messages
        for i in asked.assistant_at:
            prefix = asked.prefixes[i]
            if not in_history(self._answers, messages, i, prefix, shared, self.json_answers):
                self._history_errors += 1
                return error_body(f"history mismatch at message {i}", "invalid_request_error")
        return None

    def _answer(self, asked: AskedTurn) -> dict[str, Any]:
        """The chat.completion for a request that passed the history check; remembered so
        that later turns carrying it pass theirs."""
        body, messages, turn = asked.body, asked.messages, asked.turn
        answer = answer_for(turn, asked.last_user, asked.key)
        if (wanted := body.get("response_format")) is not None:
            answer = self.json_answers.answer(wanted, answer, turn, messages, asked.prefixes)
        finish_reason = "stop"
        if asked.max_tokens is not None and _tokens(len(answer)) > asked.max_tokens:
            # As a real model does: stop at max_tokens and say so.
            answer, finish_reason = answer[: 4 * asked.max_tokens], "length"
        self._answers[asked.key] = answer
        self._counter += 1
        sizes = [len(content_text(m["content"])) for m in messages]
        cached_tokens = None
        if self.prompt_cache is not None:
            held = self.prompt_cache.held(messages)
            cached_tokens = _tokens(sum(sizes[:held])) if held else 0
        return completion_body(
            f"chatcmpl-{self._counter}",
            body.get("model") or MODEL_ID,
            answer,
            _tokens(sum(sizes)),
            _tokens(len(answer)),
            finish_reason,
            cached_tokens,
        )

    def _pick_fault(self, key: str) -> Fault | None:
        """The fault for this attempt: deterministic with fault_first, else one random draw."""
        if self.fault_first is not None:
            attempt = self._attempts.get(key, 0)
            self._attempts[key] = attempt + 1
            if attempt >= self.fault_first:
                return None
            # Rotate per request and attempt, independent of arrival order under concurrency.
            rotation = self._rotation
            return rotation[(int(key[:8], 16) + attempt) % len(rotation)]
        if not self._fault_cum:
            return None
        u = self._rng_faults.random()
        for edge, kind in self._fault_cum:
            if u < edge:
                return kind
        return None


def _json_response(
    status: int, payload: Mapping[str, Any], headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(payload).encode(), headers=headers, content_type=_JSON
    )


def _set_result_if_pending(fut: asyncio.Future[bool], value: bool) -> None:
    if not fut.done():
        fut.set_result(value)


def _drop(request: web.Request) -> web.Response:
    """Close the connection with no response at all; the client sees a disconnect.

    aiohttp then fails to write the returned response to the closed transport, which it treats
    as a client disconnect and ignores quietly.
    """
    transport = request.transport
    if transport is not None:
        transport.close()
    return web.Response(status=204)
