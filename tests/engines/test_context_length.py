"""Local engines know their model's context and refuse what cannot fit in it.

A ``max_tokens`` beyond the context is refused before the prompt is tokenized; a prompt that
leaves no room for ``max_tokens`` is refused once tokenized, before anything generates.
Both are ``RequestRejected`` (never retried) with the figures. Real engines run the embedded
SmolLM2-135M-Instruct, whose context is 8192 tokens.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from embedded_model import require_embedded_model

from nbllm.engines import EMBEDDED_MODEL
from nbllm.engines.local.base import DEFAULT_MAX_TOKENS, context_length_of
from nbllm.engines.local.batched import BatchedEngine
from nbllm.engines.local.models import LocalModel
from nbllm.engines.local.onnx_export import LAYOUT_FILE, DecoderLayout
from nbllm.errors import RequestRejected, RetryableError
from nbllm.types import ChatRequest

SMOLLM2_CONTEXT = 8192


def ask(content: str, **params) -> ChatRequest:
    return ChatRequest(EMBEDDED_MODEL, [{"role": "user", "content": content}], params)


# -- where the figure comes from ------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "tokenizer_max", "context"),
    [
        ({"max_position_embeddings": 8192, "n_positions": 1024}, None, 8192),
        ({"n_positions": 1024}, None, 1024),  # GPT-2
        ({"max_seq_len": 2048}, None, 2048),  # MPT
        (SimpleNamespace(max_position_embeddings=4096), None, 4096),  # a transformers config
        ({}, 512, 512),  # only the tokenizer says
        # transformers' placeholder for "no limit" is no figure.
        ({}, int(1e30), None),
        (None, None, None),
        ({"max_position_embeddings": True}, None, None),
    ],
)
def test_the_context_is_read_from_the_config_else_a_real_tokenizer_figure(
    config, tokenizer_max, context
):
    tokenizer = SimpleNamespace(model_max_length=tokenizer_max)
    assert context_length_of(config, tokenizer) == context


def test_a_multimodal_config_is_read_through_its_text_config():
    text = SimpleNamespace(max_position_embeddings=32768)
    config = SimpleNamespace(get_text_config=lambda: text)
    assert context_length_of(config) == 32768


def test_the_onnx_layout_keeps_the_context_and_reads_exports_without_it(tmp_path):
    layout = DecoderLayout(2, 1, 4, 10, (0,), context_length=2048)
    (tmp_path / LAYOUT_FILE).write_text(layout.to_json())
    assert DecoderLayout.read(tmp_path).context_length == 2048
    older = json.loads(layout.to_json())
    del older["context_length"]
    (tmp_path / LAYOUT_FILE).write_text(json.dumps(older))
    assert DecoderLayout.read(tmp_path).context_length is None


# -- the refusals, on a model that only counts ------------------------------------------------


class Counter(BatchedEngine):
    """A context of 50 tokens; a prompt of N words is N tokens; answers are all 7s."""

    name = "counter"

    def _load(self):
        self.tokenizer = None
        self.context_length = 50
        self.encoded: list[int] = []
        self.generated: list[int] = []  # rows of each batch that generated

    def encode(self, messages):
        self.encoded.append(len(messages))
        return [1] * len(messages[-1]["content"].split())

    def decode(self, ids):
        return " ".join(map(str, ids))

    def _generate(self, prompts, generation, watch):
        self.generated.append(len(prompts))
        return [[7] * generation.max_new_tokens for _ in prompts]


@pytest.fixture
def counter(monkeypatch):
    from nbllm.engines.local import base

    monkeypatch.setattr(base, "resolve_local_model", lambda model: LocalModel("m", Path(".")))
    engine = Counter(batch_size=4, batch_wait_s=0.05)
    yield engine
    asyncio.run(engine.aclose())


async def test_max_tokens_beyond_the_context_is_refused_before_tokenizing(counter):
    with pytest.raises(RequestRejected) as refused:
        await counter.complete(ask("one two", max_tokens=51))
    assert str(refused.value) == "max_tokens 51 is beyond the model's context of 50 tokens"
    assert not isinstance(refused.value, RetryableError)  # never retried
    assert counter.encoded == [] and counter.generated == []


async def test_a_prompt_without_room_is_refused_alone_and_its_batch_mates_answered(counter):
    long = " ".join(["word"] * 45)
    refused, answered = await asyncio.gather(
        counter.complete(ask(long, max_tokens=6)),
        counter.complete(ask("a short one", max_tokens=6)),
        return_exceptions=True,
    )
    assert isinstance(refused, RequestRejected)
    assert str(refused) == (
        "the prompt's 45 tokens and max_tokens 6 exceed the context of 50 tokens"
    )
    assert answered.completion_tokens == 6 and answered.prompt_tokens == 3
    # Both were tokenized in one batch; only the one that fits generated.
    assert counter.encoded == [1, 1] and counter.generated == [1]
    # Exactly full is allowed.
    exact = await counter.complete(ask(" ".join(["word"] * 44), max_tokens=6))
    assert exact.prompt_tokens + exact.completion_tokens == 50


async def test_without_max_tokens_the_default_applies_and_says_so(counter):
    counter.context_length = DEFAULT_MAX_TOKENS + 3
    answer = await counter.complete(ask("one two three"))
    assert answer.completion_tokens == DEFAULT_MAX_TOKENS
    with pytest.raises(RequestRejected) as refused:
        await counter.complete(ask("one two three four"))
    assert str(refused.value) == (
        f"the prompt's 4 tokens and max_tokens {DEFAULT_MAX_TOKENS} (the default) exceed the "
        f"context of {DEFAULT_MAX_TOKENS + 3} tokens"
    )


async def test_tokenizing_happens_off_the_event_loop(counter, monkeypatch):
    import threading

    threads: list[int] = []
    encode = Counter.encode
    monkeypatch.setattr(
        Counter, "encode", lambda self, m: threads.append(threading.get_ident()) or encode(self, m)
    )
    await counter.complete(ask("hello", max_tokens=2))
    assert threads and threading.get_ident() not in threads


# -- real engines on the embedded model --------------------------------------------------------


@pytest.fixture
def torch_engine():
    require_embedded_model()
    from nbllm.engines.local.torch import TorchEngine

    engine = TorchEngine(batch_size=2, batch_wait_s=0.01, device="cpu")
    yield engine
    asyncio.run(engine.aclose())


async def test_torch_knows_the_context_and_refuses_beyond_it_before_generating(
    torch_engine, monkeypatch
):
    generated: list[int] = []
    generate = torch_engine._generate
    monkeypatch.setattr(
        torch_engine, "_generate", lambda p, g, w: generated.append(len(p)) or generate(p, g, w)
    )
    assert torch_engine.context_length == SMOLLM2_CONTEXT
    with pytest.raises(RequestRejected, match="beyond the model's context of 8192 tokens"):
        await torch_engine.complete(ask("Hi", max_tokens=SMOLLM2_CONTEXT + 1))
    # The prompt (about 30 tokens with the chat template) leaves no room for 8190 more.
    with pytest.raises(RequestRejected, match=r"the prompt's \d+ tokens and max_tokens 8190"):
        await torch_engine.complete(ask("Hi", max_tokens=SMOLLM2_CONTEXT - 2))
    assert generated == []  # the second was tokenized, never generated


async def test_llamacpp_knows_the_context_and_refuses_a_prompt_without_room():
    require_embedded_model("llama_cpp")
    from nbllm.engines.local.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine()
    try:
        assert engine.context_length == SMOLLM2_CONTEXT
        with pytest.raises(RequestRejected, match="beyond the model's context of 8192 tokens"):
            await engine.complete(ask("Hi", max_tokens=SMOLLM2_CONTEXT + 1))
        # llama.cpp alone would cut max_tokens short quietly; here nothing is generated.
        with pytest.raises(RequestRejected, match=r"the prompt's \d+ tokens and max_tokens 8190"):
            await engine.complete(ask("Hi", max_tokens=SMOLLM2_CONTEXT - 2))
        # The refusal leaves the model as it was: the next request is answered.
        answer = await engine.complete(ask("What is 2 + 2?", max_tokens=1))
        assert answer.completion_tokens == 1
    finally:
        await engine.aclose()


async def test_onnx_knows_the_context_also_from_an_export_that_does_not_hold_it():
    require_embedded_model("onnxruntime", "onnxscript")
    from nbllm.engines.local.onnx import OnnxEngine, _checkpoint_config

    engine = OnnxEngine(batch_size=1, device="cpu")
    try:
        assert engine.context_length == SMOLLM2_CONTEXT
        with pytest.raises(RequestRejected, match="beyond the model's context of 8192 tokens"):
            await engine.complete(ask("Hi", max_tokens=SMOLLM2_CONTEXT + 1))
        # An export made before decoder.json held the figure reads the converted checkpoint.
        assert context_length_of(_checkpoint_config(engine.model)) == SMOLLM2_CONTEXT
    finally:
        await engine.aclose()
