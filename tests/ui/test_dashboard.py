"""RunStats' figures, the words and static HTML made from them, and the notebook
Dashboard's widgets and redraw timer, driven by synthetic events."""

from __future__ import annotations

import io
import sys
import threading
import time

import numpy as np
import pytest
from helpers import FakeClock

import nbllm
from nbllm.errors import ConfigError
from nbllm.executor.events import (
    BreakerChanged,
    EnginePhase,
    LimitChanged,
    RequestSent,
    RetryScheduled,
    RunFinished,
    RunStarted,
    SharedQuota,
    StopRequested,
    TurnFinished,
)
from nbllm.executor.stats import RunStats, Snapshot
from nbllm.results import RunResult
from nbllm.types import TurnRecord
from nbllm.ui.dashboard import Dashboard
from nbllm.ui.preview import ResultPreview
from nbllm.ui.progress import TextProgress
from nbllm.ui.redraw import RedrawTimer
from nbllm.ui.snapshot_text import (
    bar_style,
    error_lines,
    figure_items,
    figures_line,
    format_duration,
    format_seconds,
    status_line,
    summary_line,
)
from nbllm.ui.static_dashboard import dashboard_html, progress_html


def record(
    conversation: object = "c",
    turn: int = 0,
    *,
    answer: str | None = "an answer",
    error: str | None = None,
    latency: float | None = 0.1,
    prompt_tokens: int | None = 10,
    completion_tokens: int | None = 5,
    cost: float | None = None,
    attempts: int = 1,
    cached: bool = False,
    resumed: bool = False,
    finish_reason: str | None = None,
) -> TurnRecord:
    return TurnRecord(
        finish_reason=finish_reason,
        conversation_id=conversation,
        turn=turn,
        question="q",
        answer=None if error else answer,
        latency_s=latency,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        cost_usd=cost,
        attempts=attempts,
        error=error,
        cached=cached,
        resumed=resumed,
    )


def started(turns: int = 10, conversations: int = 5, t: float = 0.0, resumed: int = 0):
    return RunStarted(conversations, turns, "my-model", "fake", t, resumed=resumed)


def done(rec: TurnRecord, t: float, *, last: bool = False, in_flight: int = 0) -> TurnFinished:
    return TurnFinished(rec, in_flight, t, last)


# -- RunStats ---------------------------------------------------------------------------


def test_counts_follow_the_events():
    state = RunStats()
    assert state.snapshot(now=0.0) == Snapshot()
    state.update(started(turns=4, conversations=2, t=100.0))
    state.update(RequestSent("a", 0, 1, 1, 100.1))
    state.update(RequestSent("b", 0, 1, 2, 100.1))
    state.update(RetryScheduled("a", 0, 1, "429", 0.5, 100.2))
    state.update(RequestSent("a", 0, 2, 2, 100.25))  # the retry sent: what counts as one
    state.update(done(record("b", 0), 100.3, last=True, in_flight=1))
    state.update(done(record("a", 0, error="ServerError: 500", attempts=2), 100.4, in_flight=0))
    state.update(done(record("a", 1, error="skipped: turn 0 failed", attempts=0), 100.4, last=True))
    s = state.snapshot(now=101.0)
    assert (s.model, s.engine) == ("my-model", "fake")
    assert (s.turns_done, s.turns_total) == (3, 4)
    assert (s.conversations_done, s.conversations_total) == (2, 2)
    assert s.in_flight == 0
    assert s.retries == 1
    assert s.errors == 2
    assert s.elapsed_s == pytest.approx(1.0)
    assert s.started and not s.finished and not s.interrupted


def test_in_flight_is_the_latest_reported():
    state = RunStats()
    state.update(started())
    for n in range(1, 6):
        state.update(RequestSent("c", 0, 1, n, 0.1))
    assert state.snapshot(now=1.0).in_flight == 5
    state.update(done(record(), 0.2, in_flight=4))
    assert state.snapshot(now=1.0).in_flight == 4
    state.update(RunFinished(1, 0, 0.3, False, 0.3))
    assert state.snapshot(now=1.0).in_flight == 0


def test_latency_percentiles_only_of_requests_answered_in_this_run():
    state = RunStats()
    state.update(started(turns=200))
    latencies = [((i * 37) % 100 + 1) / 100 for i in range(100)]  # 0.01 .. 1.00, shuffled
    for i, latency in enumerate(latencies):
        state.update(done(record(i, latency=latency), 0.001 * i))
        if i == 50:
            mid = state.snapshot(now=1.0)  # a snapshot halfway must not disturb the rest
            assert mid.latency_p50 == pytest.approx(np.percentile(latencies[:51], 50))
    # None of these sent a request in this run, or got an answer: no latency of theirs counts.
    state.update(done(record("x", latency=50.0, cached=True, attempts=0), 0.2))
    state.update(done(record("y", latency=60.0, resumed=True), 0.2))
    state.update(done(record("z", latency=70.0, error="RequestTimeout: slow"), 0.2))
    s = state.snapshot(now=1.0)
    assert s.latency_p50 == pytest.approx(np.percentile(latencies, 50))
    assert s.latency_p95 == pytest.approx(np.percentile(latencies, 95))
    assert (s.cached, s.resumed, s.errors) == (1, 1, 1)


def test_latency_percentiles_are_none_without_answered_requests():
    state = RunStats()
    state.update(started())
    state.update(done(record(cached=True, attempts=0), 0.1))
    s = state.snapshot(now=1.0)
    assert s.latency_p50 is None and s.latency_p95 is None


