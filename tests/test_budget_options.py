"""The budget caps through every face: ``nbllm.run``, ``nbllm run`` and ``%%llm_batch``,
against a real server on loopback, and refused before any request when no price is known."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config

import nbllm
from nbllm.cli import main
from nbllm.errors import ConfigError
from nbllm.testing import TestServer

DATA = [{"id": f"c{i}", "turns": [f"question {i}"]} for i in range(8)]


@pytest.fixture
def server():
    with TestServer() as running:
        yield running


def test_a_cost_cap_priced_per_token_stops_the_run_and_a_higher_cap_resumes(server, tmp_path):
    options = {
        "model": "nbllm-test",
        "api_base": server.url,
        "concurrency": 1,
        "checkpoint": tmp_path / "ck",
        "cache": False,
        "progress": False,
        "cost_per_1k_tokens": 1.0,
    }
    first = nbllm.run(DATA, max_cost_usd=0.05, **options)
    cost = first.df["cost_usd"].dropna()
    assert first.summary.stop_reason == "budget: max_cost_usd=0.05 reached"
    assert 0 < first.summary.turns_ok < len(DATA)
    # One request at a time: the cap was crossed by the last answer, and only by it.
    assert cost.sum() >= 0.05 and cost.sum() - cost.iloc[-1] < 0.05
    sent = len(server.requests)
    assert sent == first.summary.turns_ok
    done = nbllm.run(DATA, max_cost_usd=100.0, **options)
    assert done.summary.stop_reason is None and done.summary.turns_ok == len(DATA)
    assert done.summary.resumed == first.summary.turns_ok
    assert len(server.requests) == len(DATA)  # nothing sent twice


def test_a_cost_cap_without_a_price_is_refused_before_any_request(server):
    with pytest.raises(ConfigError) as caught:
        nbllm.run(DATA, model="nbllm-test", api_base=server.url, max_cost_usd=1.0, progress=False)
    message = str(caught.value)
    assert message.startswith("max_cost_usd= needs a price: engine='auto' gives no cost")
    assert "cost_per_1k_tokens=" in message
    assert server.requests == []


def test_a_token_cap_needs_no_price(server):
    result = nbllm.run(
        DATA,
        model="nbllm-test",
        api_base=server.url,
        concurrency=1,
        max_tokens_total=50,
        checkpoint=False,
        cache=False,
        progress=False,
    )
    assert result.summary.stop_reason == "budget: max_tokens_total=50 reached"
    assert len(server.requests) == result.summary.turns_ok < len(DATA)


@pytest.mark.parametrize(
    ("option", "value", "said"),
    [
        ("max_cost_usd", 0, "max_cost_usd"),
        ("max_tokens_total", 0, "max_tokens_total"),
        ("cost_per_1k_tokens", -1.0, "cost_per_1k_tokens"),
    ],
)
def test_bad_caps_are_refused_naming_the_option(option, value, said):
    with pytest.raises(ConfigError, match=said):
        nbllm.run(DATA, engine=nbllm.FakeEngine(), progress=False, **{option: value})


def test_the_command_takes_the_caps_and_exits_1_saying_why(server, tmp_path, capsys):
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in DATA), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    args = ["run", str(data), "--model", "nbllm-test", "--api-base", server.url]
    args += ["--no-progress", "--concurrency", "1", "--max-tokens-total", "50", "--out", str(out)]
    assert main(args) == 1
    assert "budget: max_tokens_total=50 reached" in capsys.readouterr().err
    rows = [json.loads(line) for line in Path(out).read_text(encoding="utf-8").splitlines()]
    assert any(row["error"] and "not run: budget" in row["error"] for row in rows)


def test_the_magic_takes_the_caps(server, monkeypatch):
    monkeypatch.delenv("NBLLM_API_BASE", raising=False)
    config = Config()
    config.HistoryManager.enabled = False
    shell = InteractiveShell.instance(config=config)
    shell.run_line_magic("load_ext", "nbllm")
    try:
        shell.user_ns["rows"] = DATA
        line = f"rows -m nbllm-test --api-base {server.url} --concurrency 1 --no-checkpoint"
        cell = shell.run_cell(f"%llm_batch {line} --max-tokens-total 50 -o capped")
        assert cell.error_in_exec is None
        result = shell.user_ns["capped"]
        assert result.summary.stop_reason == "budget: max_tokens_total=50 reached"
    finally:
        shell.run_line_magic("unload_ext", "nbllm")
        shell.reset(new_session=False)
