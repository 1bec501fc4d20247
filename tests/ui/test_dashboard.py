"""RunStats' figures and the notebook Dashboard's widgets, driven by synthetic events."""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest

import nbllm
from nbllm.executor.events import (
    RequestSent,
    RetryScheduled,
    RunFinished,
    RunStarted,
    TurnFinished,
)
from nbllm.executor.stats import RunStats, Snapshot
from nbllm.types import TurnRecord
from nbllm.ui.dashboard import Dashboard, format_duration, summary_line


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
) -> TurnRecord:
    return TurnRecord(
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


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# -- RunStats ---------------------------------------------------------------------------


def test_counts_follow_the_events():
    state = RunStats()
    assert state.snapshot(now=0.0) == Snapshot()
    state.update(started(turns=4, conversations=2, t=100.0))
    state.update(RequestSent("a", 0, 1, 1, 100.1))
    state.update(RequestSent("b", 0, 1, 2, 100.1))
    state.update(RetryScheduled("a", 0, 1, "429", 0.5, 100.2))
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
    assert s.requests_per_s == pytest.approx(2 / 2.5)
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


# -- formatting ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (0.0, "0 s"), (4.6, "5 s"), (59.4, "59 s"), (65, "1 min 05 s"),
     (3600 * 2 + 7 * 60 + 5, "2 h 07 min")],
)  # fmt: skip
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_summary_line():
    assert summary_line(Snapshot()) == "nbllm: waiting for the run to start"
    running = Snapshot(
        turns_done=120, turns_total=300, errors=2, requests_per_s=35.24, eta_s=5.2, started=True
    )
    assert summary_line(running) == "nbllm: 120/300 turns, 2 errors, 35.2 req/s, ETA 5 s"
    finished = Snapshot(
        turns_done=300, turns_total=300, errors=1, elapsed_s=8.4, started=True, finished=True
    )
    assert summary_line(finished) == "nbllm: 300/300 turns, 1 error, done in 8 s"


# -- Dashboard ---------------------------------------------------------------------------


def test_widgets_show_the_state_after_events():
    dash = Dashboard(gpu=False)
    assert dash.widget is not None
    assert dash.turns_label.value == "0 / 0 turns"
    dash(started(turns=6, conversations=3))
    assert "my-model" in dash.title.value and "fake" in dash.title.value
    assert (dash.turns_bar.value, dash.turns_bar.max) == (0, 6)
    dash(done(record("a", 0), 0.1))
    dash(done(record("a", 1), 0.2, last=True))
    dash(RetryScheduled("b", 0, 1, "429", 0.1, 0.25))
    dash.render()
    assert (dash.turns_bar.value, dash.turns_bar.max) == (2, 6)
    assert dash.turns_label.value == "2 / 6 turns"
    assert (dash.conversations_bar.value, dash.conversations_bar.max) == (1, 3)
    assert dash.conversations_label.value == "1 / 3 conversations"
    assert "retries 1" in dash.figures.value
    assert "0 errors" in dash.figures.value
    assert dash.turns_bar.bar_style == ""
    assert dash.stop_button is None
    assert dash.gpu_label is None and dash.gpu_gauges == []


def test_a_failed_bar_turns_red_and_stays_red():
    dash = Dashboard(gpu=False)
    dash(started(turns=5, conversations=5))
    dash(done(record(0), 0.1, last=True))
    dash(done(record(1, error="ServerError: 500"), 0.2, last=True))
    dash.render()
    assert dash.turns_bar.bar_style == "danger"
    assert dash.conversations_bar.bar_style == "danger"
    for i in range(2, 5):
        dash(done(record(i), 0.3, last=True))
        dash.render()
        assert dash.turns_bar.bar_style == "danger"
    dash(RunFinished(4, 1, 0.4, False, 0.4))
    assert dash.turns_bar.bar_style == "danger"
    assert dash.conversations_bar.bar_style == "danger"
    assert (dash.turns_bar.value, dash.turns_bar.max) == (5, 5)


def test_an_interrupted_run_is_orange_unless_something_failed():
    dash = Dashboard(gpu=False)
    dash(started(turns=5))
    dash(done(record(), 0.1))
    dash(RunFinished(1, 4, 0.2, True, 0.2))
    assert dash.turns_bar.bar_style == "warning"
    assert "stopped after" in dash.figures.value

    dash = Dashboard(gpu=False)
    dash(started(turns=5))
    dash(done(record(error="boom"), 0.1))
    dash(RunFinished(0, 5, 0.2, True, 0.2))
    assert dash.turns_bar.bar_style == "danger"