def test_rates_and_eta_over_the_recent_window():
    state = RunStats(window_s=5.0)
    state.update(started(turns=20, t=0.0))
    for i in range(10):  # one turn a second, at 0.5, 1.5, ..., 9.5; two attempts each
        state.update(done(record(i, attempts=2, prompt_tokens=10, completion_tokens=5), i + 0.5))
    s = state.snapshot(now=10.0)  # the window [5, 10] holds 5.5 .. 9.5
    assert s.requests_per_s == pytest.approx(2.0)
    assert s.tokens_per_s == pytest.approx(15.0)
    assert s.eta_s == pytest.approx(10.0)  # 10 turns left at 1 turn/s
    s = state.snapshot(now=12.0)  # [7, 12] holds 7.5, 8.5, 9.5: the pace slows
    assert s.requests_per_s == pytest.approx(6 / 5)
    assert s.eta_s == pytest.approx(10 / (3 / 5))
    s = state.snapshot(now=20.0)  # nothing recent: no pace, no ETA
    assert s.requests_per_s == 0.0
    assert s.eta_s is None


def test_the_window_is_the_elapsed_time_at_first():
    state = RunStats(window_s=5.0)
    state.update(started(turns=4, t=100.0))
    assert state.snapshot(now=100.0).requests_per_s is None
    assert state.snapshot(now=100.0).eta_s is None
    state.update(done(record(), 100.5))
    s = state.snapshot(now=101.0)
    assert s.requests_per_s == pytest.approx(1.0)
    assert s.eta_s == pytest.approx(3.0)


def test_failed_rows_bring_no_tokens_but_count_their_requests():
    state = RunStats()
    state.update(started(t=0.0))
    state.update(done(record(error="ServerError: 500", attempts=3), 0.5))
    s = state.snapshot(now=1.0)
    assert s.tokens_per_s == 0.0
    assert s.requests_per_s == pytest.approx(3.0)


def test_resumed_rows_do_not_make_the_pace():
    state = RunStats()
    state.update(started(turns=10, t=0.0, resumed=6))
    for i in range(6):
        state.update(done(record(i, resumed=True), 0.01))
    s = state.snapshot(now=1.0)
    assert (s.turns_done, s.resumed) == (6, 6)
    assert s.requests_per_s == 0.0 and s.tokens_per_s == 0.0
    assert s.eta_s is None
    state.update(done(record(7), 1.5))
    assert state.snapshot(now=2.0).eta_s == pytest.approx(3 / (1 / 2))


def test_cost_is_none_until_a_row_has_one_then_the_sum():
    state = RunStats()
    state.update(started())
    state.update(done(record(cost=None), 0.1))
    assert state.snapshot(now=1.0).cost_usd is None
    state.update(done(record(cost=0.25), 0.2))
    state.update(done(record(cost=0.0, cached=True, attempts=0), 0.3))
    state.update(done(record(cost=0.5, resumed=True), 0.3))
    assert state.snapshot(now=1.0).cost_usd == pytest.approx(0.75)


def test_figures_freeze_when_the_run_finishes():
    state = RunStats()
    state.update(started(turns=2, t=0.0))
    state.update(done(record(0), 1.0, last=True))
    state.update(done(record(1), 2.0, last=True))
    state.update(RunFinished(2, 0, 2.25, False, 2.5))
    s = state.snapshot(now=1000.0)
    assert s.finished and not s.interrupted
    assert s.elapsed_s == 2.25  # the run's own wall time
    assert s.requests_per_s == pytest.approx(2 / 2.25)  # the whole run's, as the summary's
    assert s.eta_s == 0.0


def test_an_interrupted_run_has_no_eta():
    state = RunStats()
    state.update(started(turns=4, t=0.0))
    state.update(done(record(), 1.0))
    state.update(RunFinished(1, 3, 1.5, True, 1.5))
    s = state.snapshot(now=5.0)
    assert s.finished and s.interrupted
    assert s.eta_s is None


def test_a_new_run_starts_over():
    state = RunStats()
    state.update(started(t=0.0))
    state.update(done(record(error="boom"), 0.5))
    state.update(RunFinished(0, 1, 1.0, False, 1.0))
    state.update(RunStarted(1, 1, "other", "fake", 10.0))
    s = state.snapshot(now=11.0)
    assert (s.model, s.turns_done, s.turns_total, s.errors) == ("other", 0, 1, 0)
    assert not s.finished and s.latency_p50 is None


def test_one_writer_thread_and_one_reader():
    state = RunStats()
    state.update(started(turns=20_000, t=time.time()))

    def write() -> None:
        for i in range(20_000):
            state.update(done(record(i, latency=i % 7 / 10), time.time(), last=True))

    writer = threading.Thread(target=write, name="nbllm-test-writer")
    writer.start()
    while writer.is_alive():
        s = state.snapshot()
        assert s.turns_done == s.conversations_done
    writer.join()
    s = state.snapshot()
    assert s.turns_done == 20_000
    assert s.latency_p50 == pytest.approx(np.percentile([i % 7 / 10 for i in range(20_000)], 50))


# -- words ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (0.0, "0 s"), (4.6, "5 s"), (59.4, "59 s"), (65, "1 min 05 s"),
     (3600 * 2 + 7 * 60 + 5, "2 h 07 min")],
)  # fmt: skip
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (0.0, "0.00 s"), (0.214, "0.21 s"), (12.34, "12.3 s"), (1250.0, "1,250 s")],
)
def test_latencies_are_in_seconds(seconds, text):
    assert format_seconds(seconds) == text


