"""The llama.cpp engine on the embedded GGUF file, for real.

Skipped where llama-cpp-python is not built (pip install 'nbllm[llamacpp]' compiles it);
under CI=true that is a failure, as for every test of a real local model.
"""

from __future__ import annotations

import asyncio

import pytest
from embedded_model import require_embedded_model

import nbllm
from nbllm.engines import EMBEDDED_MODEL
from nbllm.engines.local import create_local_engine
from nbllm.errors import EngineUnavailable
from nbllm.types import ChatRequest


def ask(content: str, **params) -> ChatRequest:
    return ChatRequest(EMBEDDED_MODEL, [{"role": "user", "content": content}], params)


@pytest.fixture(scope="module")
def engine():
    require_embedded_model("llama_cpp")
    from nbllm.engines.local.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine()
    yield engine
    asyncio.run(engine.aclose())


async def test_it_answers_from_the_gguf_file(engine):
    response = await engine.complete(ask("What is 2 + 2?", max_tokens=16))
    assert "4" in response.text
    assert response.model == EMBEDDED_MODEL and response.cost_usd == 0
    assert response.prompt_tokens > 5 and 1 <= response.completion_tokens <= 16


async def test_concurrent_requests_each_get_their_own_greedy_answer(engine):
    prompts = ["What is the capital of France?", "What is 2 + 2?", "Name a primary colour."]
    alone = [(await engine.complete(ask(p, max_tokens=8))).text for p in prompts]
    together = await asyncio.gather(*(engine.complete(ask(p, max_tokens=8)) for p in prompts))
    assert [r.text for r in together] == alone


async def test_a_two_turn_conversation_sees_its_earlier_answer(engine):
    messages = [
        {"role": "user", "content": "My name is Ada. Remember it."},
        {"role": "assistant", "content": "Nice to meet you, Ada."},
        {"role": "user", "content": "What is my name?"},
    ]
    response = await engine.complete(ChatRequest(EMBEDDED_MODEL, messages, {"max_tokens": 12}))
    assert "Ada" in response.text


async def test_max_tokens_and_stop_are_honoured(engine):
    response = await engine.complete(ask("Write a long story about a cat.", max_tokens=3))
    assert response.completion_tokens == 3
    stopped = await engine.complete(
        ask("What is the capital of France?", max_tokens=16, stop=["Paris"])
    )
    assert "Paris" not in stopped.text


def test_a_model_directory_is_not_for_llamacpp():
    require_embedded_model("llama_cpp")
    from nbllm.engines.local.models import resolve_local_model, transformers_checkpoint

    directory = transformers_checkpoint(resolve_local_model(None))
    with pytest.raises(EngineUnavailable, match="GGUF"):
        create_local_engine("llamacpp", str(directory))


def test_auto_prefers_llamacpp_on_a_cpu_for_a_gguf_model():
    require_embedded_model("llama_cpp")
    if nbllm.hardware().has_cuda:
        pytest.skip("on a GPU auto prefers the GPU engines")
    data = [{"id": "a", "turns": ["What is 2 + 2?", "And 3 + 3?"]}]
    result = nbllm.run(data, max_tokens=12, progress=False)
    assert set(result.df["engine"]) == {"llamacpp"}
    assert "4" in result.df.loc[0, "answer"]
