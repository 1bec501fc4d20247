"""A hard budget cap: no new request once the spending reaches it, the ones in flight finish,
the result says why, and a re-run with a higher cap resumes and sends nothing twice."""

from __future__ import annotations

import pytest
from helpers import on_fake_clock

from nbllm import ChatRequest, ChatResponse, Conversation, FakeEngine
from nbllm.errors import ConfigError
from nbllm.executor import Executor
from nbllm.executor.budget import Budget
from nbllm.executor.checkpoint import CheckpointStore, RunIdentity, dataset_hash

COST = 0.25  # dollars an answer


def priced(request: ChatRequest) -> ChatResponse:
    return ChatResponse(
        text=f"answer to {request.messages[-1]['content']}",
        model=request.model,
        prompt_tokens=10,
        completion_tokens=5,
        cost_usd=COST,
    )


def conversations(n: int, turns: int = 1) -> list[Conversation]:
    return [
        Conversation(id=f"c{i}", questions=tuple(f"c{i} q{k}" for k in range(turns)))
        for i in range(n)
    ]


@on_fake_clock
async def test_the_run_stops_once_the_cost_cap_is_reached_and_the_in_flight_finish():
    """Two slots, $0.25 an answer, a $1.00 cap: after four answers nothing new starts.
    The two sent together when the spending stood at $0.75 both finish: the overshoot is
    at most what was in flight."""
    engine = FakeEngine(priced, latency=1.0)
    budget = Budget(max_cost_usd=1.0)
    executor = Executor(engine, model="m", concurrency=2, budget=budget)
    result = await executor.run(conversations(10))
    s = result.summary
    assert s.stop_reason == "budget: max_cost_usd=1.0 reached"
    assert s.verdict.startswith("budget: max_cost_usd=1.0 reached")
    assert not result.interrupted
    assert s.turns_ok == engine.calls == 4
    assert s.cost_usd == pytest.approx(1.0)
    assert s.turns_not_run == 6
    not_run = result.df[result.df["answer"].isna()]
    assert all(e.startswith("not run: budget: max_cost_usd=1.0") for e in not_run["error"])


@on_fake_clock
async def test_the_overshoot_is_at_most_the_requests_in_flight():
    """Eight slots and a cap of one answer's cost: the first wave of eight is in flight
    before any answer is back, so eight finish, and not one more starts."""
    engine = FakeEngine(priced, latency=1.0)
    executor = Executor(engine, model="m", concurrency=8, budget=Budget(max_cost_usd=COST))
    result = await executor.run(conversations(20))
    assert engine.calls == 8
    assert result.summary.turns_ok == 8 and result.summary.turns_not_run == 12


@on_fake_clock
async def test_a_token_cap_counts_prompt_and_completion_tokens():
    engine = FakeEngine(priced, latency=1.0)  # 15 tokens an answer
    executor = Executor(engine, model="m", concurrency=1, budget=Budget(max_tokens_total=40))
    result = await executor.run(conversations(5))
    assert engine.calls == 3  # 15, 30 (< 40: one more), 45 (>= 40: stop)
    assert result.summary.stop_reason == "budget: max_tokens_total=40 reached"


@on_fake_clock
async def test_cost_per_1k_tokens_prices_answers_the_engine_did_not():
    engine = FakeEngine(lambda r: "four tokens answer!", latency=0.1)
    budget = Budget(max_cost_usd=10.0, cost_per_1k_tokens=2.0)
    result = await Executor(engine, model="m", budget=budget).run(conversations(2))
    tokens = result.df["prompt_tokens"] + result.df["completion_tokens"]
    assert list(result.df["cost_usd"]) == pytest.approx(list(tokens * 2.0 / 1000))
    assert result.summary.stop_reason is None


@on_fake_clock
async def test_a_cost_cap_with_no_known_cost_stops_instead_of_guessing():
    engine = FakeEngine(lambda r: "no price", latency=1.0)
    executor = Executor(engine, model="m", concurrency=1, budget=Budget(max_cost_usd=5.0))
    result = await executor.run(conversations(4))
    assert engine.calls == 1
    reason = result.summary.stop_reason
    assert reason is not None and "no cost is known for 'm'" in reason
    assert "cost_per_1k_tokens" in reason


@on_fake_clock
async def test_a_rerun_with_a_higher_cap_resumes_and_sends_nothing_twice(tmp_path):
    convs = conversations(6, turns=2)
    identity = RunIdentity(dataset=dataset_hash(convs), model="m", engine="fake")
    sent: list[str] = []

    def recording(request: ChatRequest) -> ChatResponse:
        sent.append(str(request.messages[-1]["content"]))
        return priced(request)

    async def run(cap: float):
        store = CheckpointStore.open(
            tmp_path / "ck.sqlite", identity, conversations=len(convs), turns=12
        )
        try:
            executor = Executor(
                FakeEngine(recording, latency=1.0),
                model="m",
                concurrency=2,
                checkpoint=store,
                budget=Budget(max_cost_usd=cap),
            )
            return await executor.run(convs)
        finally:
            store.close()

    first = await run(1.0)
    assert first.summary.turns_ok == 4 and first.summary.stop_reason is not None
    again = await run(1.0)  # the same cap: already reached, nothing is sent
    assert len(sent) == 4 and again.summary.resumed == 4
    more = await run(2.5)
    assert more.summary.resumed == 4
    assert len(sent) == len(set(sent)) == 10  # four, then six more; none twice
    assert more.summary.cost_usd == pytest.approx(2.5)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"max_cost_usd": -1.0}, "max_cost_usd= expected a number > 0 or None, got -1.0"),
        ({"max_tokens_total": 2.5}, "max_tokens_total= expected a whole number > 0"),
        ({"cost_per_1k_tokens": float("nan")}, "cost_per_1k_tokens= expected a number > 0"),
    ],
)
def test_a_bad_cap_is_refused(options, named):
    with pytest.raises(ConfigError, match=named.replace("(", r"\(")):
        Budget(**options)


def test_a_batch_holds_its_worst_case_and_releases_exactly_that() -> None:
    """An unknown cost is held at cost_per_1k_tokens; releasing what fit() held frees it."""
    budget = Budget(max_cost_usd=1.0, cost_per_1k_tokens=1.0)
    fits, held, why = budget.fit([(None, 400), (None, 400), (None, 400)])
    assert (fits, held) == (2, (0.8, 800)) and why is not None and "max_cost_usd" in why
    budget.release(*held)
    assert (budget.reserved_usd, budget.reserved_tokens) == (0.0, 0)
    assert budget.fit([(None, 400)])[0] == 1


def test_a_batch_that_breaks_the_token_cap_names_it() -> None:
    budget = Budget(max_cost_usd=100.0, max_tokens_total=10)
    fits, held, why = budget.fit([(0.01, 50)])
    assert (fits, held) == (0, (0.0, 0))
    assert why == "budget: max_tokens_total=10 would be passed by a batch's worst case"