def test_summary_line():
    assert summary_line(Snapshot()) == "nbllm: waiting for the run to start"
    running = Snapshot(
        turns_done=120, turns_total=300, failed=2, requests_per_s=35.24, eta_s=5.2, started=True
    )
    assert summary_line(running) == "nbllm: 120/300 turns, 2 failed, 35.2 req/s, ETA 5 s"
    finished = Snapshot(
        turns_done=300,
        turns_total=300,
        started=True,
        finished=True,
        verdict="300/300 turns ok in 8.4 s",
    )
    assert summary_line(finished) == "nbllm: 300/300 turns ok in 8.4 s"
    preparing = Snapshot(phase="converting", phase_done=120, phase_total=272)
    assert summary_line(preparing) == "nbllm: converting the model… 120 / 272"
    generating = Snapshot(
        turns_done=1, turns_total=6, truncated=1, generated_tokens=1, eta_s=5.0, started=True
    )
    assert summary_line(generating) == (
        "nbllm: 1/6 turns, 0 failed, 1 cut short by max_tokens, 1 token generated, - req/s, ETA 5 s"
    )


def test_figures_say_seconds_elapsed_and_eta_and_leave_out_empty_counts():
    snap = Snapshot(
        in_flight=3,
        requests_per_s=12.34,
        tokens_per_s=456.0,
        latency_p50=0.214,
        latency_p95=0.483,
        retries=4,
        failed=1,
        elapsed_s=4.2,
        eta_s=12.0,
        started=True,
    )
    assert figures_line(snap) == (
        "in flight 3 · 12.3 req/s · 456 tok/s · latency p50 0.21 s · p95 0.48 s · retries 4"
        " · 1 failed · elapsed 4 s · ETA 12 s"
    )
    done = Snapshot(not_run=5, cached=2, resumed=3, cost_usd=0.5, elapsed_s=9, finished=True)
    items = figure_items(done)
    assert {"5 not run", "cached 2", "resumed 3", "cost $0.5000", "elapsed 9.0 s"} <= set(items)
    assert not any(item.startswith(("ETA", "in flight")) for item in items)
    local = figure_items(Snapshot(cost_usd=0.0, started=True))  # a local model costs nothing
    assert not any(item.startswith("cost") for item in local)
    assert not any("prompt tokens cached" in item for item in items)
    prompt_cache = Snapshot(cached_tokens=1234, cached_tokens_share=0.417, finished=True)
    assert "1,234 prompt tokens cached (42%)" in figure_items(prompt_cache)


def test_the_status_line_is_never_stale():
    running = Snapshot(started=True, in_flight=2)
    assert status_line(running, background=False).startswith("Interrupt the kernel (■) to stop")
    assert status_line(running, background=True) == ""  # the Stop button says it
    stopping = Snapshot(started=True, in_flight=2, stopping=True)
    assert status_line(stopping, background=True, grace_left_s=9.6) == (
        "stopping: 2 requests in flight finish (up to 10 s); Stop again cancels them"
    )
    assert status_line(stopping, background=False).endswith(
        "in flight finish; Interrupt again (■) cancels them"
    )
    done = Snapshot(started=True, finished=True, verdict="3/3 turns ok in 1.0 s")
    for background in (True, False):
        assert status_line(done, background=background) == "3/3 turns ok in 1.0 s"


def test_errors_by_kind_and_the_last_one_whole():
    message = "ConnectionFailed: Cannot connect to host 127.0.0.1:9999 ssl:default " + "x" * 80
    snap = Snapshot(
        started=True,
        failed=3,
        errors_by_kind=(("ConnectionFailed", 2), ("ServerError", 1)),
        last_error=message,
    )
    assert error_lines(snap) == [
        "errors: ConnectionFailed 2 · ServerError 1",
        f"last error: {message}",
    ]
    retrying = Snapshot(started=True, retries=30, last_error="ConnectionFailed: refused")
    assert error_lines(retrying) == ["retrying after: ConnectionFailed: refused"]
    assert error_lines(Snapshot(started=True)) == []


def test_bar_colours():
    assert bar_style(Snapshot(started=True)) == ""
    assert bar_style(Snapshot(started=True, failed=1)) == "danger"
    assert bar_style(Snapshot(finished=True, interrupted=True, not_run=3)) == "warning"
    assert bar_style(Snapshot(finished=True, not_run=3, stop_reason="cannot reach x")) == "danger"
    assert bar_style(Snapshot(finished=True)) == "success"


# -- the static HTML ------------------------------------------------------------------------


def test_static_html_shows_the_verdict_bars_and_figures():
    snap = Snapshot(
        model="my-model",
        engine="openai",
        turns_done=24,
        turns_total=180,
        conversations_done=8,
        conversations_total=60,
        failed=0,
        not_run=156,
        elapsed_s=4.1,
        started=True,
        finished=True,
        interrupted=True,
        verdict="24 of 180 turns ok, 156 not run (stopped), 0 failed in 4.1 s — run it again",
    )
    page = dashboard_html(snap, status=snap.verdict, errors=["last error: <b>boom</b>"])
    assert "24 of 180 turns ok, 156 not run (stopped)" in page
    assert "my-model" in page and "24 / 180 turns" in page and "8 / 60 conversations" in page
    assert 'aria-valuenow="24" aria-valuemax="180"' in page
    assert "156 not run" in page and "elapsed 4.1 s" in page  # as the verdict says it
    assert "flex-wrap:wrap" in page
    assert "&lt;b&gt;boom&lt;/b&gt;" in page  # error text is text, never markup
    assert "<script" not in page and "<style" not in page
    assert "GPU" not in page


