"""One set of figures: the summary, the dashboard, the text bar and a job count rows alike."""

from __future__ import annotations

import io

import pytest

import nbllm
from nbllm.errors import RequestRejected, ServerError
from nbllm.executor.events import RetryScheduled, RunFinished, RunStarted, TurnFinished
from nbllm.executor.stats import RunStats, Snapshot
from nbllm.results import RowTotals, RunResult, RunSummary, request_latency
from nbllm.types import ChatRequest, TurnRecord
from nbllm.ui.dashboard import Dashboard
from nbllm.ui.progress import TextProgress

FAST = nbllm.RetryPolicy(retries=2, initial=0.0)


def record(
    turn: int = 0,
    *,
    error: str | None = None,
    latency: float | None = 0.5,
    tokens: tuple[int | None, int | None] = (10, 5),
    cost: float | None = None,
    attempts: int = 1,
    cached: bool = False,
    resumed: bool = False,
) -> TurnRecord:
    return TurnRecord(
        conversation_id="c",
        turn=turn,
        question="q",
        answer=None if error else "a",
        latency_s=latency,
        prompt_tokens=tokens[0],
        completion_tokens=tokens[1],
        cost_usd=cost,
        attempts=attempts,
        error=error,
        cached=cached,
        resumed=resumed,
    )


# -- the rules for one row ------------------------------------------------------------


def test_a_latency_counts_only_for_a_request_answered_in_this_run():
    assert request_latency(record(latency=0.5)) == 0.5
    assert request_latency(record(latency=None)) is None
    assert request_latency(record(error="ServerError: 500")) is None
    assert request_latency(record(cached=True, attempts=0)) is None
    assert request_latency(record(resumed=True)) is None


def test_only_an_answered_row_brings_tokens():
    totals = RowTotals.of([record(tokens=(10, 5)), record(tokens=(None, 5))])
    assert (totals.prompt_tokens, totals.completion_tokens, totals.tokens) == (10, 10, 20)
    totals.add(record(error="RequestTimeout: slow", tokens=(10, 5)))
    assert totals.tokens == 20


def test_row_totals():
    totals = RowTotals.of(
        [
            record(latency=0.25, attempts=3, cost=0.5),
            record(latency=0.75),
            record(error="ServerError: 500", attempts=2),
            record(error="skipped: turn 0 failed", attempts=0, tokens=(None, None)),
            record(cached=True, attempts=0, latency=0.0),
            record(cached=True, resumed=True, latency=9.0),  # resumed, not cached again
            record(resumed=True, attempts=2, latency=8.0, cost=0.25),
        ]
    )
    assert (totals.turns, totals.answered, totals.errors) == (7, 5, 2)
    assert (totals.cached, totals.resumed) == (1, 2)
    assert totals.latencies() == [0.25, 0.75]
    # Resumed rows keep the attempts of the run that sent them.
    assert (totals.attempts, totals.sent, totals.retries) == (9, 5, 4)
    assert totals.tokens == 5 * 15
    assert totals.cost_usd == pytest.approx(0.75)
    assert RowTotals().cost_usd is None


def test_the_summary_is_the_totals_over_the_wall_time():
    rows = [record(latency=0.1 * k, attempts=1 + k % 2) for k in range(1, 11)]
    result = RunResult(rows, conversations=10, wall_s=2.0, started_at=0.0)
    totals = RowTotals.of(rows)
    assert result.summary == RunSummary.from_totals(
        totals, conversations=10, wall_s=2.0, interrupted=False
    )
    assert result.summary.requests_per_s == pytest.approx(totals.attempts / 2.0)
    assert result.summary.tokens_per_s == pytest.approx(totals.tokens / 2.0)


# -- the live figures ---------------------------------------------------------------------


def test_stats_is_a_listener_with_cheap_counts():
    stats = RunStats()
    stats(RunStarted(2, 3, "m", "fake", 0.0))
    stats(RetryScheduled("c", 0, 1, "ServerError: 500", 0.0, 0.1))
    stats(TurnFinished(record(attempts=2), 0, 0.2))
    stats(TurnFinished(record(1, error="RequestRejected: no"), 0, 0.3))
    assert (stats.turns_done, stats.errors, stats.retries) == (2, 1, 1)
    s = stats.snapshot(now=1.0)
    assert (s.turns_done, s.errors, s.retries) == (2, 1, 1)


