"""What the executor does with images, opening messages and turn_params (proposed)."""

from __future__ import annotations

import pytest

import nbllm
from nbllm import ChatRequest, FakeEngine
from nbllm.errors import CheckpointError, ConfigError

SHOT = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
PNG = b"\x89PNG\r\n\x1a\n" + bytes(40)


def test_the_cache_and_the_checkpoint_tell_apart_conversations_that_differ_only_beyond_text(
    tmp_path,
):
    options = {"engine": FakeEngine(), "model": "m", "progress": False}
    base = {"id": "a", "turns": ["q0", "q1"]}
    variants = [
        base,
        {**base, "messages": SHOT},
        {**base, "images": [PNG]},
        {**base, "images": [PNG + b"\x00"]},
        {**base, "turn_params": [None, {"max_tokens": 7}]},
    ]
    cache = str(tmp_path / "cache")
    for variant in variants:
        result = nbllm.run([variant], **options, cache=cache, checkpoint=False)
        assert not result.df["cached"].iloc[-1], variant  # each differs in its last turn
    assert nbllm.run([variants[2]], **options, cache=cache, checkpoint=False).df["cached"].all()

    checkpoint = tmp_path / "ck"
    nbllm.run([variants[2]], **options, cache=False, checkpoint=checkpoint)
    with pytest.raises(CheckpointError, match="the dataset's conversations changed"):
        nbllm.run([variants[3]], **options, cache=False, checkpoint=checkpoint)
    again = nbllm.run([variants[2]], **options, cache=False, checkpoint=checkpoint)
    assert again.df["resumed"].all()


def test_a_turns_own_parameters_go_with_that_turn_only():
    seen: list[dict] = []

    def answer(request: ChatRequest) -> str:
        seen.append(dict(request.params))
        return "ok"

    nbllm.run(
        [{"id": "a", "turns": ["q0", "q1"], "turn_params": [{"max_tokens": 3}, None]}],
        engine=FakeEngine(answer),
        model="m",
        max_tokens=50,
        temperature=0,
        checkpoint=False,
        cache=False,
        progress=False,
    )
    assert seen == [{"max_tokens": 3, "temperature": 0}, {"max_tokens": 50, "temperature": 0}]


def test_a_local_engine_refuses_images_before_anything_loads():
    with pytest.raises(ConfigError, match="engine 'torch' cannot send images"):
        nbllm.run([{"id": "a", "turns": ["q"], "images": [PNG]}], engine="torch", progress=False)
