"""One set of figures: the summary, the dashboard, the text bar and a job count rows alike."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest

import nbllm
from nbllm.errors import ConfigError, RequestRejected, ServerError
from nbllm.executor.events import (
    EnginePhase,
    RequestSent,
    RetryScheduled,
    RunFinished,
    RunStarted,
    StopRequested,
    TurnFinished,
)
from nbllm.executor.stats import RunStats, Snapshot, one_line
from nbllm.results import RowTotals, RunResult, RunSummary, request_latency
from nbllm.testing import Fault, TestServer
from nbllm.types import NOT_RUN, ChatRequest, ChatResponse, TurnRecord
from nbllm.ui.dashboard import Dashboard
from nbllm.ui.progress import TextProgress

FAST = nbllm.RetryPolicy(retries=2, initial=0.0)
STOPPED = f"{NOT_RUN}: the run was stopped before this turn finished"


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
    finish_reason: str | None = None,
) -> TurnRecord:
    return TurnRecord(
        finish_reason=finish_reason,
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
    assert (totals.failed, totals.not_run) == (2, 0)
    assert (totals.cached, totals.resumed) == (1, 2)
    assert totals.latencies() == [0.25, 0.75]
    # What this run sent: resumed rows' attempts were an earlier run's.
    assert (totals.attempts, totals.sent, totals.retries) == (6, 3, 3)
    assert totals.tokens == 5 * 15
    assert totals.sent_tokens == 2 * 15  # neither the cached nor the resumed rows' tokens
    assert totals.cost_usd == pytest.approx(0.75)
    assert RowTotals().cost_usd is None


def test_an_answer_cut_short_counts_whoever_answered_it():
    totals = RowTotals.of(
        [
            record(finish_reason="length"),
            record(1, finish_reason="length", resumed=True),
            record(2, finish_reason="length", cached=True, attempts=0),
            record(3, finish_reason="stop"),
            record(4),
            # A failed row has no answer to be cut, whatever its row says.
            record(5, error="ServerError: 500", finish_reason="length"),
        ]
    )
    assert totals.truncated == 3


def test_a_turn_that_never_ran_is_not_run_not_failed():
    totals = RowTotals.of(
        [record(), record(1, error="ServerError: 500"), record(2, error=STOPPED, attempts=0)]
    )
    assert (totals.turns, totals.answered, totals.failed, totals.not_run) == (3, 1, 1, 1)
    assert totals.errors == 2
    totals.add_not_run(4)  # turns the result has a row for, but no event ever said so
    assert (totals.turns, totals.not_run, totals.failed) == (7, 5, 1)


def test_the_summary_is_the_totals_over_the_wall_time():
    rows = [record(latency=0.1 * k, attempts=1 + k % 2) for k in range(1, 11)]
    result = RunResult(rows, conversations=10, wall_s=2.0, started_at=0.0)
    totals = RowTotals.of(rows)
    assert result.summary == RunSummary.from_totals(
        totals, conversations=10, wall_s=2.0, interrupted=False
    )
    assert result.summary.requests_per_s == pytest.approx(totals.attempts / 2.0)
    assert result.summary.tokens_per_s == pytest.approx(totals.sent_tokens / 2.0)


# -- the live figures ---------------------------------------------------------------------


def test_stats_is_a_listener_with_cheap_counts():
    stats = RunStats()
    stats(RunStarted(2, 3, "m", "fake", 0.0))
    stats(RetryScheduled("c", 0, 1, "ServerError: 500", 0.0, 0.1))
    stats(RequestSent("c", 0, 2, 1, 0.1))  # the retry sent: what counts as one
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
    assert snap.failed == snap.errors == summary.turns_failed
    assert (snap.cached, snap.resumed) == (summary.cached, summary.resumed)
    assert (snap.latency_p50, snap.latency_p95) == (summary.latency_p50, summary.latency_p95)
    assert snap.cost_usd == summary.cost_usd
    assert snap.verdict == summary.verdict


def test_live_rates_are_windowed_and_the_finished_ones_the_summarys():
    stats = RunStats(window_s=5.0)
    stats.update(RunStarted(20, 20, "m", "fake", 100.0))
    rows = []
    for i in range(20):  # one turn a second, 2 requests and 15 tokens each
        row = record(i, attempts=2, latency=0.5)
        rows.append(row)
        stats.update(TurnFinished(row, 0, 101.0 + i))
    live = stats.snapshot(now=120.5)
    # The last 5 s hold 5 turns (at 116 to 120 s).
    assert live.requests_per_s == pytest.approx(2 * 5 / 5.0)
    assert live.tokens_per_s == pytest.approx(15 * 5 / 5.0)
    assert live.eta_s == 0.0 and not live.finished and live.verdict is None
    stats.update(RunFinished(20, 0, 40.0, False, 140.0))
    done = stats.snapshot(now=500.0)
    summary = RunResult(rows, conversations=20, wall_s=40.0, started_at=100.0).summary
    assert done.requests_per_s == summary.requests_per_s == pytest.approx(40 / 40.0)
    assert done.tokens_per_s == summary.tokens_per_s == pytest.approx(300 / 40.0)
    assert done.elapsed_s == 40.0 and done.eta_s == 0.0
    assert done.verdict == summary.verdict == "20/20 turns ok in 40.0 s"


def test_requests_in_flight_count_from_the_moment_they_are_sent():
    stats = RunStats()
    stats.update(RunStarted(3, 3, "m", "fake", 0.0))
    for n in (1, 2, 3):
        stats.update(RequestSent(f"c{n}", 0, 1, n, 0.1 * n))
        assert stats.snapshot(now=1.0).in_flight == n
    stats.update(TurnFinished(record(), 2, 1.0))
    assert stats.snapshot(now=1.0).in_flight == 2
    stats.update(RunFinished(1, 0, 1.0, True, 1.0))
    assert stats.snapshot(now=1.0).in_flight == 0


def test_errors_by_kind_and_the_last_error():
    stats = RunStats()
    stats.update(RunStarted(6, 6, "m", "fake", 0.0))
    assert stats.snapshot(now=0.0).last_error is None
    stats.update(RetryScheduled("c", 0, 1, "Cannot connect to host 127.0.0.1:9999", 0.5, 0.1))
    # A retry's error is in sight at once, before any turn has failed.
    assert stats.snapshot(now=0.2).last_error == "Cannot connect to host 127.0.0.1:9999"
    errors = [
        "ConnectionFailed: Cannot connect to host 127.0.0.1:9999",
        "ConnectionFailed: Cannot connect to host 127.0.0.1:9999",
        "ServerError: HTTP 503\nService\tUnavailable",
        "skipped: turn 0 failed",
        STOPPED,
    ]
    for i, error in enumerate(errors):
        stats.update(TurnFinished(record(i, error=error), 0, 1.0 + i))
    snap = stats.snapshot(now=9.0)
    assert snap.errors_by_kind == (("ConnectionFailed", 2), ("ServerError", 1), ("skipped", 1))
    assert sum(n for _, n in snap.errors_by_kind) == snap.failed == 4
    # The latest error that says what went wrong: on one line, in full.
    assert snap.last_error == "ServerError: HTTP 503 Service Unavailable"
    assert (snap.not_run, snap.errors) == (1, 5)


def test_the_last_error_never_shows_a_key():
    for text in (
        "AuthenticationError: Incorrect API key provided: sk-proj-abcdef123456",
        "ServerError: header Authorization: Bearer abc.def-123456 refused",
        "RequestRejected: https://host/v1?api_key=hunter2hunter2&x=1",
        "RequestRejected: {'api_key': 'secret-value-123'}",
    ):
        line = one_line(text)
        for secret in ("abcdef123456", "abc.def-123456", "hunter2hunter2", "secret-value-123"):
            assert secret not in line, line
        assert "***" in line
    assert one_line("ServerError: HTTP 500") == "ServerError: HTTP 500"


def test_stopping_shows_until_the_run_has_ended():
    stats = RunStats()
    stats.update(RunStarted(10, 10, "m", "fake", 0.0))
    for i in range(4):
        stats.update(TurnFinished(record(i), 3, 1.0 + i))
    assert stats.snapshot(now=5.0).eta_s is not None
    stats.update(StopRequested(10.0, 3, 5.0))
    stopping = stats.snapshot(now=6.0)
    assert stopping.stopping and stopping.eta_s is None and not stopping.finished
    stats.update(RunFinished(4, 0, 6.5, True, 6.5))
    end = stats.snapshot(now=7.0)
    assert not end.stopping and end.finished and end.interrupted
    # The turns that never ran are in the final figures, as in the result.
    assert (end.turns_done, end.not_run, end.failed, end.errors) == (4, 6, 0, 6)
    assert end.eta_s is None
    assert end.verdict == (
        "4 of 10 turns ok, 6 not run (stopped), 0 failed in 6.5 s — run it again to resume"
    )


def test_a_run_that_stopped_by_itself_says_why():
    reason = "cannot reach http://127.0.0.1:9999/v1: connection refused"
    stats = RunStats()
    stats.update(RunStarted(12, 12, "m", "openai", 0.0))
    for i in range(3):
        stats.update(TurnFinished(record(i, error=STOPPED, attempts=0), 0, 0.1))
    stats.update(RunFinished(0, 0, 0.2, False, 0.2, stop_reason=reason))
    snap = stats.snapshot(now=1.0)
    assert snap.stop_reason == reason
    assert snap.verdict == f"{reason} — 0 of 12 turns ok, 12 not run"
    assert (snap.turns_done, snap.not_run) == (0, 12)


def test_an_engine_prepares_before_the_run_starts():
    stats = RunStats()
    stats.update(EnginePhase("converting", 3, 10, 100.0, detail="tiny-model"))
    snap = stats.snapshot(now=101.0)
    assert (snap.phase, snap.phase_done, snap.phase_total) == ("converting", 3, 10)
    assert snap.phase_detail == "tiny-model"
    assert not snap.started and snap.elapsed_s == 0.0
    stats.update(EnginePhase("loading", None, None, 102.0))
    snap = stats.snapshot(now=102.0)
    assert (snap.phase, snap.phase_done, snap.phase_total, snap.phase_detail) == (
        "loading",
        None,
        None,
        None,
    )
    stats.update(RunStarted(1, 1, "m", "torch", 103.0))
    snap = stats.snapshot(now=104.0)
    assert snap.started and snap.phase is None and snap.phase_total is None
    stats.update(TurnFinished(record(), 0, 104.0))
    stats.update(RunFinished(1, 0, 1.0, False, 104.0))
    # The next run's preparation starts a new page.
    stats.update(EnginePhase("loading", 1, 2, 200.0))
    snap = stats.snapshot(now=200.0)
    assert snap.phase == "loading" and not snap.finished and snap.turns_done == 0


def test_a_local_engines_tokens_generated_show_while_the_run_goes():
    stats = RunStats()
    stats.update(EnginePhase("generating", 7, None, 99.0))  # before the run: not its count
    stats.update(RunStarted(1, 2, "m", "torch", 100.0))
    assert stats.snapshot(now=100.5).generated_tokens is None
    stats.update(EnginePhase("generating", 40, None, 101.0))
    snap = stats.snapshot(now=101.0)
    assert snap.generated_tokens == 40 and snap.phase is None and snap.started
    stats.update(EnginePhase("generating", 95, None, 102.0))
    stats.update(TurnFinished(record(tokens=(10, 95)), 0, 102.1))
    assert stats.snapshot(now=102.2).generated_tokens == 95
    stats.update(RunFinished(1, 0, 2.5, False, 102.5))
    stats.update(EnginePhase("generating", 120, None, 102.6))  # late: changes nothing
    snap = stats.snapshot(now=103.0)
    assert snap.finished and snap.generated_tokens is None and snap.turns_done == 1


@pytest.mark.parametrize("window_s", [0, -5.0])
def test_a_window_that_is_not_positive_is_refused(window_s):
    with pytest.raises(ConfigError, match="window_s must be a number of seconds > 0"):
        RunStats(window_s=window_s)


def test_text_progress_shows_the_counts_of_its_stats():
    out = io.StringIO()
    bar = TextProgress(file=out)
    bar(RunStarted(3, 3, "m", "fake", 0.0))
    bar(RetryScheduled("a", 0, 1, "ServerError: 500", 0.0, 0.1))
    bar(RequestSent("a", 0, 2, 0, 0.1))
    bar(TurnFinished(record(attempts=2), 0, 0.2))
    bar(TurnFinished(record(1, error="RequestRejected: no"), 0, 0.3))
    assert (bar.stats.errors, bar.stats.retries) == (1, 1)
    bar(TurnFinished(record(2), 0, 0.4))
    bar(RunFinished(2, 1, 0.4, False, 0.4))
    last_line = out.getvalue().rstrip().split("\r")[-1]
    assert "3/3" in last_line and "failed=1, retries=1" in last_line
    assert bar.stats.snapshot().finished


# -- one run, every view ------------------------------------------------------------------


def summary_figures(summary: RunSummary) -> dict[str, object]:
    return {
        "turns": summary.turns,
        "ok": summary.turns_ok,
        "failed": summary.turns_failed,
        "not run": summary.turns_not_run,
        "retries": summary.retries,
        "cached": summary.cached,
        "resumed": summary.resumed,
        "cut short": summary.truncated,
        "cached tokens": (summary.cached_tokens, summary.cached_tokens_share),
        "requests/s": summary.requests_per_s,
        "tokens/s": summary.tokens_per_s,
        "latency": (summary.latency_p50, summary.latency_p95),
        "cost": summary.cost_usd,
        "saved": summary.saved_usd,
        "interrupted": summary.interrupted,
        "verdict": summary.verdict,
    }


def snapshot_figures(snap: Snapshot) -> dict[str, object]:
    assert isinstance(snap, Snapshot) and snap.finished
    assert snap.errors == snap.failed + snap.not_run
    return {
        "turns": snap.turns_done + snap.not_run,
        "ok": snap.turns_ok,
        "failed": snap.failed,
        "not run": snap.not_run,
        "retries": snap.retries,
        "cached": snap.cached,
        "resumed": snap.resumed,
        "cut short": snap.truncated,
        "cached tokens": (snap.cached_tokens, snap.cached_tokens_share),
        "requests/s": snap.requests_per_s,
        "tokens/s": snap.tokens_per_s,
        "latency": (snap.latency_p50, snap.latency_p95),
        "cost": snap.cost_usd,
        "saved": snap.saved_usd,
        "interrupted": snap.interrupted,
        "verdict": snap.verdict,
    }


def refusing(refused: set[str], flaky: set[str]):
    """A handler that refuses the questions in ``refused`` and fails each one in ``flaky``
    once (503, retried). Its engine says it took a prompt token per earlier message from
    its cache."""

    def handler(request: ChatRequest) -> ChatResponse:
        question = str(request.messages[-1]["content"])
        if question in flaky:
            flaky.discard(question)
            msg = "try again"
            raise ServerError(msg, status=503)
        if question in refused:
            msg = "refused"
            raise RequestRejected(msg, status=400)
        n = len(request.messages)
        return ChatResponse(f"answer to {question}", "m", 4 * n, 3, cached_tokens=n - 1)

    return handler


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
    engine = nbllm.FakeEngine(refusing(refused, flaky))
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

    figures = summary_figures(result.summary)
    expected = {"turns": 7, "ok": 5, "failed": 2, "not run": 0, "retries": 1}
    expected |= {"cached": 1, "resumed": 3, "interrupted": False}
    # c0's second turn (3 messages) is the one with cached prompt tokens, of 28 in all.
    expected |= {"cached tokens": (2, 2 / 28)}
    assert {key: figures[key] for key in expected} == expected
    for snap in (dashboard.stats.snapshot(), text.stats.snapshot(), job.stats.snapshot()):
        assert snapshot_figures(snap) == figures
    assert job.turns_done == 7
    assert "failed=2, retries=1" in out.getvalue()


def test_a_run_stopped_half_way_has_the_same_figures_in_the_summary_and_the_snapshot(
    tmp_path,
):
    """Resumed, cached, retried, failed, answered and never-run turns, counted alike."""
    data = [{"id": f"c{i}", "turns": [f"c{i} q0", f"c{i} q1"]} for i in range(30)]
    refused = {f"c{i} q0" for i in range(4, 30)}
    flaky: set[str] = set()
    engine = nbllm.FakeEngine(refusing(refused, flaky), latency=0.02)
    checkpoint = tmp_path / "run.sqlite"
    options = {"engine": engine, "model": "m", "retries": FAST, "progress": False}
    options |= {"concurrency": 2, "max_conversations": 2}
    nbllm.run(data, checkpoint=checkpoint, **options)  # c0..c3 answered and checkpointed
    nbllm.run(
        [{"id": "x", "turns": ["c4 q0"]}],
        checkpoint=False,
        # The same handler's code (its identity) with nothing refused: its answer is
        # cached for the engine of the run below, which refuses "c4 q0" when asked.
        **options | {"engine": nbllm.FakeEngine(refusing(set(), set()))},
    )
    refused.clear()
    refused.update({"c6 q1", "c7 q0"})
    flaky.update({"c5 q0", "c8 q1"})

    half_way = threading.Event()
    stats = RunStats()

    def watch(event) -> None:
        if isinstance(event, TurnFinished) and not event.record.resumed:
            sent = stats.turns_done - stats.snapshot().resumed
            if sent >= 12:
                half_way.set()

    job = nbllm.submit(data, checkpoint=checkpoint, listeners=[stats, watch], **options)
    assert half_way.wait(30)
    result = job.stop(timeout=30)

    summary = result.summary
    assert result.interrupted and summary.turns_not_run > 0 and summary.turns_failed > 0
    assert (summary.resumed, summary.cached) == (8, 1) and summary.retries >= 1
    assert summary.turns == 60
    assert summary.turns_ok + summary.turns_failed + summary.turns_not_run == 60
    assert "not run (stopped)" in summary.verdict
    for snap in (stats.snapshot(), job.stats.snapshot()):
        assert snapshot_figures(snap) == summary_figures(summary)
    assert result.df["error"].str.startswith(NOT_RUN).sum() == summary.turns_not_run


def test_a_fully_resumed_run_sent_nothing_and_says_so(tmp_path):
    data = [{"id": f"c{i}", "turns": [f"c{i} q0", f"c{i} q1"]} for i in range(50)]
    flaky = {"c3 q0"}
    engine = nbllm.FakeEngine(refusing(set(), flaky))
    checkpoint = tmp_path / "run.sqlite"
    options = {"engine": engine, "model": "m", "retries": FAST, "progress": False}
    first = nbllm.run(data, checkpoint=checkpoint, **options)
    assert first.summary.retries == 1 and first.summary.requests_per_s > 0
    calls = engine.calls

    stats = RunStats()
    again = nbllm.run(data, checkpoint=checkpoint, listeners=[stats], **options)
    summary = again.summary
    assert engine.calls == calls
    assert summary.resumed == summary.turns_ok == 100
    # Nothing was sent in this run: no rate, no retries, no latency, however short the run.
    assert (summary.requests_per_s, summary.tokens_per_s, summary.retries) == (0.0, 0.0, 0)
    assert (summary.latency_p50, summary.latency_p95, summary.latency_p99) == (None,) * 3
    # The totals are the result's: every row's tokens, as the first run counted them.
    assert summary.prompt_tokens == first.summary.prompt_tokens > 0
    assert summary.completion_tokens == first.summary.completion_tokens > 0
    assert snapshot_figures(stats.snapshot()) == summary_figures(summary)


def test_resumed_cached_and_sent_turns_over_http(tmp_path):
    """One run with turns resumed from its checkpoint, one from the response cache and the
    rest sent: the rates, retries and latencies are those of the requests the server saw
    in this run; the token totals and the answers cut short are the whole result's."""
    data = [
        {"id": f"c{i}", "turns": [f"c{i} q0" + " and then some more words" * (i % 2), f"c{i} q1"]}
        for i in range(8)
    ]
    checkpoint = tmp_path / "run.sqlite"
    # Every request fails once (500) and is answered on its retry; max_tokens cuts the
    # answers to the long questions (the odd conversations' first turns).
    faults = {"faults": {Fault.SERVER_ERROR: 1.0}, "fault_first": 1, "latency": 0.005}
    with TestServer(**faults) as server:
        options = {"api_base": server.url, "model": "nbllm-test", "retries": FAST}
        options |= {"max_tokens": 10, "progress": False, "concurrency": 1, "max_conversations": 1}
        half_way = threading.Event()
        answered = []

        def watch(event) -> None:
            if isinstance(event, TurnFinished):
                answered.append(event)
                if len(answered) >= 4:
                    half_way.set()

        job = nbllm.submit(data, checkpoint=checkpoint, listeners=[watch], **options)
        assert half_way.wait(30)
        assert job.stop(timeout=30).summary.turns_not_run > 0
        nbllm.run([{"id": "x", "turns": [data[7]["turns"][0]]}], checkpoint=False, **options)
        server.reset()

        stats = RunStats()
        result = nbllm.run(data, checkpoint=checkpoint, listeners=[stats], **options)
        requests = len(server.requests)

    summary, df = result.summary, result.df
    sent = df[~df["resumed"] & ~df["cached"]]
    assert summary.turns_ok == 16 and summary.resumed >= 4 and summary.cached == 1
    assert requests == 2 * len(sent) > 0
    assert summary.requests_per_s * summary.wall_s == pytest.approx(requests)
    assert summary.retries == len(sent)
    sent_tokens = int((sent["prompt_tokens"] + sent["completion_tokens"]).sum())
    assert summary.tokens_per_s * summary.wall_s == pytest.approx(sent_tokens)
    latencies = sorted(sent["latency_s"].astype(float))
    assert summary.latency_p50 == pytest.approx(float(np.percentile(latencies, 50)))
    assert summary.latency_p99 == pytest.approx(float(np.percentile(latencies, 99)))
    assert summary.prompt_tokens == int(df["prompt_tokens"].sum())
    assert summary.completion_tokens == int(df["completion_tokens"].sum())
    # Resumed and cached answers say why they ended, as when they were first answered.
    assert df["finish_reason"].notna().all()
    assert summary.truncated == (df["finish_reason"] == "length").sum() == 4
    assert "(4 cut short by max_tokens)" in summary.verdict
    assert snapshot_figures(stats.snapshot()) == summary_figures(summary)
