"""The ONNX Runtime engine on the embedded SmolLM2-135M-Instruct, for real, on this machine's CPU.

The first run exports the model to ONNX (a minute or two) into the cache directory
(``$NBLLM_CACHE_DIR`` or ``~/.cache/nbllm``); later runs load that export in seconds.
Greedy answers are compared token for token with the torch engine's.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import pytest
from embedded_model import require_embedded_model

from nbllm.engines import EMBEDDED_MODEL
from nbllm.errors import EngineUnavailable
from nbllm.types import ChatRequest

PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Name a primary colour.",
]
TWO_TURNS = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And what is the capital of Germany?"},
]


def ask(content: str, **params) -> ChatRequest:
    return ChatRequest(EMBEDDED_MODEL, [{"role": "user", "content": content}], params)


@pytest.fixture(scope="session")
def onnx_engine():
    require_embedded_model("onnxruntime", "onnxscript")
    from nbllm.engines.local.onnx import OnnxEngine

    engine = OnnxEngine(batch_size=4, batch_wait_s=0.05, device="cpu")
    yield engine
    asyncio.run(engine.aclose())


@pytest.fixture(scope="session")
def torch_engine():
    require_embedded_model()
    from nbllm.engines.local.torch import TorchEngine

    engine = TorchEngine(batch_size=4, batch_wait_s=0.05, device="cpu")
    yield engine
    asyncio.run(engine.aclose())


async def test_onnx_answers_a_question(onnx_engine):
    response = await onnx_engine.complete(ask(PROMPTS[0], max_tokens=16))
    assert "Paris" in response.text
    assert response.model == EMBEDDED_MODEL
    assert response.prompt_tokens > 5 and 1 <= response.completion_tokens <= 16


async def test_greedy_answers_alone_equal_torch(onnx_engine, torch_engine):
    for prompt in PROMPTS:
        ours = await onnx_engine.complete(ask(prompt, max_tokens=24))
        reference = await torch_engine.complete(ask(prompt, max_tokens=24))
        assert (ours.text, ours.completion_tokens, ours.finish_reason) == (
            reference.text,
            reference.completion_tokens,
            reference.finish_reason,
        )


async def test_greedy_answers_in_one_batch_equal_torch(onnx_engine, torch_engine):
    ours = await asyncio.gather(*(onnx_engine.complete(ask(p, max_tokens=24)) for p in PROMPTS))
    assert onnx_engine._batcher.largest_batch > 1
    reference = await asyncio.gather(
        *(torch_engine.complete(ask(p, max_tokens=24)) for p in PROMPTS)
    )
    assert torch_engine._batcher.largest_batch > 1
    assert [r.text for r in ours] == [r.text for r in reference]
    assert [r.completion_tokens for r in ours] == [r.completion_tokens for r in reference]


async def test_a_two_turn_conversation_is_answered_as_torch_answers_it(onnx_engine, torch_engine):
    ours = await onnx_engine.complete(ChatRequest(EMBEDDED_MODEL, TWO_TURNS, {"max_tokens": 24}))
    reference = await torch_engine.complete(
        ChatRequest(EMBEDDED_MODEL, TWO_TURNS, {"max_tokens": 24})
    )
    first = await onnx_engine.complete(ask(TWO_TURNS[0]["content"], max_tokens=1))
    assert ours.prompt_tokens > first.prompt_tokens
    assert ours.text and ours.text == reference.text


async def test_max_tokens_bounds_the_answer_and_says_so(onnx_engine):
    response = await onnx_engine.complete(ask("Tell me a long story.", max_tokens=5))
    assert response.completion_tokens == 5 and response.finish_reason == "length"
    ended = await onnx_engine.complete(ask(PROMPTS[0], max_tokens=16))
    assert ended.completion_tokens < 16 and ended.finish_reason == "stop"


async def test_a_seeded_sample_repeats(onnx_engine):
    params = {"max_tokens": 12, "temperature": 0.9, "top_p": 0.9, "seed": 7}
    first = await onnx_engine.complete(ask(PROMPTS[1], **params))
    again = await onnx_engine.complete(ask(PROMPTS[1], **params))
    assert first.text == again.text and first.text


def test_describe_names_the_provider_the_session_really_got(onnx_engine):
    assert onnx_engine.provider == onnx_engine.session.get_providers()[0]
    assert onnx_engine.provider == "CPUExecutionProvider"
    assert onnx_engine.describe() == f"onnx {EMBEDDED_MODEL} on CPUExecutionProvider"


def test_the_export_is_reused(onnx_engine, monkeypatch):
    from nbllm.engines.local import onnx, onnx_export
    from nbllm.engines.local.models import cache_entry

    folder = cache_entry(onnx_engine.model, "onnx")
    graph = folder / "decoder.onnx"
    layout = json.loads((folder / "decoder.json").read_text())
    assert layout["layers"] == onnx_engine.layout.layers and layout["eos_token_ids"]
    mtime = graph.stat().st_mtime_ns

    def no_export(*args):
        raise AssertionError("the cached export should have been used")

    monkeypatch.setattr(onnx_export, "_export", no_export)
    started = time.monotonic()
    engine = onnx.OnnxEngine(device="cpu")
    took = time.monotonic() - started
    asyncio.run(engine.aclose())
    assert graph.stat().st_mtime_ns == mtime
    assert took < 30, f"loading the cached export took {took:.1f} s"


def test_without_onnxruntime_the_engine_says_what_to_install(monkeypatch):
    require_embedded_model()
    from nbllm.engines.local.onnx import OnnxEngine

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(EngineUnavailable, match=r"onnxruntime.*nbllm\[onnx\]"):
        OnnxEngine(device="cpu")


def test_a_model_that_cannot_be_exported_is_unavailable_with_the_reason(tmp_path, monkeypatch):
    require_embedded_model("onnxruntime", "onnxscript")
    from nbllm.engines.local.onnx import OnnxEngine

    monkeypatch.setenv("NBLLM_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(EngineUnavailable, match=r"exporting .* to ONNX failed: ") as caught:
        OnnxEngine(model, device="cpu")
    assert "\n" not in str(caught.value)
    assert not list((tmp_path / "cache" / "onnx").glob("model-*"))