def test_a_clean_run_ends_green():
    dash = Dashboard(gpu=False)
    dash(started(turns=2, conversations=1))
    dash(done(record(0), 0.1))
    dash(done(record(1), 0.2, last=True))
    dash(RunFinished(2, 0, 0.2, False, 0.2))
    assert dash.turns_bar.bar_style == "success"
    assert dash.conversations_bar.bar_style == "success"
    assert "done in" in dash.figures.value


def _count_renders(dash: Dashboard, monkeypatch) -> list[int]:
    count = [0]
    render = dash.render

    def counting() -> None:
        count[0] += 1
        render()

    monkeypatch.setattr(dash, "render", counting)
    return count


def test_redraws_are_throttled_and_the_last_one_is_exact(monkeypatch):
    clock = FakeClock()
    dash = Dashboard(gpu=False, max_updates_per_s=10.0, clock=clock)
    renders = _count_renders(dash, monkeypatch)
    n = 10_000
    dash(started(turns=n, conversations=n))
    for i in range(n):
        clock.now += 0.001  # 10,000 events over 10 s
        dash(done(record(i), 0.001 * i, last=True))
    dash(RunFinished(n, 0, 10.0, False, 10.0))
    assert renders[0] <= 10.0 * 10 + 2
    assert renders[0] >= 90  # and it does keep redrawing while the run goes on
    assert dash.turns_bar.value == n
    assert dash.turns_label.value == f"{n:,} / {n:,} turns"
    assert dash.conversations_label.value == f"{n:,} / {n:,} conversations"
    assert dash.turns_bar.bar_style == "success"


def test_redraws_are_throttled_in_real_time(monkeypatch):
    dash = Dashboard(gpu=False, max_updates_per_s=10.0)
    renders = _count_renders(dash, monkeypatch)
    t0 = time.monotonic()
    dash(started(turns=10_000))
    for i in range(10_000):
        dash(done(record(i), 0.0))
    dash(RunFinished(10_000, 0, 1.0, False, 1.0))
    elapsed = time.monotonic() - t0
    assert renders[0] <= elapsed * 10 + 2
    assert dash.turns_bar.value == 10_000


def test_stop_button_calls_stop_once():
    calls = []
    dash = Dashboard(lambda: calls.append(1), gpu=False)
    dash(started())
    button = dash.stop_button
    assert button is not None and button.description == "Stop" and not button.disabled
    assert button in dash.widget.children
    button.click()
    button.click()
    assert calls == [1]
    assert button.disabled
    assert button.description == "stopping…"
    dash(RunFinished(1, 9, 0.5, True, 0.5))
    assert calls == [1]
    assert button.description == "stopped"


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
        dash(done(record(i, error="boom" if i < 2 else None), time.time()))
    bundle = dash._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    text = bundle["text/plain"]
    assert text.startswith("nbllm: 120/300 turns, 2 errors, ")
    assert " req/s, ETA " in text
    assert str(dash).startswith("nbllm: 120/300 turns, 2 errors, ")


def test_without_ipywidgets_the_dashboard_is_text(monkeypatch):
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # import ipywidgets fails
    calls = []
    dash = Dashboard(lambda: calls.append(1), gpu=False)
    assert dash.widget is None
    dash(started(turns=2))
    dash(done(record(0), 0.1))
    dash(done(record(1), 0.2, last=True))
    dash(RunFinished(2, 0, 0.2, False, 0.2))
    assert dash._repr_mimebundle_() == {"text/plain": "nbllm: 2/2 turns, 0 errors, done in 0 s"}


def test_bad_update_rate_is_refused():
    with pytest.raises(ValueError, match="max_updates_per_s"):
        Dashboard(gpu=False, max_updates_per_s=0)


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
    assert dash._repr_mimebundle_()["text/plain"].startswith("nbllm: 14/14 turns, 0 errors, done")


async def test_end_to_end_beside_a_running_loop():
    """As in a notebook: the events, and so the redraws, come from the run's worker thread."""
    threads = set()
    dash = Dashboard(gpu=False)
    render = dash.render

    def render_noting_the_thread() -> None:
        threads.add(threading.current_thread().name)
        render()

    dash.render = render_noting_the_thread  # type: ignore[method-assign]
    data = [{"id": i, "turns": ["hello"]} for i in range(5)]
    nbllm.run(data, engine=nbllm.FakeEngine(), model="m", progress=False, listeners=[dash])
    assert threads == {"nbllm-run"}
    assert dash.turns_label.value == "5 / 5 turns"
    assert dash.turns_bar.bar_style == "success"
