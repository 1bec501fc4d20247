"""``nbllm serve`` refuses a ``max_tokens`` beyond the served model's context with a 400 that
says so, and relays a local engine's refusal of a prompt that leaves no room for it.

Over real HTTP on 127.0.0.1: with an engine that only reports a context (fast), and with the
embedded SmolLM2-135M-Instruct in the torch engine (context 8192), where nothing generates.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from embedded_model import require_embedded_model

from nbllm.engines import EMBEDDED_MODEL, FakeEngine, OpenAIEngine
from nbllm.errors import RequestRejected
from nbllm.serve import EngineServer
from nbllm.types import ChatRequest

HELLO = [{"role": "user", "content": "hello"}]


async def post_chat(server: EngineServer, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(server.url + "/chat/completions", data=json.dumps(body)) as resp,
    ):
        return resp.status, await resp.json()


async def get_models(server: EngineServer) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(server.url + "/models") as resp:
        return (await resp.json())["data"][0]


async def test_max_tokens_beyond_a_reported_context_is_400_before_the_engine() -> None:
    engine = FakeEngine()
    engine.context_length = 100  # type: ignore[attr-defined]  # as a local engine reports it
    async with EngineServer(engine, model="m") as server:
        assert (await get_models(server))["max_model_len"] == 100
        for name in ("max_tokens", "max_completion_tokens"):
            status, body = await post_chat(server, {"messages": HELLO, name: 101})
            assert status == 400
            assert body["error"]["message"] == (
                "max_tokens 101 is beyond the model's context of 100 tokens"
            )
        assert (await post_chat(server, {"messages": HELLO, "max_tokens": 100}))[0] == 200
    assert engine.calls == 1


async def test_an_engine_without_a_context_says_no_max_model_len() -> None:
    async with EngineServer(FakeEngine(), model="m") as server:
        assert "max_model_len" not in await get_models(server)


@pytest.fixture
def torch_factory():
    require_embedded_model()
    from nbllm.engines.local.torch import TorchEngine

    return lambda: TorchEngine(batch_size=2, batch_wait_s=0.01, device="cpu")


async def test_the_embedded_models_context_bounds_max_tokens_and_the_prompt(torch_factory):
    async with EngineServer(torch_factory, model=EMBEDDED_MODEL) as server:
        await server.wait_loaded()
        assert (await get_models(server))["max_model_len"] == 8192
        status, body = await post_chat(server, {"messages": HELLO, "max_tokens": 8193})
        assert status == 400
        assert body["error"]["message"] == (
            "max_tokens 8193 is beyond the model's context of 8192 tokens"
        )
        # The engine's own refusal, nbllm's text with its figures: a 400, never a retry.
        status, body = await post_chat(server, {"messages": HELLO, "max_tokens": 8190})
        assert status == 400
        message = body["error"]["message"]
        assert message.startswith("the prompt's ") and message.endswith(
            "tokens and max_tokens 8190 exceed the context of 8192 tokens"
        )
        # An nbllm client (a worker's engine) reads it back as RequestRejected.
        async with OpenAIEngine(server.url) as client:
            with pytest.raises(RequestRejected, match="beyond the model's context of 8192"):
                await client.complete(ChatRequest("m", HELLO, {"max_tokens": 8193}))