def test_a_snapshot_counts_rows_as_the_summary_does():
    rows = [
        record(latency=0.25, cost=0.5),
        record(1, latency=0.75),
        record(2, error="ServerError: 500", attempts=3),
        record(3, cached=True, attempts=0, latency=0.0),
        record(4, resumed=True, latency=8.0, cost=0.25),
    ]
    stats = RunStats()
    stats.update(RunStarted(1, len(rows), "m", "fake", 0.0))
    for i, row in enumerate(rows):
        stats.update(TurnFinished(row, 0, 0.1 * i))
    stats.update(RunFinished(3, 2, 1.0, False, 1.0))
    snap = stats.snapshot(now=5.0)
    summary = RunResult(rows, conversations=1, wall_s=1.0, started_at=0.0).summary
    assert snap.turns_done == summary.turns
    assert snap.errors == summary.turns_failed
    assert (snap.cached, snap.resumed) == (summary.cached, summary.resumed)
    assert (snap.latency_p50, snap.latency_p95) == (summary.latency_p50, summary.latency_p95)
    assert snap.cost_usd == summary.cost_usd


def test_text_progress_shows_the_counts_of_its_stats():
    out = io.StringIO()
    bar = TextProgress(file=out)
    bar(RunStarted(3, 3, "m", "fake", 0.0))
    bar(RetryScheduled("a", 0, 1, "ServerError: 500", 0.0, 0.1))
    bar(TurnFinished(record(attempts=2), 0, 0.2))
    bar(TurnFinished(record(1, error="RequestRejected: no"), 0, 0.3))
    assert (bar.stats.errors, bar.stats.retries) == (1, 1)
    bar(TurnFinished(record(2), 0, 0.4))
    bar(RunFinished(2, 1, 0.4, False, 0.4))
    last_line = out.getvalue().rstrip().split("\r")[-1]
    assert "3/3" in last_line and "errors=1, retries=1" in last_line
    assert bar.stats.snapshot().finished


# -- one run, every view ------------------------------------------------------------------


def test_every_view_of_a_run_agrees(tmp_path):
    """A resumed, a cached, a retried and a failed turn: the summary, the dashboard's
    snapshot, the text bar and the job count each of them alike."""
    data = [
        {"id": "c0", "turns": ["resumed 0", "resumed 1"]},
        {"id": "c1", "turns": ["cached"]},
        {"id": "c2", "turns": ["resumed 2"]},
        {"id": "c3", "turns": ["retried"]},
        {"id": "c4", "turns": ["rejected", "skipped"]},
    ]
    refused = {"cached", "retried", "rejected"}
    flaky: set[str] = set()

    def handler(request: ChatRequest) -> str:
        question = str(request.messages[-1]["content"])
        if question in flaky:
            flaky.discard(question)
            msg = "try again"
            raise ServerError(msg, status=503)
        if question in refused:
            msg = "refused"
            raise RequestRejected(msg, status=400)
        return f"answer to {question}"

    engine = nbllm.FakeEngine(handler)
    checkpoint = tmp_path / "run.sqlite"
    options = {"engine": engine, "model": "m", "retries": FAST, "progress": False}
    # The first run checkpoints c0 and c2; c1, c3 and c4 are refused.
    first = nbllm.run(data, checkpoint=checkpoint, **options)
    assert first.summary.turns_ok == 3
    # Another run answers c1's question alone, which puts it in the response cache.
    refused.discard("cached")
    nbllm.run([{"id": "x", "turns": ["cached"]}], checkpoint=False, **options)
    # Now c3 fails once and is then answered; c4 is still refused.
    refused.discard("retried")
    flaky.add("retried")

    dashboard = Dashboard(gpu=False)
    out = io.StringIO()
    text = TextProgress(file=out)
    job = nbllm.submit(data, checkpoint=checkpoint, listeners=[dashboard, text], **options)
    result = job.result(timeout=30)

    summary = result.summary
    expected = {"turns": 7, "errors": 2, "retries": 1, "cached": 1, "resumed": 3}
    assert {
        "turns": summary.turns,
        "errors": summary.turns_failed,
        "retries": summary.retries,
        "cached": summary.cached,
        "resumed": summary.resumed,
    } == expected
    for snap in (dashboard.stats.snapshot(), text.stats.snapshot(), job.stats.snapshot()):
        assert isinstance(snap, Snapshot)
        assert snap.finished and not snap.interrupted
        assert {
            "turns": snap.turns_done,
            "errors": snap.errors,
            "retries": snap.retries,
            "cached": snap.cached,
            "resumed": snap.resumed,
        } == expected
        assert (snap.latency_p50, snap.latency_p95) == (summary.latency_p50, summary.latency_p95)
        assert snap.cost_usd == summary.cost_usd
    assert job.turns_done == 7
    assert "7 / 7 turns" in dashboard.turns_label.value
    assert "retries 1" in dashboard.figures.value and "2 errors" in dashboard.figures.value
    assert "cached 1" in dashboard.figures.value and "resumed 3" in dashboard.figures.value
    assert "errors=2, retries=1" in out.getvalue()
