"""Several models in one run: side by side (``model=[...]``, ``compare()``), and ensembles
(``ensemble="first"`` / ``"vote"``), with fakes for the bulk and two real test servers at
different latencies for the real tier."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest
from helpers import answer_from_history

import nbllm
from nbllm import ChatRequest, FakeEngine
from nbllm.errors import ConfigError, RequestRejected
from nbllm.retry import RetryPolicy
from nbllm.testing import TestServer

FAST = {"checkpoint": False, "cache": False, "progress": False}
DELAYS = {"fast": 0.005, "slow": 0.3, "mid": 0.05}


def data(n: int = 4, turns: int = 3) -> list[dict[str, object]]:
    return [
        {"id": f"c{i}", "turns": [f"q{i}.{k}" for k in range(turns)], "references": ["42"] * turns}
        for i in range(n)
    ]


class Models:
    """A fake that answers per model, after each model's delay; it records each request
    (model, messages) and counts the requests that were cut short (cancelled)."""

    def __init__(self, answers: dict[str, str] | None = None) -> None:
        self.answers = answers or {}
        self.sent: list[tuple[str, list[dict[str, object]]]] = []
        self.cancelled: Counter[str] = Counter()
        self.finished: Counter[str] = Counter()

    async def __call__(self, request: ChatRequest) -> str:
        self.sent.append((request.model, [dict(m) for m in request.messages]))
        try:
            await asyncio.sleep(DELAYS[request.model])
        except asyncio.CancelledError:
            self.cancelled[request.model] += 1
            raise
        self.finished[request.model] += 1
        given = self.answers.get(request.model)
        return given if given is not None else f"{request.model}: {answer_from_history(request)}"


# --------------------------------------------------------------------------- side by side


def test_every_conversation_is_asked_of_every_model_each_with_its_own_history():
    fake = Models()
    result = nbllm.run(data(), engine=FakeEngine(fake), model=["fast", "mid"], **FAST)
    df = result.df
    assert len(df) == 4 * 2 * 3 and df["error"].isna().all()
    # One row per (conversation, model, turn), conversation by conversation.
    assert list(df["model"][:6]) == ["fast"] * 3 + ["mid"] * 3
    assert list(df["conversation_id"][:6]) == ["c0"] * 6
    # Each model's turn k carried that model's own earlier answers, and no other's.
    for model, messages in fake.sent:
        earlier = [m["content"] for m in messages if m["role"] == "assistant"]
        assert all(str(text).startswith(f"{model}: ") for text in earlier)
    assert Counter(m for m, _ in fake.sent) == {"fast": 12, "mid": 12}
    assert result.summary.turns == 24 and result.summary.conversations == 8


def test_compare_lays_the_models_side_by_side_with_their_agreement():
    fake = Models({"fast": "42", "mid": "41", "slow": " 42 "})
    result = nbllm.run(data(2, 2), engine=FakeEngine(fake), model=["fast", "mid", "slow"], **FAST)
    result.score("exact")
    wide = result.compare()
    assert len(wide) == 4  # one row per (conversation, turn)
    assert list(wide[["conversation_id", "turn"]].itertuples(index=False, name=None)) == [
        ("c0", 0),
        ("c0", 1),
        ("c1", 0),
        ("c1", 1),
    ]
    assert list(wide["answer[mid]"]) == ["41"] * 4
    assert list(wide["score[fast]"]) == [1.0] * 4 and list(wide["score[mid]"]) == [0.0] * 4
    # "42" and " 42 " agree as "exact" compares them: 2 of the 3 models.
    assert list(wide["agreement"]) == pytest.approx([2 / 3] * 4)
    for column in ("latency_s", "prompt_tokens", "completion_tokens", "cost_usd", "error"):
        assert f"{column}[slow]" in wide.columns
    with pytest.raises(ValueError, match="several models"):
        nbllm.run(data(1, 1), engine=FakeEngine(), model="m", **FAST).compare()


# --------------------------------------------------------------------------- ensembles


def test_first_keeps_the_fastest_answer_and_cancels_the_others():
    fake = Models()
    result = nbllm.run(
        data(), engine=FakeEngine(fake), model=["slow", "fast"], ensemble="first", **FAST
    )
    df = result.df
    assert len(df) == 12 and df["error"].isna().all()
    assert set(df["model"]) == {"fast"}  # the row names the winner
    # The slow model was asked every turn, and each of its requests was withdrawn.
    assert fake.cancelled["slow"] == 12 and fake.finished["slow"] == 0
    # Turn k+1 carried the winner's answers, to both models.
    for _, messages in fake.sent:
        earlier = [m["content"] for m in messages if m["role"] == "assistant"]
        assert all(str(text).startswith("fast: ") for text in earlier)
    # A withdrawn request is not a stop: every turn ran, and quickly.
    assert not result.interrupted and result.wall_s < 2.0
    table = result.summary.ensemble.set_index("model")
    assert table.loc["fast", "kept"] == 12 and table.loc["slow", "withdrawn"] == 12
    assert table.loc["slow", "kept"] == 0
    assert table.loc["ensemble", "turns"] == 12
    assert table.loc["slow", "turn_p95"] >= table.loc["ensemble", "turn_p95"]


def test_first_passes_over_a_model_that_fails_or_does_not_parse():
    async def handler(request: ChatRequest) -> str:
        if request.model == "fast":
            await asyncio.sleep(0.005)
            return "no number here"
        if request.model == "broken":
            raise RequestRejected("400 bad request")
        await asyncio.sleep(0.05)
        return "The total is $1,234.5"

    result = nbllm.run(
        data(2, 2),
        engine=FakeEngine(handler),
        model=["fast", "broken", "mid"],
        ensemble="first",
        parse="number",
        parse_retries=1,
        **FAST,
    )
    df = result.df
    assert df["error"].isna().all(), df["error"].tolist()
    assert set(df["model"]) == {"mid"} and list(df["parsed"]) == [1234.5] * 4


def test_when_every_model_fails_the_row_says_why_for_each():
    def handler(request: ChatRequest) -> str:
        raise RequestRejected(f"{request.model} refused")

    result = nbllm.run(
        data(1, 2), engine=FakeEngine(handler), model=["a", "b"], ensemble="first", **FAST
    )
    first = result.df["error"].iloc[0]
    assert "a: RequestRejected" in first and "b: RequestRejected" in first
    assert result.df["error"].iloc[1].startswith("skipped")


def test_vote_keeps_the_majority_answer_deterministically_and_counts_every_model():
    fake = Models({"fast": "41", "mid": "42", "slow": "42"})
    runs = [
        nbllm.run(
            data(2, 2),
            engine=FakeEngine(fake),
            model=["fast", "mid", "slow"],
            ensemble="vote",
            **FAST,
        )
        for _ in range(2)
    ]
    for result in runs:
        df = result.df
        assert list(df["answer"]) == ["42"] * 4
        assert list(df["model"]) == ["mid"] * 4  # the first model that gave the majority's
        assert list(df["votes"]) == [2] * 4
        # Every model was paid for: the row's tokens are the three answers'.
        assert (df["completion_tokens"] == 3).all()
        # The turn waited for the slowest model.
        assert (df["latency_s"] >= DELAYS["slow"]).all()
    assert fake.cancelled == Counter()


def test_vote_counts_every_models_cached_prompt_tokens_as_it_counts_their_tokens():
    def answer(request: ChatRequest) -> nbllm.ChatResponse:
        cached = {"fast": 1, "mid": 2, "slow": None}[request.model]  # slow does not say
        return nbllm.ChatResponse("42", request.model, 10, 1, cached_tokens=cached)

    result = nbllm.run(
        data(2, 1), engine=FakeEngine(answer), model=["fast", "mid", "slow"], ensemble="vote",
        **FAST,
    )  # fmt: skip
    df = result.df
    assert list(df["prompt_tokens"]) == [30, 30]
    assert list(df["cached_tokens"]) == [3, 3]


def test_vote_adds_up_what_every_models_batch_answer_saved_as_it_adds_their_cost():
    def answer(request: ChatRequest) -> nbllm.ChatResponse:
        saved = {"fast": 0.001, "mid": 0.002, "slow": None}[request.model]  # slow: live
        return nbllm.ChatResponse("42", request.model, 10, 1, cost_usd=0.001, saved_usd=saved)

    result = nbllm.run(
        data(2, 1), engine=FakeEngine(answer), model=["fast", "mid", "slow"], ensemble="vote",
        **FAST,
    )  # fmt: skip
    assert list(result.df["saved_usd"]) == pytest.approx([0.003, 0.003])
    assert result.summary.saved_usd == pytest.approx(0.006)


def test_a_tie_goes_to_the_first_model_given():
    fake = Models({"fast": "yes", "mid": "no"})
    result = nbllm.run(
        data(1, 1), engine=FakeEngine(fake), model=["mid", "fast"], ensemble="vote", **FAST
    )
    assert result.df["answer"].iloc[0] == "no" and result.df["votes"].iloc[0] == 1


def test_vote_compares_parsed_values_where_a_parser_reads_them():
    answers = {"fast": "It is 14 %", "mid": "14%", "slow": "about 15 percent"}
    result = nbllm.run(
        data(1, 1),
        engine=FakeEngine(Models(answers)),
        model=["slow", "fast", "mid"],
        ensemble="vote",
        parse="number",
        **FAST,
    )
    row = result.df.iloc[0]
    assert row["votes"] == 2 and row["model"] == "fast" and row["parsed"] == 14.0


def test_an_ensemble_resumes_without_asking_any_model_again(tmp_path):
    checkpoint = tmp_path / "run.sqlite"
    failing = {"c2"}

    async def handler(request: ChatRequest) -> str:
        await asyncio.sleep(DELAYS[request.model])
        if any(f"q{c[1:]}." in str(m["content"]) for c in failing for m in request.messages):
            raise RequestRejected("refused for now")
        return json.dumps({"model": request.model, "n": len(request.messages)})

    engine = FakeEngine(handler)
    options = {"model": ["fast", "mid"], "ensemble": "vote", "checkpoint": checkpoint}
    first = nbllm.run(data(), engine=engine, cache=False, progress=False, **options)
    assert first.summary.turns_ok == 9
    calls = engine.calls
    failing.clear()
    again = nbllm.run(data(), engine=engine, cache=False, progress=False, **options)
    # Only conversation c2's three turns are asked, of each model once.
    assert engine.calls - calls == 3 * 2
    df = again.df
    assert df["error"].isna().all() and int(df["resumed"].sum()) == 9
    assert list(df.loc[df["resumed"], "votes"]) == list(
        first.df.loc[first.df["error"].isna(), "votes"]
    )


def test_cancelling_an_ensemble_run_keeps_every_turn_that_finished():
    fake = Models()

    async def main() -> nbllm.RunResult:
        task = asyncio.ensure_future(
            nbllm.arun(
                data(16, 3),
                engine=FakeEngine(fake),
                model=["fast", "slow"],
                ensemble="vote",
                concurrency=2,
                **FAST,
            )
        )
        await asyncio.sleep(1.0)
        task.cancel()
        return await task

    result = asyncio.run(main())
    df = result.df
    assert result.interrupted
    ok, not_run = df["error"].isna(), df["error"].str.startswith("not run").fillna(False)
    assert 0 < ok.sum() < len(df) and (ok | not_run).all()
    assert (df.loc[ok, "votes"] == 1).all()  # each answered turn waited for both models


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"model": "a", "ensemble": "first"}, "needs two models or more"),
        ({"model": ["a", "a"]}, "names 'a' twice"),
        ({"model": ["a", "b"], "ensemble": "best"}, "ensemble= expected 'first', 'vote'"),
        ({"model": []}, "model= expected a model name"),
    ],
)
def test_bad_model_lists_are_refused_before_any_request(options, message):
    engine = FakeEngine()
    with pytest.raises(ConfigError, match=message):
        nbllm.run(data(1, 1), engine=engine, **FAST, **options)
    assert engine.calls == 0


def test_the_cli_and_the_magic_take_several_models(tmp_path):
    from nbllm.ui.magics import _line_parser

    args = _line_parser().parse_args(["data", "-m", "a", "-m", "b", "--ensemble", "vote"])
    assert args.model == ["a", "b"] and args.ensemble == "vote"
    from nbllm.cli import build_parser

    args = build_parser().parse_args(["run", "x.jsonl", "--model", "a", "--model", "b"])
    assert args.model == ["a", "b"]


# --------------------------------------------------------------------------- real servers


def test_first_takes_the_faster_of_two_real_servers_and_cancels_the_slower():
    # shared_history: each server accepts the other's answers in a history, no other.
    with (
        TestServer(latency=0.6, shared_history=True) as slow,
        TestServer(latency=0.01, shared_history=True) as fast,
    ):
        router = [
            {"model_name": name, "litellm_params": {"model": "openai/m", "api_base": server.url}}
            for name, server in (("slow", slow), ("fast", fast))
        ]
        result = nbllm.run(
            data(6, 3),
            router=router,
            model=["slow", "fast"],
            ensemble="first",
            concurrency=8,
            **FAST,
        )
        slow_answered = slow.stats()["by_status"].get(200, 0)
        assert fast.history_errors == 0 and slow.history_errors == 0
    df = result.df
    assert df["error"].isna().all(), df["error"].dropna().tolist()[:2]
    assert set(df["model"]) == {"fast"} and len(df) == 18
    assert slow_answered < 18  # its requests were withdrawn, not waited for
    assert result.wall_s < 0.6 * 3 * 0.8  # faster than the slow server's three turns
    table = result.summary.deployments.set_index("group")
    assert table.loc["fast", "requests"] == 18 and table.loc["slow", "requests"] == 18


def test_an_ensembles_rows_count_every_models_requests_and_retries_as_the_live_view():
    from nbllm.errors import ServerError
    from nbllm.executor.events import RetryScheduled

    calls: Counter[tuple[str, str]] = Counter()

    async def handler(request: ChatRequest) -> str:
        key = (request.model, str(request.messages[-1]["content"]))
        calls[key] += 1
        await asyncio.sleep(DELAYS[request.model])
        if request.model == "fast" and calls[key] == 1:
            raise ServerError("500 once per question")
        return f"{request.model} answers"

    retries: list[RetryScheduled] = []
    result = nbllm.run(
        data(3, 2),
        engine=FakeEngine(handler),
        model=["fast", "slow"],
        ensemble="first",
        retries=RetryPolicy(retries=3, initial=0.001, maximum=0.001),
        listeners=[lambda e: retries.append(e) if isinstance(e, RetryScheduled) else None],
        **FAST,
    )
    df = result.df
    assert df["error"].isna().all() and set(df["model"]) == {"fast"}
    # Each turn: fast failed once and answered; slow's request was withdrawn: 3 requests.
    assert list(df["attempts"]) == [3] * 6
    assert result.summary.retries == len(retries) == 6