def test_static_html_of_a_phase_with_and_without_a_total():
    known = progress_html(120, 272, "converting the model… 120 / 272")
    assert 'aria-valuenow="120" aria-valuemax="272"' in known and "44.1%" in known
    assert "<progress" in progress_html(None, None, "loading the model…")


# -- Dashboard ---------------------------------------------------------------------------


def dashboard_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "nbllm-dashboard"]


def test_widgets_show_the_state_after_events():
    dash = Dashboard(gpu=False)
    assert dash.widget is not None
    assert dash.turns_label.value == "0 / 0 turns"
    assert "waiting for the run to start" in dash.title.value
    dash(started(turns=6, conversations=3))
    assert "my-model" in dash.title.value and "fake" in dash.title.value
    assert (dash.turns_bar.value, dash.turns_bar.max) == (0, 6)
    dash(RequestSent("a", 0, 1, 1, 0.05))
    dash(done(record("a", 0), 0.1))
    dash(done(record("a", 1), 0.2, last=True))
    dash(RetryScheduled("b", 0, 1, "RateLimited: 429", 0.1, 0.25))
    dash(RequestSent("b", 0, 2, 1, 0.3))
    dash.render()
    assert (dash.turns_bar.value, dash.turns_bar.max) == (2, 6)
    assert dash.turns_label.value == "2 / 6 turns"
    assert (dash.conversations_bar.value, dash.conversations_bar.max) == (1, 3)
    assert dash.conversations_label.value == "1 / 3 conversations"
    assert "retries 1" in dash.figures.value and "0 failed" in dash.figures.value
    assert "retrying after: RateLimited: 429" in dash.errors.value
    assert dash.turns_bar.bar_style == ""
    assert dash.stop_button is None
    assert dash.gpu_gauges == [] and dash.gpu_box.children == ()
    dash(RunFinished(2, 0, 0.3, False, 0.3))
    assert not dashboard_threads()


def test_in_flight_counts_from_the_moment_a_request_is_sent():
    dash = Dashboard(gpu=False)
    dash(started(turns=3, t=time.time()))
    for n in (1, 2, 3):
        dash(RequestSent("c", n, 1, n, time.time()))
    dash.render()
    assert "in flight 3" in dash.figures.value
    dash.close()


def test_a_failed_bar_turns_red_and_stays_red():
    dash = Dashboard(gpu=False)
    dash(started(turns=5, conversations=5))
    dash(done(record(0), 0.1, last=True))
    dash(done(record(1, error="ServerError: 500 upstream"), 0.2, last=True))
    dash.render()
    assert dash.turns_bar.bar_style == "danger"
    assert dash.conversations_bar.bar_style == "danger"
    assert "ServerError 1" in dash.errors.value
    assert "last error: ServerError: 500 upstream" in dash.errors.value
    for i in range(2, 5):
        dash(done(record(i), 0.3, last=True))
        dash.render()
        assert dash.turns_bar.bar_style == "danger"
    dash(RunFinished(4, 1, 0.4, False, 0.4))
    assert dash.turns_bar.bar_style == "danger"
    assert dash.conversations_bar.bar_style == "danger"
    assert (dash.turns_bar.value, dash.turns_bar.max) == (5, 5)
    assert "1 failed (see the error column)" in dash.status.value


def test_an_interrupted_run_is_orange_and_says_what_was_kept():
    dash = Dashboard(gpu=False)
    dash(started(turns=5))
    dash(done(record(), 0.1))
    dash.render()
    assert "Interrupt the kernel (■) to stop" in dash.status.value
    dash(RunFinished(1, 0, 0.2, True, 0.2))
    assert dash.turns_bar.bar_style == "warning"
    assert "Interrupt" not in dash.status.value
    assert "1 of 5 turns ok, 4 not run (stopped)" in dash.status.value
    assert "4 not run" in dash.figures.value

    dash = Dashboard(gpu=False)
    dash(started(turns=5))
    dash(done(record(error="boom: no"), 0.1))
    dash(RunFinished(0, 1, 0.2, True, 0.2))
    assert dash.turns_bar.bar_style == "danger"


def test_a_clean_run_ends_green_with_the_verdict():
    dash = Dashboard(gpu=False)
    dash(started(turns=2, conversations=1))
    dash(done(record(0), 0.1))
    dash(done(record(1), 0.2, last=True))
    dash(RunFinished(2, 0, 0.2, False, 0.2))
    assert dash.turns_bar.bar_style == "success"
    assert dash.conversations_bar.bar_style == "success"
    assert "2/2 turns ok in" in dash.status.value
    assert dash.stats.snapshot().verdict in dash.status.value


def test_answers_cut_short_show_once_there_is_one():
    dash = Dashboard(gpu=False)
    dash(started(turns=4, conversations=4))
    dash(done(record("a", finish_reason="stop"), 0.1, last=True))
    dash.render()
    assert "cut short" not in dash.figures.value and "cut short" not in str(dash)
    dash(done(record("b", finish_reason="length"), 0.2, last=True))
    dash(done(record("c", finish_reason="length", resumed=True), 0.3, last=True))
    dash.render()
    assert "2 cut short by max_tokens" in dash.figures.value
    assert "2 cut short by max_tokens" in str(dash)
    dash(done(record("d", error="ServerError: HTTP 500"), 0.4, last=True))
    dash(RunFinished(3, 1, 0.5, False, 0.5))
    snap = dash.stats.snapshot()
    assert snap.truncated == 2
    assert snap.verdict is not None and "(2 cut short by max_tokens)" in snap.verdict
    assert "2 cut short by max_tokens" in dashboard_html(snap)


