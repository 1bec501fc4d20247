"""Tests for ``nbllm serve`` and ``Worker``, over real HTTP on 127.0.0.1.

The first part serves a FakeEngine in this process; the second runs ``python -m nbllm serve``
in a child process, as ``Worker`` does. Every test stops the server it started.
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
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from nbllm.engines import EMBEDDED_MODEL, FakeEngine, OpenAIEngine
from nbllm.engines.worker import (
    Worker,
    WorkerState,
    local_option_args,
    shared_worker,
    stop_all_workers,
)
from nbllm.errors import (
    ConfigError,
    ConnectionFailed,
    EngineError,
    EngineUnavailable,
    RateLimitError,
    RequestRejected,
    ServerError,
)
from nbllm.serve import URL_LINE_PREFIX, EngineServer, ServeState, add_parser, engine_factory
from nbllm.types import ChatRequest

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


def _get_json_status(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.read().decode()


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
    engine = FakeEngine(latency=1.0)
    async with (
        EngineServer(engine, model="m", max_queue=2) as server,
        aiohttp.ClientSession() as session,
    ):
        chat = server.url + "/chat/completions"
        results = await asyncio.gather(
            *(fetch(session, "POST", chat, chat_body()) for _ in range(5))
        )
        statuses = sorted(status for status, _, _ in results)
        assert statuses == [200, 200, 429, 429, 429]  # every request got an answer
        for status, headers, text in results:
            if status == 429:
                assert int(headers["Retry-After"]) >= 1
                assert assert_openai_error(text)["code"] == "queue_full"
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
        (EngineError("something broke"), 500, None),
        (EngineError("odd status", status=200), 500, None),
    ],
)
async def test_engine_error_maps_to_its_status(
    error: EngineError, status: int, retry_after: str | None
) -> None:
    def handler(request: ChatRequest) -> str:
        raise error

    async with (
        EngineServer(FakeEngine(handler), model="m") as server,
        aiohttp.ClientSession() as session,
    ):
        got, headers, text = await fetch(
            session, "POST", server.url + "/chat/completions", chat_body()
        )
    assert got == status
    assert headers.get("Retry-After") == retry_after
    assert assert_openai_error(text)["message"] == str(error)


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
        for _ in range(100):
            if server.state is ServeState.READY:
                break
            await asyncio.sleep(0.02)
        status, _, _ = await fetch(session, "GET", root(server.url) + "/ready")
        assert status == 200
        status, _, _ = await fetch(session, "POST", server.url + "/chat/completions", chat_body())
        assert status == 200


async def test_failed_load_is_reported_by_ready_and_refuses_chat() -> None:
    def load() -> FakeEngine:
        raise ConfigError("no such model: nope")

    async with EngineServer(load, model="m") as server, aiohttp.ClientSession() as session:
        for _ in range(100):
            if server.state is ServeState.FAILED:
                break
            await asyncio.sleep(0.02)
        async with session.get(root(server.url) + "/ready") as resp:
            assert resp.status == 503
            assert await resp.json() == {
                "status": "failed",
                "error": "ConfigError: no such model: nope",
            }
        status, _, text = await fetch(
            session, "POST", server.url + "/chat/completions", chat_body()
        )
        assert status == 503
        assert "no such model" in assert_openai_error(text)["message"]


async def test_drain_answers_in_flight_and_refuses_new() -> None:
    engine = FakeEngine(latency=0.6)
    server = await EngineServer(engine, model="m").start()
    async with aiohttp.ClientSession() as session:
        chat = server.url + "/chat/completions"
        in_flight = [
            asyncio.create_task(fetch(session, "POST", chat, chat_body())) for _ in range(3)
        ]
        while server.in_flight < 3:
            await asyncio.sleep(0.01)
        closing = asyncio.create_task(server.aclose())
        await asyncio.sleep(0.05)
        assert server.state is ServeState.DRAINING
        status, _, text = await fetch(session, "GET", root(server.url) + "/ready")
        assert (status, text) == (503, '{"status": "draining"}')
        status, _, text = await fetch(session, "POST", chat, chat_body())
        assert status == 503
        assert assert_openai_error(text)["code"] == "draining"
        assert [status for status, _, _ in await asyncio.gather(*in_flight)] == [200] * 3
        await closing
    assert server.state is ServeState.CLOSED
    assert engine.state.value == "closed"


async def test_grace_bounds_the_drain_and_cut_off_requests_get_503() -> None:
    server = await EngineServer(FakeEngine(latency=30), model="m", grace=0.3).start()
    async with aiohttp.ClientSession() as session:
        request = asyncio.create_task(
            fetch(session, "POST", server.url + "/chat/completions", chat_body())
        )
        while server.in_flight < 1:
            await asyncio.sleep(0.01)
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
    assert local_option_args(batch_size=8, batch_wait_s=0.005, device="cpu") == [
        "--batch-size",
        "8",
        "--batch-wait-ms",
        "5",
        "--device",
        "cpu",
    ]


# --------------------------------------------------------------------------- subprocess


def test_worker_command_and_key_stay_off_the_command_line() -> None:
    worker = Worker("torch", "org/model", options=["--batch-size", "8"], api_key=KEY)
    assert worker.command == [
        sys.executable,
        "-m",
        "nbllm",
        "serve",
        "--engine",
        "torch",
        "--model",
        "org/model",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--batch-size",
        "8",
    ]
    assert KEY not in repr(worker)
    with pytest.raises(ConfigError, match="--api-key"):
        Worker("fake", options=["--api-key", KEY])
    embedded = Worker("torch")
    assert "--model" not in embedded.command
    assert embedded.model == EMBEDDED_MODEL
    assert worker.stop() is None  # never started
    assert worker.state is WorkerState.STOPPED


async def test_worker_serves_with_a_key_and_stops_cleanly() -> None:
    worker = Worker("fake", api_key=KEY)
    await asyncio.to_thread(worker.start)
    try:
        assert worker.url.startswith("http://127.0.0.1:")
        cmdline = Path(f"/proc/{worker.pid}/cmdline")
        if cmdline.exists():
            assert KEY.encode() not in cmdline.read_bytes()
        async with worker.engine() as client:
            response = await client.complete(ChatRequest(model=worker.model, messages=HELLO))
        assert response.text == "You asked: hello"
        async with aiohttp.ClientSession() as session:
            status, _, text = await fetch(session, "GET", worker.url + "/models")
        assert status == 401
        assert KEY not in text
    finally:
        code = await asyncio.to_thread(worker.stop, 10)
    assert code == 0
    assert worker.stop() == 0  # idempotent
    with pytest.raises(RuntimeError, match="stopped"):
        _ = worker.url
    assert KEY not in worker.stderr_tail()


async def test_subprocess_ready_is_503_while_the_model_loads() -> None:
    worker = Worker("fake", options=["--fake-load-s", "1.5"])
    await asyncio.to_thread(worker.start, wait=False)
    try:
        async with aiohttp.ClientSession() as session:
            status, _, text = await fetch(session, "GET", root(worker.url) + "/ready")
            assert (status, text) == (503, '{"status": "loading"}')
            status, _, _ = await fetch(session, "GET", root(worker.url) + "/health")
            assert status == 200
            await asyncio.to_thread(worker.wait_ready)
            status, _, _ = await fetch(session, "GET", root(worker.url) + "/ready")
            assert status == 200
    finally:
        assert await asyncio.to_thread(worker.stop, 10) == 0


async def test_sigterm_finishes_requests_in_flight_then_exits_0() -> None:
    worker = Worker("fake", options=["--fake-latency", "1.5"])
    await asyncio.to_thread(worker.start)
    try:
        url = worker.url
        async with worker.engine() as client:
            in_flight = [
                asyncio.create_task(client.complete(ChatRequest(model="m", messages=HELLO)))
                for _ in range(3)
            ]
            await asyncio.sleep(0.5)  # the requests reach the server
            assert worker.pid is not None
            os.kill(worker.pid, signal.SIGTERM)
            await asyncio.sleep(0.2)
            async with aiohttp.ClientSession() as session:
                status, _, text = await fetch(session, "GET", root(url) + "/ready")
            assert (status, text) == (503, '{"status": "draining"}')
            with pytest.raises((ServerError, ConnectionFailed)) as refused:
                await client.complete(ChatRequest(model="m", messages=HELLO))
            if isinstance(refused.value, ServerError):
                assert refused.value.status == 503
            answers = await asyncio.gather(*in_flight)
        assert [a.text for a in answers] == ["You asked: hello"] * 3
    finally:
        code = await asyncio.to_thread(worker.stop, 10)
    assert code == 0


@pytest.mark.parametrize(
    ("engine", "model", "fragment"),
    [("openai", "some-model", "api_base"), ("no-such-engine", "some-model", "no-such-engine")],
)
def test_worker_says_why_the_engine_cannot_load(engine: str, model: str, fragment: str) -> None:
    worker = Worker(engine, model)
    with pytest.raises(EngineUnavailable, match=fragment):
        worker.start()
    assert worker.state is WorkerState.STOPPED
    assert worker.stop() is not None  # the child was stopped


def test_shared_worker_is_reused_requires_its_random_key_and_stops_at_exit() -> None:
    try:
        worker = shared_worker("fake", None)
        assert shared_worker("fake", None) is worker
        status, _ = _get_json_status(worker.url + "/models")
        assert status == 401  # a random key guards it from other users of this machine
    finally:
        stop_all_workers()
    assert worker.state is WorkerState.STOPPED
    assert worker.stop() == 0


async def test_second_signal_cuts_the_drain_short() -> None:
    worker = Worker("fake", options=["--fake-latency", "30", "--grace", "30"])
    await asyncio.to_thread(worker.start)
    try:
        async with worker.engine() as client:
            request = asyncio.create_task(client.complete(ChatRequest(model="m", messages=HELLO)))
            await asyncio.sleep(0.5)
            assert worker.pid is not None
            os.kill(worker.pid, signal.SIGTERM)
            await asyncio.sleep(0.2)
            os.kill(worker.pid, signal.SIGTERM)
            with pytest.raises(ServerError, match="shut down before the answer"):
                await asyncio.wait_for(request, 5)
    finally:
        code = await asyncio.to_thread(worker.stop, 10)
    assert code == 0


def test_worker_start_timeout_is_a_clear_error() -> None:
    worker = Worker("fake", start_timeout=0.01)
    with pytest.raises(EngineUnavailable, match=r"did not start listening within 0\.01 s"):
        worker.start()
    assert worker.state is WorkerState.STOPPED


def test_worker_reports_a_child_that_exits_before_listening() -> None:
    worker = Worker("fake", options=["--max-queue", "0"])
    with pytest.raises(EngineUnavailable, match=r"exit code 2[\s\S]*--max-queue"):
        worker.start()
    assert worker.state is WorkerState.STOPPED


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
