"""``nbllm serve`` refuses what it should: unguarded API engines, abbreviated options,
oversized, deep or unbounded requests; and it never hands a provider's message to a client.

Over real HTTP on 127.0.0.1, with a FakeEngine in this process (see test_serve.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
from typing import Any

import aiohttp
import pytest

from nbllm import cli
from nbllm.engines import FakeEngine, OpenAIEngine
from nbllm.errors import ConfigError, RequestRejected
from nbllm.serve import API_KEY_ENV, EngineServer, add_parser
from nbllm.serve.command import check_exposure
from nbllm.serve.server import MAX_MESSAGES, MAX_TOKENS_CAP
from nbllm.types import ChatRequest

HELLO = [{"role": "user", "content": "hello"}]
SENTINEL = "sk-sentinel-7d41c0ffee"
GIB = 1024**3


def root(server_url: str) -> str:
    return server_url.removesuffix("/v1")


async def post_chat(
    server: EngineServer, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            server.url + "/chat/completions",
            data=data,
            headers={"Content-Type": "application/json", **(headers or {})},
        ) as resp,
    ):
        return resp.status, await resp.json()


async def announce_huge_body(server: EngineServer, headers: str = "") -> tuple[int, bytes]:
    """Send headers announcing a 1 GiB body, then only a few bytes of it; return the status
    and the response, which must come while the rest of the body is still owed."""
    port = int(server.url.rsplit(":", 1)[1].removesuffix("/v1"))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            (
                "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Type: application/json\r\nContent-Length: {GIB}\r\n{headers}\r\n"
                '{"messages": ['
            ).encode()
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        # /health answers while this connection still owes 1 GiB.
        async with (
            aiohttp.ClientSession() as session,
            session.get(root(server.url) + "/health") as health,
        ):
            assert health.status == 200
        return int(head.split()[1]), head
    finally:
        writer.close()


# --------------------------------------------------------------------------- at start


@pytest.mark.parametrize(
    ("engine", "model"),
    [("openai", "gpt-4o-mini"), ("litellm", "gpt-4o-mini"), ("auto", "gpt-4o-mini")],
)
def test_an_api_engine_needs_a_key(engine: str, model: str) -> None:
    with pytest.raises(ConfigError, match=API_KEY_ENV):
        check_exposure(engine, model, "127.0.0.1", None, insecure_no_key=True)
    check_exposure(engine, model, "127.0.0.1", "k", insecure_no_key=False)  # with a key: served


def test_a_host_beyond_loopback_needs_a_key_or_insecure_no_key() -> None:
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        check_exposure("torch", None, host, None, insecure_no_key=False)
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.org"):
        with pytest.raises(ConfigError, match="--insecure-no-key"):
            check_exposure("torch", None, host, None, insecure_no_key=False)
        check_exposure("torch", None, host, None, insecure_no_key=True)
        check_exposure("torch", None, host, "k", insecure_no_key=False)


def test_nbllm_serve_refuses_an_api_engine_without_a_key_before_listening() -> None:
    env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    command = [sys.executable, "-m", "nbllm", "serve", "--engine", "litellm"]
    command += ["--model", "gpt-4o-mini", "--port", "0"]
    done = subprocess.run(command, capture_output=True, env=env, timeout=20, check=False)
    assert done.returncode == 2
    assert done.stdout == b""  # no URL line: it never listened
    assert API_KEY_ENV in done.stderr.decode()


@pytest.mark.parametrize("argv", [["--hos", "0.0.0.0"], ["--api-k", "KEY"], ["--insec"]])
def test_abbreviated_options_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--engine", "fake", *argv])
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", *argv])


def test_bad_body_limits_are_refused() -> None:
    with pytest.raises(ConfigError, match="max_body_mb"):
        EngineServer(FakeEngine(), model="m", max_body_mb=0)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    for value in ("0", "-1", "inf", "nan", "x"):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", "--max-body-mb", value])
    assert parser.parse_args(["serve", "--max-body-mb", "0.5"]).max_body_mb == 0.5


# --------------------------------------------------------------------------- over HTTP


async def test_a_providers_message_never_reaches_the_client_nor_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An API engine's error (here a provider that echoes the key in its 401) reaches the
    client as a generic text: the default for OpenAIEngine and LiteLLMEngine."""

    def provider(request: ChatRequest) -> str:
        msg = f"Incorrect API key provided: Bearer {SENTINEL}"
        raise RequestRejected(msg, status=401)

    caplog.set_level(logging.DEBUG)
    async with (
        EngineServer(FakeEngine(provider), model="m", relay_errors=True) as upstream,
        EngineServer(OpenAIEngine(upstream.url, api_key=SENTINEL), model="m") as server,
    ):
        assert not server.relays_errors
        status, body = await post_chat(server, {"messages": HELLO})
    assert status == 401
    assert body["error"]["message"] == "the engine refused the request (HTTP 401)"
    assert SENTINEL not in json.dumps(body)
    assert SENTINEL not in caplog.text


