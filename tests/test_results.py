"""RunResult: the DataFrame's shape and types, and the summary's figures."""

from __future__ import annotations

import numpy as np
import pytest

from nbllm.results import COLUMNS, RunResult
from nbllm.types import TurnRecord


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


@pytest.fixture
def result() -> RunResult:
    latencies = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    records = [record(i, latency=lat, attempts=1 + i % 3) for i, lat in enumerate(latencies)]
    records.append(record(10, latency=None, error="ServerError: HTTP 503", attempts=4))
    records.append(record(11, latency=None, error="skipped: turn 0 failed", attempts=0))
    return RunResult(records, conversations=6, wall_s=2.0, started_at=1000.0)


def test_df_columns_order_and_types(result):
    df = result.df
    assert tuple(df.columns) == COLUMNS
    assert len(df) == 12
    assert df["turn"].dtype == "int64" and df["attempts"].dtype == "int64"
    assert df["latency_s"].dtype == "float64"
    assert str(df["prompt_tokens"].dtype) == "Int64"  # missing usage stays missing, not 0
    assert df["prompt_tokens"].isna().sum() == 2


def test_summary_figures(result):
    s = result.summary
    assert (s.conversations, s.turns, s.turns_ok, s.turns_failed) == (6, 12, 10, 2)
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


def test_an_empty_result_has_no_latency_and_no_cost():
    s = RunResult([], conversations=0, wall_s=0.0, started_at=0.0).summary
    assert s.latency_p50 is None and s.cost_usd is None and s.requests_per_s == 0.0
    assert "latency_p50        -" in str(s)
