"""Tests for ``Worker``: ``python -m nbllm serve`` in a child process, over real HTTP.

Every test stops the worker it started.
"""

from __future__ import annotations

import asyncio
import sys
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from nbllm.engines import EMBEDDED_MODEL
from nbllm.engines.child_process import ServerStartError
from nbllm.engines.worker import (
    Worker,
    WorkerState,
    local_option_args,
    shared_worker,
    stop_all_workers,
)
from nbllm.errors import ConfigError, EngineUnavailable
from nbllm.types import ChatRequest

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
    with pytest.raises(ConfigError, match="batch_size, batch_wait_s and device"):
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
