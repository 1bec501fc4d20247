"""Continuous batching and the prefix cache of the torch engine, on the embedded model."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from embedded_model import require_embedded_model

import nbllm
from nbllm.engines import EMBEDDED_MODEL
from nbllm.engines.local.prefix_cache import PrefixCache, default_prefix_cache_bytes
from nbllm.errors import ConfigError
from nbllm.types import ChatRequest

# A shared document, as a finance conversation repeats one at every turn.
DOCUMENT = (
    "Quarterly report. Revenue: Q1 120, Q2 135, Q3 150, Q4 170 (millions). "
    "Costs: Q1 80, Q2 85, Q3 90, Q4 100. Headcount: 410, 420, 445, 470. "
) * 4
QUESTIONS = [
    ["What was revenue in Q1?", "And in Q4?", "Did it grow?"],
    ["What were costs in Q2?", "And in Q3?", "Which quarter cost most?"],
    ["What was headcount in Q1?", "And at the end?", "How many joined?"],
]


def conversations() -> list[dict]:
    return [
        {"id": f"c{i}", "system": DOCUMENT, "turns": turns} for i, turns in enumerate(QUESTIONS)
    ]


def ask(content: str, **params) -> ChatRequest:
    return ChatRequest(EMBEDDED_MODEL, [{"role": "user", "content": content}], params)


def torch_engine(**options):
    require_embedded_model()
    from nbllm.engines.local.torch import TorchEngine

    return TorchEngine(batch_size=4, **options)


# -- the prefix cache alone -------------------------------------------------------------


def test_the_longest_shared_prefix_is_found_and_reused_partly():
    cache = PrefixCache(1000)
    cache.put([1, 2, 3, 4], "a", 10)
    cache.put([1, 2, 9], "b", 10)
    reused, entry = cache.longest([1, 2, 3, 7, 8])
    assert (reused, entry.kv) == (3, "a")
    reused, entry = cache.longest([1, 2, 9, 9])
    assert (reused, entry.kv) == (3, "b")
    # At least one token is left to compute: a prompt the cache holds whole reuses all but one.
    reused, entry = cache.longest([1, 2, 3, 4])
    assert (reused, entry.kv) == (3, "a")
    assert cache.longest([5, 6]) == (0, None)
    assert (cache.hits, cache.misses, cache.reused_tokens) == (3, 1, 9)


def test_an_entry_that_extends_another_replaces_it_and_a_held_one_is_not_added():
    cache = PrefixCache(1000)
    assert cache.put([1, 2, 3], "turn 0", 30)
    assert cache.put([1, 2, 3, 4, 5], "turn 1", 50)  # the next turn: prompt and answer
    assert len(cache) == 1 and cache.bytes == 50
    assert not cache.put([1, 2], "held", 20)
    assert len(cache) == 1 and cache.bytes == 50


def test_the_cache_stays_within_its_bytes_and_forgets_the_least_recently_used():
    cache = PrefixCache(100)
    cache.put([1, 1], "one", 40)
    cache.put([2, 2], "two", 40)
    cache.longest([1, 1, 5])  # "one" is used: "two" is now the oldest
    cache.put([3, 3], "three", 40)
    kept = {entry.kv for entry in cache._entries.values()}
    assert kept == {"one", "three"} and cache.bytes == 80 and cache.evictions == 1
    assert not cache.put([4] * 10, "too big", 101)
    assert PrefixCache(0).put([1], "none", 1) is False


def test_the_default_size_is_a_share_of_free_memory_within_bounds():
    assert default_prefix_cache_bytes(10 << 30) == 2 << 30
    assert default_prefix_cache_bytes(100 << 30) == 4 << 30
    assert default_prefix_cache_bytes(None) == 256 << 20
    with pytest.raises(ValueError, match="prefix_cache_bytes"):
        PrefixCache(-1)


def test_token_ids_are_compared_as_numbers_not_text():
    cache = PrefixCache(100)
    cache.put(np.array([10, 20, 30]), "x", 1)
    assert cache.longest([10, 20, 31, 0])[0] == 2


# -- options --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("prefix_cache", "yes", "prefix_cache must be True or False"),
        ("prefix_cache_bytes", -5, "prefix_cache_bytes must be a whole number"),
        ("prefix_cache_bytes", 1.5, "prefix_cache_bytes must be a whole number"),
    ],
)
def test_bad_prefix_cache_options_fail_before_the_model_loads(option, value, message):
    from nbllm.engines.local.torch import TorchEngine

    started = time.monotonic()
    with pytest.raises(ConfigError, match=message):
        TorchEngine(**{option: value})
    assert time.monotonic() - started < 1


def test_prefix_cache_options_are_refused_for_a_server_before_anything_is_sent():
    with pytest.raises(ConfigError, match="only apply to local engines"):
        nbllm.run(
            [{"id": 1, "turns": ["hi"]}],
            model="m",
            api_base="http://127.0.0.1:9/v1",
            prefix_cache=False,
            progress=False,
            checkpoint=False,
        )
    with pytest.raises(ConfigError, match="prefix_cache_bytes"):
        nbllm.run([{"id": 1, "turns": ["hi"]}], prefix_cache_bytes=-1, progress=False)


# -- the embedded model -----------------------------------------------------------------


def run_on(engine, **options) -> nbllm.RunResult:
    return nbllm.run(
        conversations(),
        engine=engine,
        max_tokens=24,
        concurrency=4,
        checkpoint=False,
        cache=False,
        progress=False,
        **options,
    )


@pytest.fixture(scope="module")
def three_ways():
    """The same multi-turn run: continuous with the prefix cache, continuous without it,
    and the static batcher (transformers' generate)."""
    results = {}
    for way, options in {
        "cached": {},
        "uncached": {"prefix_cache": False},
        "static": {"continuous": False},
    }.items():
        engine = torch_engine(**options)
        try:
            results[way] = (run_on(engine), engine)
        finally:
            asyncio.run(engine.aclose())
    return results


def test_greedy_answers_are_the_same_with_and_without_the_cache_and_batcher(three_ways):
    answers = {way: list(result.df["answer"]) for way, (result, _) in three_ways.items()}
    assert all(answers["cached"])
    assert answers["cached"] == answers["uncached"] == answers["static"]
    tokens = {way: list(result.df["completion_tokens"]) for way, (result, _) in three_ways.items()}
    assert tokens["cached"] == tokens["uncached"] == tokens["static"]


def test_later_turns_reuse_the_document_and_the_earlier_turns(three_ways):
    result, engine = three_ways["cached"]
    df = result.df.sort_values(["conversation_id", "turn"])
    assert engine.prefix is not None and engine.prefix.hits > 0
    later = df[df["turn"] > 0]
    assert (later["cached_tokens"] > 0).all()
    # Turn k+1 holds turn k's whole prompt: at least that much is reused.
    for _, conv in df.groupby("conversation_id"):
        prompts = list(conv["prompt_tokens"])
        reused = list(conv["cached_tokens"])
        for k in range(1, len(prompts)):
            assert reused[k] >= prompts[k - 1]
    assert engine.prefix.reused_tokens == df["cached_tokens"].sum()
    assert result.summary.cached_tokens == df["cached_tokens"].sum()
    plain_result, plain = three_ways["uncached"]
    assert plain.prefix is None
    assert plain_result.df["cached_tokens"].isna().all()  # the engine does not say


async def test_a_short_request_is_answered_while_a_long_one_still_generates():
    engine = torch_engine()
    try:
        finished: list[str] = []

        async def timed(name: str, request: ChatRequest) -> None:
            await engine.complete(request)
            finished.append(name)

        long = asyncio.ensure_future(
            timed("long", ask("Count from 1 to 1000, one number per line.", max_tokens=120))
        )
        while engine.tokens.count < 5:  # the long one is generating
            await asyncio.sleep(0.01)
        await timed("short", ask("What is 2 + 2?", max_tokens=4))
        assert finished == ["short"]  # it joined the running batch and left before it
        await long
        assert engine._batcher.largest_batch == 2
    finally:
        await engine.aclose()


async def test_requests_with_different_sampling_share_a_batch_and_greedy_ones_repeat():
    engine = torch_engine()
    try:
        greedy = ask("Name a primary colour.", max_tokens=12)
        answers = await asyncio.gather(
            engine.complete(greedy),
            engine.complete(ask("Name a fruit.", max_tokens=12, temperature=0.9, seed=7)),
            engine.complete(ask("Name a fruit.", max_tokens=12, temperature=0.9, seed=7)),
        )
        assert engine._batcher.largest_batch >= 2
        assert answers[1].text == answers[2].text  # one seed, one sample
        alone = await engine.complete(greedy)
        assert alone.text == answers[0].text
    finally:
        await engine.aclose()


async def test_a_bounded_cache_keeps_to_its_bytes():
    engine = torch_engine(prefix_cache_bytes=3 << 20)
    try:
        for question in ["What is 1 + 1?", "Name a colour.", "Name a city.", "Name a river."]:
            await engine.complete(ask(question, max_tokens=8))
        assert engine.prefix is not None
        assert 0 < engine.prefix.bytes <= 3 << 20
        assert engine.prefix.evictions > 0
    finally:
        await engine.aclose()


def test_onnx_on_the_cpu_batches_continuously_and_reuses_prefixes_with_the_same_answers():
    require_embedded_model("onnxruntime", "onnx", "onnxscript")
    from nbllm.engines.local.onnx import OnnxEngine

    results = {}
    for way, options in {"continuous": {}, "static": {"continuous": False}}.items():
        engine = OnnxEngine(batch_size=4, **options)
        try:
            results[way] = (run_on(engine), engine.continuous, engine.prefix)
        finally:
            asyncio.run(engine.aclose())
    (fast, on, prefix), (slow, off, _) = results["continuous"], results["static"]
    assert on and not off
    assert list(fast.df["answer"]) == list(slow.df["answer"])
    assert prefix is not None
    later = fast.df[fast.df["turn"] > 0]
    assert (later["cached_tokens"] > 0).all()
    assert slow.df["cached_tokens"].isna().all()


@pytest.mark.gpu
def test_on_the_gpu_continuous_batching_answers_as_the_static_batcher_and_frees_memory():
    require_embedded_model()
    import torch

    from nbllm.engines.local.torch import TorchEngine

    answers = {}
    for way, options in {"continuous": {}, "static": {"continuous": False}}.items():
        engine = TorchEngine(batch_size=4, device="cuda", **options)
        try:
            answers[way] = list(run_on(engine).df["answer"])
            if way == "continuous":
                assert engine.prefix is not None and engine.prefix.hits > 0
        finally:
            asyncio.run(engine.aclose())
    assert answers["continuous"] == answers["static"]
    assert torch.cuda.memory_allocated() < 50 * 2**20  # the prefix cache went with the model