def test_the_preview_shows_why_answers_ended_once_one_was_cut():
    def rows(*reasons):
        records = [record(f"c{i}", finish_reason=r) for i, r in enumerate(reasons)]
        return RunResult(records, conversations=len(records), wall_s=1.0, started_at=0.0).df

    whole = ResultPreview.of(rows("stop", None, "stop")).frame
    assert "finish_reason" not in whole.columns
    cut = ResultPreview.of(rows("stop", "length")).frame
    assert list(cut.columns)[3:5] == ["answer", "finish_reason"]
    assert cut["finish_reason"].tolist() == ["stop", "length"]
    assert "length" in str(ResultPreview.of(rows("stop", "length")))


def test_a_local_generation_moves_the_figures_before_its_turn_ends():
    dash = Dashboard(gpu=False)
    dash(started(turns=2, conversations=1))
    dash(RequestSent("a", 0, 1, 1, 0.05))
    dash.render()
    assert "generated" not in dash.figures.value  # an API engine says nothing of the kind
    dash(EnginePhase("generating", 1234, None, 0.3))
    dash.render()
    assert "1,234 tokens generated" in dash.figures.value
    assert "1,234 tokens generated" in str(dash)
    assert dash.phase.value == ""  # a figure of the run, not a preparation
    dash(EnginePhase("generating", 2000, None, 0.6))
    dash.render()
    assert "2,000 tokens generated" in dash.figures.value
    dash(done(record("a", completion_tokens=2000), 0.7, last=True))
    dash(RunFinished(1, 0, 0.8, False, 0.8))
    assert "generated" not in dash.figures.value  # the run's own figures say it now
    dash(EnginePhase("generating", 2100, None, 0.9))  # late: the finished run keeps its page
    snap = dash.stats.snapshot()
    assert snap.finished and snap.turns_done == 1 and snap.generated_tokens is None


def test_a_local_engine_shows_its_phases_before_the_turns():
    dash = Dashboard(gpu=False)
    assert dash.phase.layout.display == "none"  # an empty row takes no room
    dash(EnginePhase("converting", 120, 272, 0.0, "SmolLM2-135M-Instruct"))
    dash.render()
    assert "converting the model… 120 / 272 (SmolLM2-135M-Instruct)" in dash.phase.value
    assert 'aria-valuenow="120"' in dash.phase.value
    assert dash.phase.layout.display is None
    assert [row.layout.display for row in dash._bar_rows] == ["none", "none"]
    assert "waiting" not in dash.title.value
    dash(EnginePhase("loading", None, None, 1.0))
    dash.render()
    assert "loading the model…" in dash.phase.value and "<progress" in dash.phase.value
    dash(EnginePhase("loading", None, None, 1.5, "starting a worker process"))
    dash.render()
    assert "loading the model: starting a worker process" in dash.phase.value
    dash(started(turns=2, t=2.0))
    assert dash.phase.value == "" and dash.phase.layout.display == "none"
    assert [row.layout.display for row in dash._bar_rows] == [None, None]
    dash(RunFinished(0, 0, 0.1, True, 2.1))
    assert not dashboard_threads()


def _count_renders(dash: Dashboard, monkeypatch) -> list[int]:
    count = [0]
    render = dash.render

    def counting() -> None:
        count[0] += 1
        render()

    monkeypatch.setattr(dash, "render", counting)
    return count


def test_the_last_state_is_drawn_without_another_event():
    """An event inside the throttle's interval is drawn anyway, by the timer."""
    dash = Dashboard(gpu=False, max_updates_per_s=10.0)
    dash(started(turns=3, t=time.time()))
    for i in range(3):  # all within a few microseconds of the first draw
        dash(done(record(i), time.time()))
    assert dash.turns_bar.value == 0  # not drawn per event
    deadline = time.monotonic() + 2.0
    while dash.turns_bar.value != 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert dash.turns_label.value == "3 / 3 turns"
    assert [t.daemon for t in dashboard_threads()] == [True]
    dash.close()
    assert not dashboard_threads()


def test_the_timer_draws_what_changed_at_most_so_often_and_at_least_once_a_second():
    draws = []
    timer = RedrawTimer(lambda: draws.append(1), max_per_s=10, min_per_s=1, clock=FakeClock())
    assert (timer.interval_s, timer.longest_gap_s) == (0.1, 1.0)
    timer.stale = True  # what changed() marks, without starting the thread
    assert [timer.tick(now) for now in (0.0, 0.1, 0.2)] == [True, False, False]
    timer.stale = True
    assert timer.tick(0.3)
    assert not timer.tick(1.2)  # nothing changed: the next draw comes a second after the last
    assert timer.tick(1.3)
    assert len(draws) == 3
    assert not timer.running
    with pytest.raises(ConfigError, match=r"^max_per_s= expected .* got 0$"):
        RedrawTimer(lambda: None, max_per_s=0)
    with pytest.raises(ConfigError, match=r"^min_per_s= expected .* got -1$"):
        RedrawTimer(lambda: None, min_per_s=-1)


