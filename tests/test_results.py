"""RunResult: the DataFrame's shape and types, the summary's figures and the verdict."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from nbllm.results import COLUMNS, RunResult, RunSummary
from nbllm.types import NOT_RUN, TurnRecord

STOPPED = f"{NOT_RUN}: the run was stopped before this turn finished"


def record(i: int, *, latency: float | None, error: str | None = None, attempts: int = 1):
    return TurnRecord(
        conversation_id=f"c{i // 2}",
        turn=i % 2,
        question=f"q{i}",
        answer=None if error else f"a{i}",
        latency_s=latency,
        prompt_tokens=None if error else 10,
        completion_tokens=None if error else 5,
        cost_usd=None if error else 0.001,
        attempts=attempts,
        error=error,
        started_at=1000.0 + i,
        finished_at=1000.5 + i,
    )


def answered(i: int = 0, **fields) -> TurnRecord:
    return TurnRecord(f"c{i}", 0, f"q{i}", answer="a", latency_s=0.5, **{"attempts": 1, **fields})


def failed(i: int = 0, error: str = "ServerError: HTTP 503") -> TurnRecord:
    return TurnRecord(f"c{i}", 0, f"q{i}", error=error, attempts=1)


def not_run(i: int = 0) -> TurnRecord:
    return TurnRecord(f"c{i}", 0, f"q{i}", error=STOPPED)


def summary_of(records: list[TurnRecord], wall_s: float = 2.0, **options) -> RunSummary:
    return RunResult(
        records, conversations=len(records), wall_s=wall_s, started_at=0.0, **options
    ).summary


@pytest.fixture
def result() -> RunResult:
    latencies = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    records = [record(i, latency=lat, attempts=1 + i % 3) for i, lat in enumerate(latencies)]
    records.append(record(10, latency=None, error="ServerError: HTTP 503", attempts=4))
    records.append(record(11, latency=None, error="skipped: turn 0 failed", attempts=0))
    return RunResult(records, conversations=6, wall_s=2.0, started_at=1000.0)


# -- the DataFrame ------------------------------------------------------------------------


def test_df_columns_order_and_types(result):
    df = result.df
    assert tuple(df.columns) == COLUMNS
    assert len(df) == 12
    dtypes = {column: str(dtype) for column, dtype in df.dtypes.items()}
    assert dtypes == {
        "conversation_id": "object",
        "turn": "Int64",
        "question": "string",
        "answer": "string",
        "parsed": "object",
        "reference": "string",
        "model": "string",
        "engine": "string",
        "deployment": "string",
        "latency_s": "Float64",
        "queue_s": "Float64",
        "service_s": "Float64",
        "prompt_tokens": "Int64",
        "cached_tokens": "Int64",
        "completion_tokens": "Int64",
        "finish_reason": "string",
        "cost_usd": "Float64",
        "saved_usd": "Float64",
        "attempts": "Int64",
        "error": "string",
        "started_at": "datetime64[ns, UTC]",
        "finished_at": "datetime64[ns, UTC]",
        "cached": "bool",
        "resumed": "bool",
    }
    assert df["prompt_tokens"].isna().sum() == 2  # missing usage stays missing, not 0
    assert df["cached_tokens"].isna().all()  # the engine did not say: missing, not 0
    assert df["saved_usd"].isna().all()  # no batch API answered


def test_df_times_are_utc_datetimes(result):
    df = result.df
    assert df["started_at"].iloc[0] == pd.Timestamp(1000.0, unit="s", tz="UTC")
    assert df["finished_at"].iloc[11] == pd.Timestamp(1011.5, unit="s", tz="UTC")
    at = RunResult(
        [answered(started_at=1796187000.123456)], conversations=1, wall_s=1.0, started_at=0.0
    )
    assert str(at.df["started_at"].iloc[0]) == "2026-12-02 04:50:00.123456+00:00"
    no_times = RunResult([not_run()], conversations=1, wall_s=0.0, started_at=0.0).df
    assert no_times["started_at"].isna().all() and no_times["finished_at"].isna().all()


def test_df_missing_is_one_kind_of_missing():
    df = RunResult(
        [answered(), failed(1), not_run(2)], conversations=3, wall_s=1.0, started_at=0.0
    ).df
    for column in df.columns:
        for value in df[column]:
            # Every missing value is pd.NA, but in the time columns, where it is NaT.
            missing = value is pd.NA or value is pd.NaT
            assert missing or not pd.isna(value), (column, value)
            assert value is not None and not (isinstance(value, float) and np.isnan(value))
    assert df["answer"].iloc[1] is pd.NA and df["latency_s"].iloc[1] is pd.NA
    assert df["error"].iloc[0] is pd.NA and df["cost_usd"].iloc[0] is pd.NA


def test_an_empty_df_keeps_its_columns_and_types():
    df = RunResult([], conversations=0, wall_s=0.0, started_at=0.0).df
    assert tuple(df.columns) == COLUMNS and df.empty
    assert str(df["started_at"].dtype) == "datetime64[ns, UTC]"
    assert str(df["latency_s"].dtype) == "Float64"


# -- the summary --------------------------------------------------------------------------


def test_summary_figures(result):
    s = result.summary
    assert (s.conversations, s.turns, s.turns_ok, s.turns_failed) == (6, 12, 10, 2)
    assert s.turns_not_run == 0 and s.stop_reason is None
    ok_latencies = [0.1 * k for k in range(1, 11)]
    assert s.latency_p50 == pytest.approx(np.percentile(ok_latencies, 50))
    assert s.latency_p95 == pytest.approx(np.percentile(ok_latencies, 95))
    assert s.latency_p99 == pytest.approx(np.percentile(ok_latencies, 99))
    attempts = sum(1 + i % 3 for i in range(10)) + 4
    assert s.retries == attempts - 11  # every sent turn's attempts beyond its first
    assert s.requests_per_s == pytest.approx(attempts / 2.0)
    assert s.tokens_per_s == pytest.approx(150 / 2.0)
    assert s.cost_usd == pytest.approx(0.01)
    assert s.success_rate == pytest.approx(10 / 12)
    assert s.to_dict()["turns_ok"] == 10


def test_turns_that_never_ran_are_not_run_not_failed():
    s = summary_of([answered(0), failed(1), not_run(2), not_run(3)])
    assert (s.turns, s.turns_ok, s.turns_failed, s.turns_not_run) == (4, 1, 1, 2)
    assert not_run().not_run and not failed().not_run and not answered().not_run


def test_rates_and_retries_count_only_what_this_run_sent():
    resumed = [answered(i, resumed=True, prompt_tokens=10, completion_tokens=5) for i in range(4)]
    earlier = TurnRecord("r", 0, "q", answer="a", attempts=3, resumed=True, prompt_tokens=9)
    cached = TurnRecord("k", 0, "q", answer="a", attempts=0, cached=True, prompt_tokens=7)
    everything_resumed = summary_of([*resumed, earlier], wall_s=0.001)
    assert everything_resumed.requests_per_s == 0.0 and everything_resumed.tokens_per_s == 0.0
    assert everything_resumed.retries == 0  # the earlier run's retries are not this run's
    assert everything_resumed.resumed == 5
    assert everything_resumed.prompt_tokens == 49  # the result's rows still hold their usage
    sent = answered(9, prompt_tokens=3, completion_tokens=2, attempts=2)
    mixed = summary_of([earlier, cached, sent], wall_s=2.0)
    assert mixed.requests_per_s == pytest.approx(2 / 2.0)
    assert mixed.tokens_per_s == pytest.approx(5 / 2.0)
    assert (mixed.retries, mixed.cached, mixed.resumed) == (1, 1, 1)


def test_answers_cut_short_are_counted_whichever_run_answered_them():
    records = [
        answered(0, finish_reason="length"),
        answered(1, finish_reason="length", resumed=True),
        answered(2, finish_reason="length", cached=True, attempts=0),
        answered(3, finish_reason="stop"),
        answered(4),  # the engine did not say
        TurnRecord("c5", 0, "q", error="ServerError: HTTP 500", attempts=1),
    ]
    result = RunResult(records, conversations=6, wall_s=1.0, started_at=0.0)
    assert result.summary.truncated == 3
    assert result.df["finish_reason"].tolist() == ["length"] * 3 + ["stop", pd.NA, pd.NA]
    assert summary_of([answered(0, finish_reason="stop")]).truncated == 0


def test_cached_prompt_tokens_add_up_every_answered_row_and_show_only_when_there_are_some():
    records = [
        answered(0, prompt_tokens=100, cached_tokens=0),
        answered(1, prompt_tokens=200, cached_tokens=150),
        answered(2, prompt_tokens=100, cached_tokens=50, resumed=True),
        answered(3, prompt_tokens=100, cached_tokens=None),  # the engine did not say
        failed(4),
    ]
    result = RunResult(records, conversations=5, wall_s=1.0, started_at=0.0)
    s = result.summary
    assert s.cached_tokens == 200 == result.df["cached_tokens"].sum()
    assert s.cached_tokens_share == pytest.approx(200 / 500)
    text = str(s)
    assert "cached_tokens        200" in text and "cached_tokens_share  0.4" in text
    assert "cached_tokens" in s._repr_html_()

    without = summary_of([answered(0, prompt_tokens=100), answered(1, cached_tokens=0)])
    assert (without.cached_tokens, without.cached_tokens_share) == (0, 0.0)
    assert "cached_tokens" not in str(without) and "cached_tokens" not in without._repr_html_()
    assert summary_of([failed()]).cached_tokens_share is None  # no prompt tokens at all


def test_an_empty_result_has_no_latency_and_no_cost():
    s = RunResult([], conversations=0, wall_s=0.0, started_at=0.0).summary
    assert s.latency_p50 is None and s.cost_usd is None and s.requests_per_s == 0.0
    assert "latency_p50        -" in str(s)


# -- the verdict --------------------------------------------------------------------------


def test_verdict_of_a_run_that_went_well():
    records = [answered(i) for i in range(180)]
    assert summary_of(records, wall_s=12.34).verdict == "180/180 turns ok in 12.3 s"


def test_verdict_says_how_many_answers_were_cut_short():
    cut = [answered(i, finish_reason="length") for i in range(12)]
    whole = [answered(i, finish_reason="stop") for i in range(168)]
    assert summary_of(cut + whole, wall_s=12.34).verdict == (
        "180/180 turns ok (12 cut short by max_tokens) in 12.3 s"
    )
    assert summary_of([*cut[:2], failed(3)], wall_s=1.0).verdict == (
        "2 of 3 turns ok (2 cut short by max_tokens), 1 failed (see the error column) in 1.0 s"
    )
    assert summary_of([cut[0], not_run(1)], wall_s=1.0).verdict == (
        "1 of 2 turns ok (1 cut short by max_tokens), 1 not run (stopped), 0 failed in 1.0 s"
        " — run it again to resume"
    )
    stopped = summary_of([cut[0], not_run(1)], stop_reason="cannot reach it")
    assert (
        stopped.verdict
        == "cannot reach it — 1 of 2 turns ok (1 cut short by max_tokens), 1 not run"
    )


def test_verdict_of_a_stopped_run():
    records = [answered(i) for i in range(24)] + [not_run(i) for i in range(156)]
    result = RunResult(records, conversations=180, wall_s=4.1, started_at=0.0, interrupted=True)
    assert result.verdict == (
        "24 of 180 turns ok, 156 not run (stopped), 0 failed in 4.1 s — run it again to resume"
    )


def test_verdict_of_a_run_with_failures():
    records = [answered(i) for i in range(170)] + [failed(i) for i in range(10)]
    assert summary_of(records, wall_s=9.8).verdict == (
        "170 of 180 turns ok, 10 failed (see the error column) in 9.8 s"
    )


def test_verdict_of_a_run_that_stopped_by_itself():
    reason = "cannot reach http://127.0.0.1:9999/v1: connection refused"
    records = [not_run(i) for i in range(12)]
    result = RunResult(records, conversations=12, wall_s=0.2, started_at=0.0, stop_reason=reason)
    assert result.stop_reason == reason and result.summary.stop_reason == reason
    assert result.verdict == f"{reason} — 0 of 12 turns ok, 12 not run"
    with_failures = summary_of(
        [failed(0, "ConnectionFailed: refused"), not_run(1)], stop_reason=reason
    )
    assert with_failures.verdict == f"{reason} — 0 of 2 turns ok, 1 failed, 1 not run"


def test_verdict_durations_and_thousands():
    records = [answered(i) for i in range(9720)]
    assert summary_of(records, wall_s=125.0).verdict == "9,720/9,720 turns ok in 2 min 05 s"
    assert summary_of(records[:1], wall_s=7322.0).verdict == "1/1 turns ok in 2 h 02 min"
    assert summary_of([], wall_s=0.0).verdict == "0/0 turns ok in 0.00 s"
    assert summary_of(records[:1], wall_s=0.042).verdict == "1/1 turns ok in 0.04 s"
    assert summary_of(records[:1], wall_s=0.996).verdict == "1/1 turns ok in 1.0 s"


def test_the_summary_prints_its_verdict_first(result):
    text = str(result.summary)
    assert text.splitlines()[0] == result.verdict
    assert "turns_not_run" in text and "stop_reason" in text
    assert result.verdict in result.summary._repr_html_()
    assert result.verdict in repr(result)
