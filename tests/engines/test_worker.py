"""Tests for ``Worker``: ``python -m nbllm serve`` in a child process, over real HTTP.

Every test stops the worker it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import pytest

import nbllm
from nbllm import Executor, RetryPolicy
from nbllm.engines import EMBEDDED_MODEL, Engine, FakeEngine, OpenAIEngine
from nbllm.engines import worker as worker_module
from nbllm.engines.child_process import ServerStartError
from nbllm.engines.local.batching import DynamicBatcher
from nbllm.engines.worker import (
    ServeEngine,
    Worker,
    WorkerState,
    local_option_args,
    shared_worker,
    stop_all_workers,
)
from nbllm.errors import ConfigError, ConnectionFailed, EngineUnavailable, RequestTimeout
from nbllm.serve import EngineServer
from nbllm.types import ChatRequest, ChatResponse

HELLO = [{"role": "user", "content": "hello"}]
KEY = "sk-serve-test-3f9a1c"


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.text()


def get_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        with err:
            return err.code


def root(server_url: str) -> str:
    return server_url.removesuffix("/v1")


def test_local_options_become_serve_arguments() -> None:
    assert local_option_args(batch_size=8, batch_wait_s=0.005, device="cpu") == [
        "--batch-size",
        "8",
        "--batch-wait-ms",
        "5",
        "--device",
        "cpu",
    ]
    assert local_option_args() == []


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
        "--stop-on-stdin-eof",
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
        status, text = await get(worker.url + "/models")
        assert status == 401
        assert KEY not in text
    finally:
        code = await asyncio.to_thread(worker.stop, 10)
    assert code == 0
    assert worker.stop() == 0  # idempotent
    with pytest.raises(RuntimeError, match="stopped"):
        _ = worker.url
    assert KEY not in worker.stderr_tail()


async def test_ready_is_503_while_the_model_loads() -> None:
    worker = Worker("fake", options=["--fake-load-s", "1.5"])
    await asyncio.to_thread(worker.start, wait=False)
    try:
        assert await get(root(worker.url) + "/ready") == (503, '{"status": "loading"}')
        assert (await get(root(worker.url) + "/health"))[0] == 200
        await asyncio.to_thread(worker.wait_ready)
        assert (await get(root(worker.url) + "/ready"))[0] == 200
    finally:
        assert await asyncio.to_thread(worker.stop, 10) == 0


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
        # A random key guards it from other users of this machine.
        assert get_status(worker.url + "/models") == 401
    finally:
        stop_all_workers()
    assert worker.state is WorkerState.STOPPED
    assert worker.stop() == 0


def test_shared_worker_refuses_unknown_local_options() -> None:
    with pytest.raises(ConfigError, match="batch_size, batch_wait_s, device"):
        shared_worker("fake", None, batch=4)


def test_worker_start_timeout_is_a_clear_error() -> None:
    worker = Worker("fake", start_timeout=0.01)
    with pytest.raises(EngineUnavailable, match=r"did not start listening within 0\.01 s"):
        worker.start()
    assert worker.state is WorkerState.STOPPED
    assert worker.pid is not None and not worker.running


def test_worker_reports_a_child_that_exits_before_listening() -> None:
    worker = Worker("fake", options=["--max-queue", "0"])
    with pytest.raises(EngineUnavailable, match=r"exit code 2[\s\S]*--max-queue") as info:
        worker.start()
    assert isinstance(info.value, ServerStartError)
    assert worker.state is WorkerState.STOPPED


# --------------------------------------------------------------------------- timeouts


class OneAtATime(Engine):
    """A local engine's shape: the real batcher, one generation at a time, the request's
    timeout bounding only the wait for the model. Each generation runs until ``finish``."""

    name = "one-at-a-time"
    bounds_own_timeout = True

    def __init__(self) -> None:
        super().__init__()
        self.generating = threading.Event()
        self.finish = threading.Event()
        self.timeouts: list[float | None] = []
        self._batcher = DynamicBatcher(self._generate, max_batch_size=1, max_wait_s=0)

    def _generate(self, prompts: Sequence[str]) -> list[str]:  # in the model thread
        self.generating.set()
        self.finish.wait(10)
        return [f"answer to {p}" for p in prompts]

    async def _complete(self, request: ChatRequest) -> ChatResponse:
        self.timeouts.append(request.timeout)
        prompt = str(request.messages[-1]["content"])
        text = await self._batcher.submit(prompt, timeout=request.timeout)
        return ChatResponse(text=text, model=request.model, finish_reason="stop")

    async def aclose(self) -> None:
        await self._batcher.aclose()
        await super().aclose()


def ask(content: str, timeout: float | None) -> ChatRequest:
    return ChatRequest(model="m", messages=[{"role": "user", "content": content}], timeout=timeout)


def test_only_the_worker_engine_leaves_the_timeout_to_the_server() -> None:
    assert ServeEngine("http://127.0.0.1:1/v1").bounds_own_timeout
    assert not OpenAIEngine("http://127.0.0.1:1/v1").bounds_own_timeout


@pytest.mark.skipif(sys.platform != "linux", reason="Linux drops a SYN to a full backlog")
async def test_the_worker_engine_still_bounds_the_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no deadline on the answer, a server that never accepts is still given up."""
    monkeypatch.setattr(worker_module, "CONNECT_TIMEOUT_S", 0.2)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        waiting = [socket.socket() for _ in range(3)]  # fill the backlog: no more accepted
        try:
            for sock in waiting:
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    sock.connect(("127.0.0.1", port))
            async with ServeEngine(f"http://127.0.0.1:{port}/v1") as client:
                with pytest.raises(ConnectionFailed, match=r"no connection .* within 0\.2 s"):
                    await asyncio.wait_for(client.complete(ask("hello", 60)), 10)
        finally:
            for sock in waiting:
                sock.close()


