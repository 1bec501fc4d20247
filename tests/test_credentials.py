"""A provider's model without its API key is refused before any request, in one line.

Without the check, litellm reports the missing key as a server error (HTTP 500), which
was retried on every turn. These tests never reach a provider: the refusal comes first,
and a run that passes the check is prepared, never executed.
"""

from __future__ import annotations

import json

import pytest

import nbllm
from nbllm.api import prepare_run
from nbllm.cli import main
from nbllm.engines.litellm import missing_credentials

RECORDS = [{"id": "a", "turns": ["hi"]}]
KEYS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY")


@pytest.fixture(autouse=True)
def _no_keys(monkeypatch):
    for name in KEYS:
        monkeypatch.delenv(name, raising=False)


def _prepared(**options) -> nbllm.RunConfig:
    """Prepare (never run) a run: the check passed. Returns its config."""
    plan = prepare_run(RECORDS, nbllm.RunConfig(checkpoint=False, cache=False, **options))
    plan.release()
    return plan.config


@pytest.mark.parametrize("model", ["gpt-4o-mini", "openai/gpt-4o-mini"])
def test_a_missing_key_is_named_before_any_request(model):
    with pytest.raises(nbllm.ConfigError) as refused:
        nbllm.run(RECORDS, model=model, progress=False)
    assert str(refused.value) == (
        f"model={model!r} needs OPENAI_API_KEY in the environment (or pass api_key=)"
    )


def test_a_provider_that_takes_either_of_two_keys_names_both():
    with pytest.raises(nbllm.ConfigError, match="needs GOOGLE_API_KEY or GEMINI_API_KEY in"):
        nbllm.run(RECORDS, model="gemini/gemini-1.5-flash", progress=False)


def test_a_key_in_the_environment_or_given_passes(monkeypatch):
    _prepared(model="gpt-4o-mini", api_key="sk-given")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-set")
    _prepared(model="anthropic/claude-3-5-haiku-20241022")


def test_a_key_under_another_name_litellm_reads_passes(monkeypatch):
    for name in (
        "TOGETHERAI_API_KEY",
        "TOGETHER_API_KEY",
        "TOGETHER_AI_API_KEY",
        "TOGETHER_AI_TOKEN",
    ):
        monkeypatch.delenv(name, raising=False)
    assert missing_credentials("together_ai/some-model") == ["TOGETHERAI_API_KEY"]
    monkeypatch.setenv("TOGETHER_API_KEY", "set")  # litellm reads this spelling too
    assert missing_credentials("together_ai/some-model") == []


def test_no_provider_key_is_asked_of_a_server_of_ones_own():
    # api_base= points elsewhere: the server decides what it needs (NBLLM_API_KEY, or none).
    _prepared(model="gpt-4o-mini", api_base="http://127.0.0.1:9/v1")
    _prepared(model="openai/gpt-4o-mini", api_base="http://127.0.0.1:9/v1", engine="litellm")


def test_providers_that_sign_in_otherwise_are_left_to_their_first_request():
    # Cloud credentials files, a local server at its default address: not an env check.
    for model in ("bedrock/anthropic.claude-v2", "vertex_ai/gemini-pro", "ollama/llama3"):
        assert missing_credentials(model) == [], model


def test_the_command_exits_2_with_the_one_line(tmp_path, capsys):
    data = tmp_path / "convs.jsonl"
    data.write_text(json.dumps(RECORDS[0]) + "\n", encoding="utf-8")
    assert main(["run", str(data), "--model", "gpt-4o-mini", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "nbllm: error: model='gpt-4o-mini' needs OPENAI_API_KEY in the environment "
        "(or pass api_key=)\n"
    )