def test_redraws_are_throttled_in_real_time(monkeypatch):
    dash = Dashboard(gpu=False, max_updates_per_s=10.0)
    renders = _count_renders(dash, monkeypatch)
    t0 = time.monotonic()
    dash(started(turns=20_000))
    for i in range(20_000):
        dash(done(record(i), 0.0))
    dash(RunFinished(20_000, 0, 1.0, False, 1.0))
    elapsed = time.monotonic() - t0
    assert renders[0] <= elapsed * 10 + 3  # the timer's, and one each at start and end
    assert dash.turns_bar.value == 20_000
    assert not dashboard_threads()


def test_the_timer_ends_with_a_run_that_died_without_saying_so():
    dash = Dashboard(gpu=False)

    def run() -> None:
        dash(started(turns=4, t=time.time()))
        dash(done(record(), time.time()))

    thread = threading.Thread(target=run, name="nbllm-test-run")
    thread.start()
    thread.join()
    deadline = time.monotonic() + 3.0
    while dashboard_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not dashboard_threads()
    assert dash.turns_bar.value == 1  # drawn before it ended


def test_stop_button_first_lets_in_flight_finish_then_cancels():
    calls = []
    dash = Dashboard(lambda: calls.append(1), gpu=False)
    dash(started())
    dash(RequestSent("a", 0, 1, 1, time.time()))
    dash(RequestSent("b", 0, 1, 2, time.time()))
    button = dash.stop_button
    assert button is not None and button.description == "Stop" and not button.disabled
    assert "in flight finish" in button.tooltip and "again" in button.tooltip
    assert button in dash.widget.children
    button.click()
    assert calls == [1] and not button.disabled
    assert button.description == "Cancel in-flight" and "Cancel the requests" in button.tooltip
    dash(StopRequested(10.0, 2, time.time()))
    assert "stopping: 2 requests in flight finish" in dash.status.value
    assert "Stop again cancels them" in dash.status.value
    button.click()
    button.click()
    assert calls == [1, 1]
    assert button.disabled and button.description == "cancelling…"
    dash(RunFinished(1, 0, 0.5, True, 0.5))
    assert calls == [1, 1]
    assert button.description == "stopped"
    assert "stopping" not in dash.status.value


def test_a_stop_from_elsewhere_turns_the_button_into_cancel():
    calls = []
    dash = Dashboard(lambda: calls.append(1), gpu=False)
    dash(started())
    dash(RequestSent("a", 0, 1, 1, time.time()))
    dash(StopRequested(10.0, 1, time.time()))  # job.stop()
    assert dash.stop_button.description == "Cancel in-flight"
    assert "stopping: 1 request in flight finish" in dash.status.value
    dash.stop_button.click()
    assert calls == [1] and dash.stop_button.disabled
    dash(RunFinished(0, 0, 0.5, True, 0.5))


def test_stop_button_is_disabled_when_the_run_ends_by_itself():
    calls = []
    dash = Dashboard(lambda: calls.append(1), gpu=False)
    dash(started(turns=1))
    dash(done(record(), 0.1, last=True))
    dash(RunFinished(1, 0, 0.1, False, 0.1))
    assert dash.stop_button.disabled
    dash.stop_button.click()
    assert calls == []


def test_text_plain_summary_beside_the_widget():
    dash = Dashboard(gpu=False)
    assert dash._repr_mimebundle_()["text/plain"] == "nbllm: waiting for the run to start"
    dash(started(turns=300, t=time.time()))
    for i in range(120):
        dash(done(record(i, error="ServerError: 500" if i < 2 else None), time.time()))
    bundle = dash._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    text = bundle["text/plain"]
    assert text.startswith("nbllm: 120/300 turns, 2 failed, ")
    assert " req/s, ETA " in text
    assert str(dash).startswith("nbllm: 120/300 turns, 2 failed, ")
    dash.close()


class Published:
    """What IPython's display and update_display were given."""

    def __init__(self, monkeypatch) -> None:
        import IPython.display

        self.shown: list[tuple[dict, dict]] = []
        self.updates: list[tuple[dict, dict]] = []
        monkeypatch.setattr(IPython.display, "display", lambda o, **kw: self.shown.append((o, kw)))
        monkeypatch.setattr(
            IPython.display, "update_display", lambda o, **kw: self.updates.append((o, kw))
        )


def test_the_end_leaves_static_html_in_place_of_the_widget(monkeypatch):
    published = Published(monkeypatch)
    dash = Dashboard(gpu=False)
    dash._ipython_display_()  # what IPython's display(dash) calls
    ((bundle, options),) = published.shown
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert options["raw"] is True and options["display_id"].startswith("nbllm-dashboard-")
    dash(started(turns=2, conversations=1))
    dash(done(record(0), 0.1))
    dash(done(record(1), 0.2, last=True))
    assert published.updates == []  # the widget draws itself while the run goes
    dash(RunFinished(2, 0, 0.2, False, 0.2))
    ((final, update_options),) = published.updates
    assert update_options == {"raw": True, "display_id": options["display_id"]}
    assert set(final) == {"text/html", "text/plain"}  # no widget left to be missing later
    verdict = dash.stats.snapshot().verdict
    assert verdict in final["text/html"] and final["text/plain"] == f"nbllm: {verdict}"
    assert "2 / 2 turns" in final["text/html"]
    assert dash.widget.comm is None and dash.turns_bar.comm is None  # closed
    assert dash.turns_label.value == "2 / 2 turns"  # its state still reads


def test_a_dashboard_never_displayed_leaves_its_widget_alone(monkeypatch):
    published = Published(monkeypatch)
    dash = Dashboard(gpu=False)
    dash(started(turns=1))
    dash(RunFinished(0, 0, 0.1, True, 0.1))
    assert published.updates == []
    assert dash.widget.comm is not None