async def test_a_generation_outlives_its_timeout_while_a_queued_request_times_out() -> None:
    """Through nbllm serve as in process: the timeout bounds the wait for the model, and a
    request that waited too long is a RequestTimeout (retryable), not a server error."""
    engine = OneAtATime()
    async with EngineServer(engine, model="m") as server, ServeEngine(server.url) as client:
        first = asyncio.create_task(client.complete(ask("first", 0.2)))
        assert await asyncio.to_thread(engine.generating.wait, 10)
        started = time.monotonic()
        with pytest.raises(RequestTimeout, match=r"no batch slot freed within the 0\.2 s") as info:
            await client.complete(ask("second", 0.2))
        assert time.monotonic() - started >= 0.2
        assert info.value.status == 504
        assert not first.done()  # generating past its own 0.2 s: never timed out
        engine.finish.set()
        answer = await asyncio.wait_for(first, 10)
    assert answer.text == "answer to first"
    assert engine.timeouts == [0.2, 0.2]


async def test_a_plain_openai_engine_keeps_its_own_deadline() -> None:
    """Any other OpenAI-compatible server gets no timeout header, and the client gives up."""
    release = asyncio.Event()
    seen: list[float | None] = []

    async def held(request: ChatRequest) -> str:
        seen.append(request.timeout)
        await release.wait()
        return "late"

    async with (
        EngineServer(FakeEngine(held), model="m") as server,
        OpenAIEngine(server.url) as client,
    ):
        with pytest.raises(RequestTimeout, match=r"within 0\.2 s"):
            await client.complete(ask("hello", 0.2))
        release.set()
    assert seen == [None]


async def test_a_stopped_run_cuts_the_generation_in_the_server() -> None:
    arrived, cancelled = asyncio.Event(), asyncio.Event()

    async def generate(request: ChatRequest) -> str:
        arrived.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    async with (
        EngineServer(FakeEngine(generate), model="m") as server,
        ServeEngine(server.url) as client,
    ):
        executor = Executor(client, model="m", timeout=0.1, stop_grace_s=0)
        run = asyncio.create_task(
            executor.run(nbllm.load_conversations([{"id": "a", "turns": ["hello"]}]))
        )
        await asyncio.wait_for(arrived.wait(), 10)
        executor.stop()
        executor.stop()  # the second stop cancels what is in flight
        result = await asyncio.wait_for(run, 10)
        await asyncio.wait_for(cancelled.wait(), 10)
    assert result.df["answer"].isna().all()


TWO = [{"id": "a", "turns": ["one"]}, {"id": "b", "turns": ["two"]}]


def test_a_long_generation_through_a_worker_answers_once() -> None:
    """A worker child whose answers take 1 s, with a 0.25 s timeout: each turn is answered
    at its first attempt (before, every attempt timed out and started the answer again)."""

    async def main() -> nbllm.RunResult:
        worker = Worker("fake", options=["--fake-latency", "1"])
        async with worker, worker.engine() as engine:
            retry = RetryPolicy(retries=3, initial=0.0)
            executor = Executor(engine, model=worker.model, timeout=0.25, retry=retry)
            return await executor.run(nbllm.load_conversations(TWO))

    result = asyncio.run(main())
    assert result.df["error"].isna().all(), result.df["error"].tolist()
    assert result.df["answer"].tolist() == ["You asked: one", "You asked: two"]
    assert result.df["attempts"].tolist() == [1, 1]
    assert set(result.df["engine"]) == {"fake worker"}
