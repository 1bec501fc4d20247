"""The llama.cpp engine on the embedded GGUF file, for real.

Skipped where llama-cpp-python is not built (pip install 'nbllm[llamacpp]' compiles it);
under CI=true that is a failure, as for every test of a real local model.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from embedded_model import require_embedded_model

import nbllm
from nbllm.engines import EMBEDDED_MODEL
from nbllm.engines.local import create_local_engine
from nbllm.errors import EngineUnavailable, RequestTimeout
from nbllm.types import ChatRequest

# Answered at length: the model keeps counting until max_tokens stops it.
COUNTING = "Count from 1 to 1000, one number per line."


def ask(content: str, timeout: float | None = None, **params) -> ChatRequest:
    return ChatRequest(EMBEDDED_MODEL, [{"role": "user", "content": content}], params, timeout)


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


async def test_max_tokens_and_stop_are_honoured_and_say_so(engine):
    response = await engine.complete(ask("Write a long story about a cat.", max_tokens=3))
    assert response.completion_tokens == 3 and response.finish_reason == "length"
    stopped = await engine.complete(ask("What is 2 + 2?", max_tokens=16, stop=["4"]))
    assert stopped.text and "4" not in stopped.text and stopped.finish_reason == "stop"
    ended = await engine.complete(ask("What is 2 + 2?", max_tokens=64))
    assert ended.completion_tokens < 64 and ended.finish_reason == "stop"


async def test_a_cancelled_generation_ends_and_a_waiting_request_times_out(engine):
    heard: list[tuple[float | None, int]] = []
    generating = asyncio.Event()

    def on_phase(phase, done, total, detail):
        heard.append((done, threading.get_ident()))
        generating.set()

    engine.on_phase = on_phase
    try:
        before = engine.tokens.count
        long = asyncio.ensure_future(engine.complete(ask(COUNTING, max_tokens=400)))
        await asyncio.wait_for(generating.wait(), 60)
        # The model thread is busy with the long answer: this one never starts.
        with pytest.raises(RequestTimeout, match="never started"):
            await engine.complete(ask("What is 2 + 2?", timeout=0.01, max_tokens=2))
        long.cancel()
        with pytest.raises(asyncio.CancelledError):
            await long
        # One chat at a time: this answer comes once the cancelled one has ended.
        after = await engine.complete(ask("What is 2 + 2?", max_tokens=2))
        assert 1 <= engine.tokens.count - before - after.completion_tokens < 100
        await asyncio.sleep(0.3)  # the last count arrives at most 0.25 s late
    finally:
        engine.on_phase = None
    counts = [done for done, _ in heard]
    assert counts == sorted(counts) and counts[-1] == engine.tokens.count
    assert {thread for _, thread in heard} == {threading.get_ident()}


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