def test_without_ipywidgets_the_dashboard_is_html(monkeypatch):
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # import ipywidgets fails
    published = Published(monkeypatch)
    calls = []
    dash = Dashboard(lambda: calls.append(1), gpu=False)
    assert dash.widget is None
    dash._ipython_display_()
    ((bundle, _),) = published.shown
    assert set(bundle) == {"text/html", "text/plain"}
    dash(started(turns=2))
    dash(done(record(0), 0.1))
    dash.render()
    assert "1 / 2 turns" in published.updates[-1][0]["text/html"]  # redrawn in place
    dash(done(record(1), 0.2, last=True))
    dash(RunFinished(2, 0, 0.2, False, 0.2))
    verdict = dash.stats.snapshot().verdict
    assert dash._repr_mimebundle_()["text/plain"] == f"nbllm: {verdict}"
    assert verdict in published.updates[-1][0]["text/html"]


def test_a_shared_stats_is_read_not_fed():
    stats = RunStats()
    dash = Dashboard(gpu=False, stats=stats)
    assert dash.stats is stats
    for event in (started(turns=2), done(record(0), 0.1)):
        stats.update(event)  # its maker feeds it, before the dashboard sees the event
        dash(event)
    dash.render()
    assert dash.turns_label.value == "1 / 2 turns"
    dash(RunFinished(1, 0, 0.2, True, 0.2))  # not fed: the run is not over for the stats
    assert not stats.snapshot().finished


def test_the_frontend_shares_the_runs_stats(monkeypatch):
    import IPython.display

    from nbllm.ui import frontend

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda o, **kw: shown.append(o))
    monkeypatch.setattr(frontend, "_in_notebook", lambda: True)
    stats = RunStats()
    dash = frontend.progress_listener(None, stats=stats)
    assert shown == [dash] and isinstance(dash, Dashboard) and dash.stats is stats
    assert isinstance(frontend.progress_listener(None), Dashboard)
    assert frontend.progress_listener(False, stats=stats) is None

    monkeypatch.setattr(frontend, "_in_notebook", lambda: False)
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    assert frontend.progress_listener(None, stats=stats) is None  # not a terminal
    bar = frontend.progress_listener(True, stats=stats)
    assert isinstance(bar, TextProgress) and bar.stats is stats


@pytest.mark.parametrize("rate", [0, -1.0, float("nan")])
def test_bad_update_rate_is_refused(rate):
    with pytest.raises(ConfigError, match="max_updates_per_s must be a number > 0, got"):
        Dashboard(gpu=False, max_updates_per_s=rate)


def test_end_to_end_with_a_real_run():
    dash = Dashboard(gpu=False)
    data = [{"id": i, "turns": ["hello", "and again"]} for i in range(7)]
    result = nbllm.run(data, engine=nbllm.FakeEngine(), model="m", progress=False, listeners=[dash])
    assert result.summary.turns_ok == 14
    assert (dash.turns_bar.value, dash.turns_bar.max) == (14, 14)
    assert (dash.conversations_bar.value, dash.conversations_bar.max) == (7, 7)
    assert dash.turns_label.value == "14 / 14 turns"
    assert dash.turns_bar.bar_style == "success"
    assert dash.title.value == "<b>nbllm</b> · m · fake"
    assert result.verdict in dash.status.value
    assert dash._repr_mimebundle_()["text/plain"] == f"nbllm: {result.verdict}"


async def test_end_to_end_beside_a_running_loop():
    """As in a notebook: the events come from the run's worker thread, the redraws from the
    dashboard's timer and, the last one, from the run's thread as it ends."""
    threads = set()
    dash = Dashboard(gpu=False)
    render = dash.render

    def render_noting_the_thread() -> None:
        threads.add(threading.current_thread().name)
        render()

    dash.render = render_noting_the_thread  # type: ignore[method-assign]
    data = [{"id": i, "turns": ["hello"]} for i in range(5)]
    nbllm.run(data, engine=nbllm.FakeEngine(), model="m", progress=False, listeners=[dash])
    assert "nbllm-run" in threads and threads <= {"nbllm-run", "nbllm-dashboard"}
    assert dash.turns_label.value == "5 / 5 turns"
    assert dash.turns_bar.bar_style == "success"


def _wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.parametrize("presses", [1, 2])
def test_the_stop_button_of_a_background_run(monkeypatch, presses):
    """A job in a notebook: the first press lets the requests in flight finish and keeps
    their answers; a second one cancels them. Either way the dashboard ends on the verdict,
    left as static HTML."""
    from nbllm.ui import frontend

    published = Published(monkeypatch)
    monkeypatch.setattr(frontend, "_in_notebook", lambda: True)
    data = [{"id": i, "turns": ["hello"]} for i in range(12)]
    engine = nbllm.FakeEngine(latency=0.5 if presses == 1 else 30.0)
    job = nbllm.submit(data, engine=engine, model="m", concurrency=3, checkpoint=False)
    ((dash, _),) = published.shown
    assert isinstance(dash, Dashboard)
    dash._ipython_display_()
    assert _wait_for(lambda: dash.stats.snapshot().in_flight == 3)
    dash.stop_button.click()
    assert _wait_for(lambda: "stopping: 3 requests in flight finish" in dash.status.value)
    assert "Stop again cancels them" in dash.status.value
    assert dash.stop_button.description == "Cancel in-flight"
    if presses == 2:
        dash.stop_button.click()
    result = job.result(timeout=10)
    assert result.interrupted
    kept = 3 if presses == 1 else 0
    assert result.summary.turns_ok == kept and result.summary.turns_not_run == 12 - kept
    assert dash.stop_button.disabled and dash.stop_button.description == "stopped"
    assert result.verdict in dash.status.value
    final = published.updates[-1][0]
    assert result.verdict in final["text/html"] and "stopping" not in final["text/html"]


