"""Tests for ``nbllm serve``, over real HTTP on 127.0.0.1 (``Worker``: engines/test_worker.py).

The first part serves a FakeEngine in this process; the second serves in a child process,
to test the command and its signals. Every test stops the server it started. Requests an
engine holds wait on events, never on the clock.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import signal
import subprocess
import sys
import threading
from typing import Any

import aiohttp
import pytest

from nbllm.engines import FakeEngine, OpenAIEngine
from nbllm.engines.openai_wire import TIMEOUT_HEADER
from nbllm.engines.worker import ServeEngine
from nbllm.errors import (
    ConfigError,
    EngineError,
    RateLimitError,
    RequestRejected,
    RequestTimeout,
    ServerError,
)
from nbllm.serve import URL_LINE_PREFIX, EngineServer, ServeState, add_parser
from nbllm.serve.command import engine_factory
from nbllm.types import ChatRequest, ChatResponse

HELLO = [{"role": "user", "content": "hello"}]
KEY = "sk-serve-test-3f9a1c"


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "anything", "messages": HELLO, **extra}


async def fetch(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, str]:
    """Status, headers and body text of one request."""
    data = body if isinstance(body, (bytes, type(None))) else None
    json_body = None if isinstance(body, (bytes, type(None))) else body
    async with session.request(method, url, data=data, json=json_body, headers=headers) as resp:
        return resp.status, resp.headers, await resp.text()


class HeldRequests:
    """An engine handler that holds each request until ``release()``.

    ``arrived(n)`` returns once ``n`` requests have reached the engine, which is after the
    server admitted them.
    """

    def __init__(self) -> None:
        self.count = 0
        self._released = asyncio.Event()
        self._arrivals = asyncio.Condition()

    async def __call__(self, request: ChatRequest) -> str:
        async with self._arrivals:
            self.count += 1
            self._arrivals.notify_all()
        await self._released.wait()
        return f"You asked: {request.messages[-1]['content']}"

    async def arrived(self, n: int) -> None:
        async with self._arrivals:
            await asyncio.wait_for(self._arrivals.wait_for(lambda: self.count >= n), 10)

    def release(self) -> None:
        self._released.set()


def root(server_url: str) -> str:
    return server_url.removesuffix("/v1")


def assert_openai_error(text: str) -> dict[str, Any]:
    error = json.loads(text)["error"]
    assert set(error) == {"message", "type", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


# --------------------------------------------------------------------------- in process


async def test_round_trip_through_openai_engine() -> None:
    seen: list[ChatRequest] = []

    def handler(request: ChatRequest) -> str:
        seen.append(request)
        return f"echo: {request.messages[-1]['content']}"

    server = EngineServer(FakeEngine(handler), model="m-1", served_model_name="served-m")
    async with server, OpenAIEngine(server.url) as client:
        response = await client.complete(
            ChatRequest(
                model="some-other-name",
                messages=[{"role": "system", "content": "be brief"}, *HELLO],
                params={"max_completion_tokens": 7, "temperature": 0.2, "seed": 3, "stop": ["x"]},
            )
        )
    assert response.text == "echo: hello"
    assert response.model == "served-m"  # the served name, whatever the client asked for
    assert response.prompt_tokens is not None and response.completion_tokens is not None
    (request,) = seen
    assert request.model == "m-1"
    assert list(request.messages) == [{"role": "system", "content": "be brief"}, *HELLO]
    assert request.params == {"max_tokens": 7, "temperature": 0.2, "seed": 3, "stop": ["x"]}
    assert server.state is ServeState.CLOSED


async def test_the_engines_finish_reason_reaches_the_client() -> None:
    """A cut answer says "length" through the server; "stop" only where the engine said none."""

    class Engine(FakeEngine):
        async def _complete(self, request: ChatRequest) -> ChatResponse:
            said = request.messages[-1]["content"]
            if said == "silent":  # an engine that does not say why its answer ended
                return ChatResponse(text="ok", model="m")
            if said == "filtered":
                return ChatResponse(text="", model="m", finish_reason="content_filter")
            return await super()._complete(request)

    async with EngineServer(Engine(), model="m") as server, OpenAIEngine(server.url) as client:

        async def reason(content: str, **params: Any) -> str | None:
            request = ChatRequest("m", [{"role": "user", "content": content}], params)
            return (await client.complete(request)).finish_reason

        assert await reason("a question to cut short", max_tokens=2) == "length"
        assert await reason("a question to cut short") == "stop"
        assert await reason("filtered") == "content_filter"
        assert await reason("silent") == "stop"


async def test_the_engines_cached_prompt_tokens_reach_a_workers_client() -> None:
    """What a local engine took from its prefix cache goes where OpenAI puts it, so the
    client of a worker (``worker=True``) reads it; an engine that does not say: None."""

    class Engine(FakeEngine):
        async def _complete(self, request: ChatRequest) -> ChatResponse:
            said = request.messages[-1]["content"]
            cached = None if said == "silent" else len(request.messages) - 1
            return ChatResponse("ok", "m", 10 * len(request.messages), 1, cached_tokens=cached)

    async with EngineServer(Engine(), model="m") as server, ServeEngine(server.url) as client:
        history = [*HELLO, {"role": "assistant", "content": "ok"}]
        request = ChatRequest("m", [*history, {"role": "user", "content": "and then?"}])
        assert (await client.complete(request)).cached_tokens == 2
        silent = ChatRequest("m", [{"role": "user", "content": "silent"}])
        assert (await client.complete(silent)).cached_tokens is None


async def test_completion_json_models_health_and_ready() -> None:
    async with (
        EngineServer(FakeEngine(), model="m") as server,
        aiohttp.ClientSession() as session,
    ):
        async with session.post(server.url + "/chat/completions", json=chat_body()) as resp:
            assert resp.status == 200
            payload = await resp.json()
        assert payload["object"] == "chat.completion"
        assert payload["id"].startswith("chatcmpl-")
        assert payload["model"] == "m"
        assert payload["choices"][0]["message"] == {
            "role": "assistant",
            "content": "You asked: hello",
        }
        assert payload["choices"][0]["finish_reason"] == "stop"
        usage = payload["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

        async with session.get(server.url + "/models") as resp:
            assert resp.status == 200
            models = await resp.json()
        assert models["object"] == "list"
        assert [m["id"] for m in models["data"]] == ["m"]
        assert models["data"][0]["object"] == "model"

        async with session.get(root(server.url) + "/health") as resp:
            assert (resp.status, await resp.json()) == (200, {"status": "ok"})
        async with session.get(root(server.url) + "/ready") as resp:
            body = await resp.json()
            ready = {"status": "ready", "model": "m", "engine": "fake", "max_in_flight": None}
            assert (resp.status, body) == (200, ready)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        ({"model": "m"}, "'messages'"),
        ({"model": "m", "messages": []}, "'messages'"),
        ({"model": "m", "messages": [{"role": "user"}]}, "messages[0].content"),
        ({"model": "m", "messages": ["hi"]}, "messages[0]"),
        (chat_body(stream=True), "streaming is not supported"),
        (chat_body(temperature="hot"), "'temperature'"),
        (chat_body(max_tokens=True), "'max_tokens'"),
        (chat_body(n=2), "n=1"),
    ],
)
async def test_bad_body_is_400(body: Any, fragment: str) -> None:
    engine = FakeEngine()
    async with EngineServer(engine, model="m") as server, aiohttp.ClientSession() as session:
        status, _, text = await fetch(session, "POST", server.url + "/chat/completions", body)
    assert status == 400
    error = assert_openai_error(text)
    assert fragment in error["message"]
    assert error["type"] == "invalid_request_error"
    assert engine.calls == 0


async def test_api_key_required_on_v1_only_and_never_echoed() -> None:
    server = EngineServer(FakeEngine(), model="m", api_key=KEY)
    texts: list[str] = []
    async with server, aiohttp.ClientSession() as session:
        chat = server.url + "/chat/completions"
        for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            status, _, text = await fetch(session, "POST", chat, chat_body(), headers)
            assert status == 401
            assert assert_openai_error(text)["code"] == "invalid_api_key"
            texts.append(text)
        status, _, text = await fetch(session, "GET", server.url + "/models")
        assert status == 401
        texts.append(text)
        for path in ("/health", "/ready"):  # probes stay open
            status, _, text = await fetch(session, "GET", root(server.url) + path)
            assert status == 200
            texts.append(text)
        good = {"Authorization": f"Bearer {KEY}"}
        status, _, text = await fetch(session, "POST", chat, chat_body(), good)
        assert status == 200
        texts.append(text)
    assert not any(KEY in t for t in texts)
    assert KEY not in repr(server)

    server = EngineServer(FakeEngine(), model="m", api_key=KEY)
    async with server, OpenAIEngine(server.url, api_key=KEY) as client:
        response = await client.complete(ChatRequest(model="m", messages=HELLO))
    assert response.text == "You asked: hello"


async def test_full_queue_answers_429_with_retry_after() -> None:
    held = HeldRequests()
    engine = FakeEngine(held)
    async with (
        EngineServer(engine, model="m", max_queue=2) as server,
        aiohttp.ClientSession() as session,
    ):
        chat = server.url + "/chat/completions"
        requests = [
            asyncio.create_task(fetch(session, "POST", chat, chat_body())) for _ in range(5)
        ]
        await held.arrived(2)
        # The two admitted requests are held: the other three are answered at once.
        refused: set[asyncio.Task[tuple[int, Any, str]]] = set()
        pending = set(requests)
        while len(refused) < 3:
            done, pending = await asyncio.wait(
                pending, timeout=10, return_when=asyncio.FIRST_COMPLETED
            )
            assert done, "three requests should have been refused"
            refused |= done
        assert len(refused) == 3
        for task in refused:
            status, headers, text = task.result()
            assert status == 429  # every request got an answer
            assert int(headers["Retry-After"]) >= 1
            assert assert_openai_error(text)["code"] == "queue_full"
        held.release()
        assert [status for status, _, _ in await asyncio.gather(*requests)].count(200) == 2
        # Once the queue has room again, requests are admitted.
        status, _, _ = await fetch(session, "POST", chat, chat_body())
        assert status == 200
    assert engine.calls == 3


@pytest.mark.parametrize(
    ("error", "status", "retry_after"),
    [
        (RequestRejected("the prompt is too long", status=422), 422, None),
        (RequestRejected("local engines do not support logprobs"), 400, None),
        (RateLimitError("slow down", status=429, retry_after=2.5), 429, "3"),
        (ServerError("the GPU is busy", status=503, retry_after=0.2), 503, "1"),
        (RequestTimeout("no batch slot freed within the 2 s timeout"), 504, None),
        (EngineError("something broke"), 500, None),
        (EngineError("odd status", status=200), 500, None),
    ],
)
async def test_engine_error_maps_to_its_status(
    error: EngineError, status: int, retry_after: str | None
) -> None:
    def handler(request: ChatRequest) -> str:
        raise error

    # relay_errors: the messages of a local engine reach the client (nbllm serve's choice
    # for local engines; test_serve_hardening.py has the generic text of an API engine).
    async with (
        EngineServer(FakeEngine(handler), model="m", relay_errors=True) as server,
        aiohttp.ClientSession() as session,
    ):
        got, headers, text = await fetch(
            session, "POST", server.url + "/chat/completions", chat_body()
        )
    assert got == status
    assert headers.get("Retry-After") == retry_after
    assert assert_openai_error(text)["message"] == str(error)


async def test_the_timeout_header_becomes_the_engines_request_timeout() -> None:
    """X-Nbllm-Timeout is the request's timeout for the engine to apply; without it there is
    none, and a value that is not seconds > 0 is refused before the engine sees it."""
    seen: list[float | None] = []

    def handler(request: ChatRequest) -> str:
        seen.append(request.timeout)
        return "ok"

    async with (
        EngineServer(FakeEngine(handler), model="m") as server,
        aiohttp.ClientSession() as session,
    ):
        chat = server.url + "/chat/completions"
        for headers in (None, {TIMEOUT_HEADER: "2.5"}, {TIMEOUT_HEADER.lower(): "120"}):
            status, _, _ = await fetch(session, "POST", chat, chat_body(), headers)
            assert status == 200
        for bad in ("0", "-1", "soon", "nan", "inf", ""):
            status, _, text = await fetch(session, "POST", chat, chat_body(), {TIMEOUT_HEADER: bad})
            assert status == 400
            assert TIMEOUT_HEADER in assert_openai_error(text)["message"]
    assert seen == [None, 2.5, 120.0]


async def test_an_engine_timeout_comes_back_to_nbllm_as_a_request_timeout() -> None:
    """The engine's RequestTimeout is 504 with its own code: nbllm's client reads it back as
    a RequestTimeout (retried), while any other 504 stays a ServerError."""

    def handler(request: ChatRequest) -> str:
        if request.messages[-1]["content"] == "upstream":
            raise ServerError("the upstream gateway timed out", status=504)
        raise RequestTimeout("no batch slot freed within the 2 s timeout")

    async with (
        EngineServer(FakeEngine(handler), model="m", relay_errors=True) as server,
        aiohttp.ClientSession() as session,
        OpenAIEngine(server.url) as client,
    ):
        status, _, text = await fetch(
            session, "POST", server.url + "/chat/completions", chat_body()
        )
        assert status == 504
        error = assert_openai_error(text)
        assert (error["type"], error["code"]) == ("server_error", "request_timeout")
        with pytest.raises(RequestTimeout, match="no batch slot freed") as timed_out:
            await client.complete(ChatRequest(model="m", messages=HELLO))
        assert timed_out.value.status == 504
        upstream = [{"role": "user", "content": "upstream"}]
        with pytest.raises(ServerError) as other:
            await client.complete(ChatRequest(model="m", messages=upstream))
        assert not isinstance(other.value, RequestTimeout)
        assert other.value.status == 504


async def test_a_client_that_disconnects_leaves_no_generation_running() -> None:
    """A worker's request given up mid-generation (a stopped run) closes its connection,
    and the server cancels the engine call: nothing runs on that nobody will read."""
    arrived, cancelled = asyncio.Event(), asyncio.Event()
    running = 0

    async def generate(request: ChatRequest) -> str:
        nonlocal running
        running += 1
        arrived.set()
        try:
            await asyncio.Event().wait()  # a generation that would run for ever
        except asyncio.CancelledError:
            cancelled.set()
            raise
        finally:
            running -= 1
        return "never"

    server = await EngineServer(FakeEngine(generate), model="m", grace=30).start()
    try:
        async with ServeEngine(server.url) as client:
            request = ChatRequest(model="m", messages=HELLO, timeout=0.1)
            sent = asyncio.create_task(client.complete(request))
            await asyncio.wait_for(arrived.wait(), 10)
            assert server.in_flight == 1
            sent.cancel()
            await asyncio.wait_for(cancelled.wait(), 10)
            assert running == 0
    finally:
        # Nothing is left in flight: the drain does not wait out its 30 s grace.
        await asyncio.wait_for(server.aclose(), 5)
    assert server.in_flight == 0


async def test_unexpected_engine_exception_is_500_without_traceback() -> None:
    def handler(request: ChatRequest) -> str:
        raise ValueError("internal detail")

    async with (
        EngineServer(FakeEngine(handler), model="m") as server,
        aiohttp.ClientSession() as session,
    ):
        status, _, text = await fetch(
            session, "POST", server.url + "/chat/completions", chat_body()
        )
    assert status == 500
    assert "Traceback" not in text
    assert assert_openai_error(text)["type"] == "server_error"


async def test_slow_load_503_until_ready() -> None:
    loaded = threading.Event()

    def load() -> FakeEngine:
        loaded.wait(5)
        return FakeEngine()

    async with EngineServer(load, model="m") as server, aiohttp.ClientSession() as session:
        status, _, text = await fetch(session, "GET", root(server.url) + "/ready")
        assert (status, text) == (503, '{"status": "loading"}')
        status, _, _ = await fetch(session, "GET", root(server.url) + "/health")
        assert status == 200
        status, headers, _ = await fetch(
            session, "POST", server.url + "/chat/completions", chat_body()
        )
        assert (status, headers["Retry-After"]) == (503, "1")
        loaded.set()
        assert await asyncio.wait_for(server.wait_loaded(), 5) is ServeState.READY
        status, _, _ = await fetch(session, "GET", root(server.url) + "/ready")
        assert status == 200
        status, _, _ = await fetch(session, "POST", server.url + "/chat/completions", chat_body())
        assert status == 200


async def test_failed_load_is_reported_by_ready_and_refuses_chat() -> None:
    def load() -> FakeEngine:
        raise ConfigError("no such model: nope")

    server = EngineServer(load, model="m", api_key="k")
    async with server, aiohttp.ClientSession() as session:
        assert await asyncio.wait_for(server.wait_loaded(), 5) is ServeState.FAILED
        async with session.get(root(server.url) + "/ready") as resp:
            # /ready is open to all: why it failed (a path, memory figures) only with the key
            assert resp.status == 503
            assert await resp.json() == {"status": "failed"}
        key = {"Authorization": "Bearer k"}
        async with session.get(root(server.url) + "/ready", headers=key) as resp:
            assert resp.status == 503
            assert await resp.json() == {
                "status": "failed",
                "error": "ConfigError: no such model: nope",
            }
        async with session.post(
            server.url + "/chat/completions", json=chat_body(), headers=key
        ) as resp:
            assert resp.status == 503
            assert "no such model" in assert_openai_error(await resp.text())["message"]


async def test_a_failed_load_is_not_explained_to_a_server_without_a_key() -> None:
    def load() -> FakeEngine:
        raise ConfigError("no such model: /home/someone/private/model")

    async with EngineServer(load, model="m") as server, aiohttp.ClientSession() as session:
        assert await asyncio.wait_for(server.wait_loaded(), 5) is ServeState.FAILED
        status, _, text = await fetch(session, "GET", root(server.url) + "/ready")
        assert (status, json.loads(text)) == (503, {"status": "failed"})
        status, _, text = await fetch(
            session, "POST", server.url + "/chat/completions", chat_body()
        )
        assert status == 503
        assert assert_openai_error(text)["message"] == "the engine failed to load"


async def test_wait_loaded_returns_at_once_for_an_engine_instance() -> None:
    async with EngineServer(FakeEngine(), model="m") as server:
        assert await server.wait_loaded() is ServeState.READY


async def test_drain_answers_in_flight_and_refuses_new() -> None:
    held = HeldRequests()
    engine = FakeEngine(held)
    server = await EngineServer(engine, model="m").start()
    async with aiohttp.ClientSession() as session:
        chat = server.url + "/chat/completions"
        in_flight = [
            asyncio.create_task(fetch(session, "POST", chat, chat_body())) for _ in range(3)
        ]
        await held.arrived(3)
        assert server.in_flight == 3
        closing = asyncio.create_task(server.aclose())
        await asyncio.sleep(0)  # aclose() starts draining before its first await
        assert server.state is ServeState.DRAINING
        status, _, text = await fetch(session, "GET", root(server.url) + "/ready")
        assert (status, text) == (503, '{"status": "draining"}')
        status, _, text = await fetch(session, "POST", chat, chat_body())
        assert status == 503
        assert assert_openai_error(text)["code"] == "draining"
        assert not closing.done()  # still waiting for the three
        held.release()
        assert [status for status, _, _ in await asyncio.gather(*in_flight)] == [200] * 3
        await closing
    assert server.state is ServeState.CLOSED
    assert engine.state.value == "closed"


async def test_grace_bounds_the_drain_and_cut_off_requests_get_503() -> None:
    held = HeldRequests()  # never released: only the end of the grace period ends it
    server = await EngineServer(FakeEngine(held), model="m", grace=0.3).start()
    async with aiohttp.ClientSession() as session:
        request = asyncio.create_task(
            fetch(session, "POST", server.url + "/chat/completions", chat_body())
        )
        await held.arrived(1)
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(server.aclose(), 5)
        assert asyncio.get_running_loop().time() - started < 1.5
        status, _, text = await request
    assert status == 503
    assert assert_openai_error(text)["code"] == "shutdown"


async def test_a_taken_port_is_a_clear_error() -> None:
    async with EngineServer(FakeEngine(), model="m") as first:
        port = int(first.url.rsplit(":", 1)[1].removesuffix("/v1"))
        second = EngineServer(FakeEngine(), model="m", port=port)
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            await second.start()


def test_bad_options_are_refused() -> None:
    with pytest.raises(ConfigError, match="max_queue"):
        EngineServer(FakeEngine(), model="m", max_queue=0)
    with pytest.raises(ConfigError, match="grace"):
        EngineServer(FakeEngine(), model="m", grace=-1)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--max-queue", "0"])


def test_engine_factory_passes_local_options_and_never_nests_a_worker() -> None:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(
        ["serve", "--engine", "torch", "--batch-size", "8", "--batch-wait-ms", "5"]
    )
    factory = engine_factory(args)
    assert isinstance(factory, functools.partial)
    assert factory.args == ("torch",)
    assert factory.keywords == {
        "model": None,
        "worker": False,
        "batch_size": 8,
        "batch_wait_s": 0.005,
    }


# --------------------------------------------------------------------------- subprocess

# Serves like ``nbllm serve`` (the command's own signal handling), with an engine that says
# on stdout when it holds a request and holds each until a line comes on stdin: a test
# signals only once requests are in flight, and they end only when the test says so.
SERVE_IN_CHILD = """
import asyncio, contextlib, logging, sys, threading
from nbllm.engines import FakeEngine
from nbllm.serve import EngineServer
from nbllm.serve.command import serve_until_signal

logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")

async def main():
    loop = asyncio.get_running_loop()
    released = asyncio.Event()

    def wait_for_stdin():
        sys.stdin.readline()
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to release
            loop.call_soon_threadsafe(released.set)

    threading.Thread(target=wait_for_stdin, daemon=True).start()

    async def answer(request):
        print("holding a request", flush=True)
        await released.wait()
        return "You asked: hello"

    await serve_until_signal(EngineServer(FakeEngine(answer), model="m", grace=30))

asyncio.run(main())
"""


class ServingChild:
    """``SERVE_IN_CHILD`` in a child process: ``line()`` reads its stdout."""

    def __init__(self) -> None:
        command = [sys.executable, "-c", SERVE_IN_CHILD]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )

    async def line(self) -> str:
        assert self.process.stdout is not None
        raw = await asyncio.wait_for(asyncio.to_thread(self.process.stdout.readline), 10)
        return raw.decode().rstrip("\n")

    async def wait_for_line(self, prefix: str) -> str:
        while not (line := await self.line()).startswith(prefix):
            assert line, f"the child exited before printing {prefix!r}"
        return line

    def release(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(b"release\n")
        self.process.stdin.flush()

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def wait(self) -> int:
        return self.process.wait(10)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


async def test_sigterm_finishes_requests_in_flight_then_exits_0() -> None:
    child = ServingChild()
    try:
        url = (await child.line()).removeprefix(URL_LINE_PREFIX)
        async with OpenAIEngine(url) as client:
            in_flight = [
                asyncio.create_task(client.complete(ChatRequest(model="m", messages=HELLO)))
                for _ in range(3)
            ]
            for _ in range(3):
                assert await child.line() == "holding a request"
            child.terminate()
            assert await child.wait_for_line("draining") == "draining 3 request(s), up to 30 s"
            async with aiohttp.ClientSession() as session:
                status, _, text = await fetch(session, "GET", root(url) + "/ready")
                assert (status, text) == (503, '{"status": "draining"}')
            with pytest.raises(ServerError) as refused:
                await client.complete(ChatRequest(model="m", messages=HELLO))
            assert refused.value.status == 503
            child.release()
            answers = await asyncio.gather(*in_flight)
        assert [a.text for a in answers] == ["You asked: hello"] * 3
        assert await asyncio.to_thread(child.wait) == 0
    finally:
        child.close()


async def test_second_signal_cuts_the_drain_short() -> None:
    child = ServingChild()  # never released: only the second signal ends the request
    try:
        url = (await child.line()).removeprefix(URL_LINE_PREFIX)
        async with OpenAIEngine(url) as client:
            request = asyncio.create_task(client.complete(ChatRequest(model="m", messages=HELLO)))
            assert await child.line() == "holding a request"
            child.terminate()
            await child.wait_for_line("draining")
            child.terminate()
            with pytest.raises(ServerError, match="shut down before the answer"):
                await asyncio.wait_for(request, 5)
        assert await asyncio.to_thread(child.wait) == 0
    finally:
        child.close()


def test_the_nbllm_command_has_serve() -> None:
    from nbllm import cli, serve

    args = cli.build_parser().parse_args(["serve", "--engine", "fake", "--port", "0"])
    assert args.handler is serve.main


def test_serve_prints_one_url_line_and_exits_0_on_sigint() -> None:
    command = [sys.executable, "-m", "nbllm", "serve", "--engine", "fake", "--port", "0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
    ) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline().decode()
            assert line.startswith(URL_LINE_PREFIX + "http://127.0.0.1:")
            assert line.endswith("/v1\n")
            process.send_signal(signal.SIGINT)
            assert process.wait(10) == 0
            assert process.stdout.read() == b""
        finally:
            if process.poll() is None:
                process.kill()