async def test_relay_errors_false_hides_any_engines_message() -> None:
    def handler(request: ChatRequest) -> str:
        raise RequestRejected(f"quoting {SENTINEL}", status=400)

    async with EngineServer(FakeEngine(handler), model="m", relay_errors=False) as server:
        status, body = await post_chat(server, {"messages": HELLO})
    assert status == 400
    assert SENTINEL not in json.dumps(body)


async def test_a_body_over_the_limit_is_413_before_it_is_read() -> None:
    engine = FakeEngine()
    async with EngineServer(engine, model="m") as server:
        status, head = await announce_huge_body(server)
        assert status == 413, head
        assert engine.calls == 0


async def test_a_body_without_a_length_is_cut_at_the_limit() -> None:
    async def chunks() -> Any:
        for _ in range(40):
            yield b" " * 1024

    async with (
        EngineServer(FakeEngine(), model="m", max_body_mb=16 / 1024) as server,
        aiohttp.ClientSession() as session,
        session.post(server.url + "/chat/completions", data=chunks()) as resp,
    ):
        assert resp.status == 413


async def test_the_key_is_checked_before_the_body_is_read() -> None:
    async with EngineServer(FakeEngine(), model="m", api_key="right") as server:
        status, _ = await announce_huge_body(server, "Authorization: Bearer wrong\r\n")
        assert status == 401


async def test_the_queue_is_checked_before_the_body_is_read() -> None:
    arrived, released = asyncio.Event(), asyncio.Event()

    async def hold(request: ChatRequest) -> str:
        arrived.set()
        await released.wait()
        return "done"

    async with EngineServer(FakeEngine(hold), model="m", max_queue=1) as server:
        first = asyncio.ensure_future(post_chat(server, {"messages": HELLO}))
        await asyncio.wait_for(arrived.wait(), 5)
        status, _ = await announce_huge_body(server)
        assert status == 429
        released.set()
        assert (await first)[0] == 200


async def test_deep_json_is_400() -> None:
    deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    async with EngineServer(FakeEngine(), model="m") as server:
        status, body = await post_chat(server, deep)
    assert status == 400
    assert "nested too deeply" in body["error"]["message"]


async def test_max_tokens_beyond_any_context_is_400() -> None:
    engine = FakeEngine()
    async with EngineServer(engine, model="m") as server:
        for name in ("max_tokens", "max_completion_tokens"):
            status, body = await post_chat(server, {"messages": HELLO, name: 10**18})
            assert status == 400
            assert "beyond the model's context" in body["error"]["message"]
        ok = {"messages": HELLO, "max_tokens": MAX_TOKENS_CAP}
        assert (await post_chat(server, ok))[0] == 200
    assert engine.calls == 1


async def test_the_message_count_is_capped() -> None:
    # Over 256 KiB: parsed in a thread, answered the same.
    many = [{"role": "user", "content": "x" * 30}] * MAX_MESSAGES
    async with EngineServer(FakeEngine(), model="m") as server:
        assert (await post_chat(server, {"messages": many}))[0] == 200
        status, body = await post_chat(server, {"messages": [*many, *HELLO]})
    assert status == 400
    assert f"at most {MAX_MESSAGES} messages" in body["error"]["message"]


async def test_a_body_still_arriving_holds_its_place_in_the_queue() -> None:
    """Slow senders cannot pile bodies up in memory: each being read counts towards
    max_queue, and gives its place back when its client goes."""
    async with EngineServer(FakeEngine(), model="m", max_queue=1) as server:
        port = int(server.url.rsplit(":", 1)[1].removesuffix("/v1"))
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Length: 1000\r\n\r\n{"
        )
        await writer.drain()
        for _ in range(500):  # until the server reads that body (bounded: 5 s)
            if server.receiving:
                break
            await asyncio.sleep(0.01)
        assert server.receiving == 1
        assert (await post_chat(server, {"messages": HELLO}))[0] == 429
        writer.close()
        await writer.wait_closed()
        for _ in range(500):
            if not server.receiving:
                break
            await asyncio.sleep(0.01)
        assert (await post_chat(server, {"messages": HELLO}))[0] == 200