# -- the text bar ---------------------------------------------------------------------------


def test_the_text_bar_shows_a_local_engines_phases_then_the_turns():
    out = io.StringIO()
    bar = TextProgress(file=out)
    bar(EnginePhase("converting", 0, 272, 0.0))
    bar(EnginePhase("converting", 272, 272, 1.0))
    bar(EnginePhase("loading", None, None, 2.0))
    bar(started(turns=3, t=3.0))
    text = out.getvalue()
    assert "converting the model" in text and "272/272" in text
    assert "loading the model" in text
    bar(RequestSent("a", 0, 1, 2, 3.1))  # not a kind it listens to: shown nowhere
    bar(StopRequested(10.0, 2, 3.2))
    bar(done(record(0), 3.3))
    bar(RunFinished(1, 0, 0.5, True, 3.5))
    last_line = out.getvalue().rstrip().split("\r")[-1]
    assert "stopping (2 in flight)" in last_line
    assert "1/3" in last_line and "failed=0, retries=0, not_run=2" in last_line


def test_the_text_bar_shows_tokens_generated_and_cut_answers_in_its_postfix():
    """A local engine's "generating" count during the run is a figure of the bar, not a
    second bar; an answer max_tokens cut short is counted once there is one."""
    out = io.StringIO()
    bar = TextProgress(file=out)
    bar(started(turns=2, t=0.0))
    bar._counted_at = float("-inf")
    bar(EnginePhase("generating", 40, None, 0.1))
    assert bar._phase_bar is None
    assert "tokens=40" in out.getvalue().split("\r")[-1]
    assert "cut=" not in out.getvalue()
    cut = TurnRecord("a", 0, "q", answer="x", attempts=1, finish_reason="length")
    bar._counted_at = float("-inf")
    bar(done(cut, 0.2))
    bar(RunFinished(1, 0, 0.3, True, 0.3))
    last = out.getvalue().split("\r")[-1]
    assert "cut=1" in last
    assert "generating" not in out.getvalue()


def test_the_text_bar_reads_a_shared_stats():
    stats = RunStats()
    out = io.StringIO()
    bar = TextProgress(file=out, stats=stats)
    for event in (started(turns=2), done(record(0, error="ServerError: 500"), 0.1)):
        stats.update(event)
        bar(event)
    finished = RunFinished(0, 1, 0.2, True, 0.2)
    stats.update(finished)
    bar(finished)
    assert stats.snapshot().failed == 1
    assert "failed=1" in out.getvalue()


def test_a_run_that_failed_before_its_end_leaves_no_live_widget_behind(monkeypatch):
    """Whoever made the dashboard closes it when the run raised (a model that cannot be
    loaded, say): the widget goes, a line saying so stays."""
    published = Published(monkeypatch)
    dash = Dashboard(gpu=False)
    dash._ipython_display_()
    dash.close()
    dash.close()
    ((final, _),) = published.updates
    assert "the run did not start" in final["text/html"]
    assert dash.widget.comm is None

    published.updates.clear()
    dash = Dashboard(gpu=False)
    dash._ipython_display_()
    dash(started(turns=2, t=time.time()))
    dash.close()
    ((final, _),) = published.updates
    assert "the run ended before it finished" in final["text/html"]
    assert "Interrupt" not in final["text/html"]
    assert not dashboard_threads()


def test_the_limits_and_the_breakers_reach_the_dashboard():
    """The notices a run's limits and deployments send are drawn, not filtered out."""
    dash = Dashboard(gpu=False)
    dash(started(turns=6, conversations=3))
    dash(LimitChanged("rpm", 120.0, 0.1, "m@a:1"))
    dash(LimitChanged("rpm", 80.0, 0.1, "m@b:2"))
    dash(SharedQuota(False, "rpm is local for now: connection refused", 0.2))
    dash(BreakerChanged("m@b:2", "open", 1, 0.3))
    dash.render()
    assert "rpm limit 200" in dash.figures.value  # the group's limits together
    assert "shared limits: rpm is local for now" in dash.errors.value
    assert "breakers: m@b:2 open (opened 1x)" in dash.errors.value
    dash(RunFinished(0, 0, 0.4, False, 0.4))


def test_warnings_and_alerts_show_once_in_the_dashboard_not_under_the_cell(capsys):
    import logging

    from nbllm.executor.events import Alert

    log = logging.getLogger("nbllm")
    dash = Dashboard(gpu=False)
    dash(RunStarted(2, 2, "m", "fake", time.time()))
    for _ in range(3):
        log.warning("shared limits went local: redis is unreachable")
    log.warning("nbllm alert: request latency p95 is 9.00 s (alert above 5)")
    dash(Alert("latency_p95_s", "request latency p95 is 9.00 s (alert above 5)", 9, 5, time.time()))
    text = dash.html()
    assert text.count("shared limits went local") == 1 and "(3x)" in text
    assert text.count("request latency p95 is 9.00 s") == 1  # the Alert's line, not the record
    assert capsys.readouterr().err == ""  # no stream of records under the cell
    dash(RunFinished(2, 0, 1.0, False, time.time()))
    assert not [h for h in log.handlers if type(h).__name__ == "_Relay"]  # only while shown
