"""The views of a run through a provider's batch API (``batch_api=True``): the batches in
the statistics, their words in the dashboard, the static HTML and the terminal, the Stop
button that asks before it cancels batches, what the batches saved in the summary and the
DataFrame, the stored runs with batches in flight, and ``%%llm_batch --batch-api``."""

from __future__ import annotations

import io
import sqlite3
import time
from dataclasses import replace

import pandas as pd
import pytest
from helpers import FakeClock

import nbllm
from nbllm.engines.batch.lines import BatchLine, BatchRecord
from nbllm.executor.checkpoint import CheckpointStore, RunIdentity
from nbllm.executor.events import BatchUpdated, RunFinished, RunStarted, TurnFinished
from nbllm.executor.stats import BATCHES_SHOWN, BatchFigures, RunStats, Snapshot, batch_figures
from nbllm.jobs import Job
from nbllm.results import COLUMNS, RunResult
from nbllm.testing import TestServer
from nbllm.types import TurnRecord
from nbllm.ui.dashboard import CONFIRM_S, Dashboard
from nbllm.ui.progress import TextProgress
from nbllm.ui.snapshot_text import (
    batch_header,
    batch_line,
    batch_lines,
    figure_items,
)
from nbllm.ui.static_dashboard import dashboard_html

T0 = 1_800_000_000.0  # the batches' clock: Unix seconds
DAY = 24 * 3600.0


def polled(
    batch_id: str = "batch_abc123",
    status: str = "in_progress",
    *,
    total: int = 400,
    completed: int = 120,
    failed: int = 3,
    created: float | None = T0,
    window: float | None = DAY,
    waiting: int = 400,
    t: float = T0 + 7500.0,
    error: str | None = None,
) -> BatchUpdated:
    expires = None if created is None or window is None else created + window
    return BatchUpdated(
        batch_id, "openai", status, total, completed, failed, created, expires, waiting, t, error
    )


def started(turns: int = 4, t: float = T0) -> RunStarted:
    return RunStarted(2, turns, "gpt-4o-mini", "openai batch", t)


def row(i: int = 0, *, cost: float | None = 0.002, saved: float | None = 0.002) -> TurnRecord:
    return TurnRecord(
        f"c{i}", 0, f"q{i}", answer="a", latency_s=60.0, prompt_tokens=10,
        completion_tokens=5, cost_usd=cost, saved_usd=saved, attempts=1,
    )  # fmt: skip


# -- the statistics -------------------------------------------------------------------------


def test_the_latest_poll_of_each_batch_in_flight_first():
    stats = RunStats()
    stats(started())
    stats(polled("b1", "validating", completed=0, failed=0, t=T0 + 10))
    stats(polled("b1", t=T0 + 7500))  # the same batch again: its latest poll counts
    stats(polled("b2", "finalizing", created=T0 + 60, completed=400, failed=0, waiting=10))
    stats(polled("b0", "completed", created=T0 - 60, completed=398, failed=2, waiting=0))

    snap = stats.snapshot(now=T0 + 7500)

    assert [b.id for b in snap.batches] == ["b2", "b1", "b0"]  # in flight, latest first
    assert snap.batches_in_flight == 2 and snap.batches_not_shown == 0
    b1 = snap.batches[1]
    assert b1 == BatchFigures(
        "b1", "openai", "in_progress", 400, 120, 3, age_s=7500.0, window_s=DAY, waiting=400
    )
    assert not b1.ended and snap.batches[2].ended
    # The age moves with the clock; the window is the provider's.
    assert stats.snapshot(now=T0 + 7560).batches[1].age_s == 7560.0


def test_a_batch_without_times_has_no_age_nor_window():
    stats = RunStats()
    stats(started())
    stats(polled(created=None))
    batch = stats.snapshot(now=T0).batches[0]
    assert batch.age_s is None and batch.window_s is None


def test_many_batches_are_capped_with_a_count_of_the_rest():
    stats = RunStats()
    stats(started())
    for i in range(BATCHES_SHOWN + 2):
        stats(polled(f"live{i}", created=T0 + i))
    stats(polled("old", "completed", created=T0 + 100, waiting=0))
    stats(polled("older", "expired", created=T0 - 100, waiting=0))

    snap = stats.snapshot(now=T0 + 200)

    assert len(snap.batches) == BATCHES_SHOWN
    assert all(not b.ended for b in snap.batches)  # the ones in flight come first
    assert snap.batches[0].id == f"live{BATCHES_SHOWN + 1}"  # the latest first
    assert snap.batches_in_flight == BATCHES_SHOWN + 2
    assert snap.batches_not_shown == 4
    assert (
        batch_header(snap) == f"{BATCHES_SHOWN + 2} batches in flight, 2 ended (openai batch API)"
    )
    assert batch_lines(snap)[-1] == "… and 4 more batches"


def test_a_new_run_starts_without_the_batches_of_the_last():
    stats = RunStats()
    stats(started())
    stats(polled())
    assert stats.snapshot(now=T0).batches
    stats(started())
    snap = stats.snapshot(now=T0)
    assert snap.batches == () and snap.batches_in_flight == 0 and batch_lines(snap) == []


def test_saved_is_none_until_a_row_says_then_summed_as_the_cost():
    stats = RunStats()
    stats(started())
    stats(TurnFinished(row(0, saved=None, cost=None), 0, T0 + 1))
    assert stats.snapshot(now=T0 + 1).saved_usd is None
    assert not any("saved" in item for item in figure_items(stats.snapshot(now=T0 + 1)))
    stats(TurnFinished(row(1, saved=0.0100), 0, T0 + 2))
    stats(TurnFinished(row(2, saved=0.0023), 0, T0 + 3))
    snap = stats.snapshot(now=T0 + 3)
    assert snap.saved_usd == pytest.approx(0.0123)
    assert "saved $0.0123 (batch API)" in figure_items(snap)
    stats(TurnFinished(row(3, saved=0.0), 0, T0 + 4))
    stats(RunFinished(4, 0, 4.0, False, T0 + 4))
    assert stats.snapshot().saved_usd == pytest.approx(0.0123)  # the summary's, as it ended


# -- the words --------------------------------------------------------------------------------


def figures(**fields) -> BatchFigures:
    values = {
        "id": "batch_abc123", "api": "openai", "status": "in_progress", "total": 400,
        "completed": 120, "failed": 3, "age_s": 7500.0, "window_s": DAY, "waiting": 400,
    }  # fmt: skip
    return BatchFigures(**{**values, **fields})


def test_one_line_per_batch():
    assert batch_line(figures()) == (
        "batch_abc123 · in_progress · 120/400 done, 3 failed · 2 h 05 min of 24 h · 400 waiting"
    )
    assert batch_line(figures(failed=0, age_s=42.0, window_s=None)) == (
        "batch_abc123 · in_progress · 120/400 done · 42 s · 400 waiting"
    )
    # Once ended nobody waits on it; a failed batch says why.
    assert batch_line(
        figures(status="failed", completed=0, failed=0, waiting=7, error="input file invalid")
    ) == ("batch_abc123 · failed · 0/400 done · 2 h 05 min of 24 h · error: input file invalid")
    assert batch_line(figures(age_s=None)) == (
        "batch_abc123 · in_progress · 120/400 done, 3 failed · 400 waiting"
    )


def test_the_header_and_the_note_of_a_blocking_run():
    snap = Snapshot(
        started=True,
        batches=(figures(id="b2"), figures(id="b1"), figures(id="b0", status="completed")),
        batches_in_flight=2,
    )
    assert batch_header(snap) == "2 batches in flight, 1 ended (openai batch API)"
    one = Snapshot(started=True, batches=(figures(),), batches_in_flight=1)
    assert batch_header(one) == "1 batch in flight (openai batch API)"

    lines = batch_lines(snap)
    assert lines[0] == batch_header(snap)
    assert lines[1:] == [batch_line(b) for b in snap.batches]
    blocking = batch_lines(snap, blocking=True)
    assert blocking[:-1] == lines
    note = blocking[-1]
    assert "may take up to its completion window (24 h)" in note
    assert "nbllm.submit" in note and "%%llm_batch --background" in note
    assert "does not cancel the batches" in note
    # Nothing left to wait for: no note.
    ended = Snapshot(started=True, batches=(figures(status="completed"),), batches_in_flight=0)
    assert batch_header(ended) == "0 batches in flight, 1 ended (openai batch API)"
    assert batch_lines(ended, blocking=True) == [batch_header(ended), batch_line(ended.batches[0])]


def test_the_static_html_shows_the_batches_under_the_figures_escaped():
    snap = Snapshot(model="m", started=True, turns_total=4, batches_in_flight=1)
    lines = ["1 batch in flight (openai batch API)", "b1 · failed · error: <b>bad</b> & worse"]
    page = dashboard_html(snap, batches=lines)
    assert "1 batch in flight (openai batch API)" in page
    assert "error: &lt;b&gt;bad&lt;/b&gt; &amp; worse" in page and "<b>bad" not in page
    assert page.index("req/s") < page.index("batch in flight")  # under the figures
    assert "nbllm-batches" not in dashboard_html(snap)  # no block without batches


# -- the notebook dashboard ---------------------------------------------------------------


def test_the_dashboard_shows_each_batch_under_the_figures():
    dash = Dashboard(gpu=False)  # blocking: no Stop button
    dash(started(t=time.time()))
    dash(polled("b1", created=time.time() - 7500, t=time.time()))
    dash.render()
    assert "1 batch in flight (openai batch API)" in dash.batches.value
    assert "b1 · in_progress · 120/400 done, 3 failed · 2 h 05 min of 24 h" in dash.batches.value
    assert "may take up to its completion window (24 h)" in dash.batches.value
    children = list(dash.widget.children)
    assert children.index(dash.figures) < children.index(dash.batches)
    assert "b1 · in_progress" in dash.html()
    dash(RunFinished(0, 0, 1.0, True, time.time()))


def test_a_background_dashboard_has_no_note_on_blocking():
    dash = Dashboard(lambda: None, gpu=False)
    dash(started(t=time.time()))
    dash(polled(t=time.time()))
    dash.render()
    assert "batch_abc123" in dash.batches.value
    assert "completion window" not in dash.batches.value
    dash(RunFinished(0, 0, 1.0, True, time.time()))


def test_without_batches_the_block_takes_no_room():
    dash = Dashboard(gpu=False)
    dash(started(t=time.time()))
    dash.render()
    assert dash.batches.value == "" and dash.batches.layout.display == "none"
    dash(RunFinished(0, 0, 1.0, True, time.time()))


def test_stop_asks_before_it_cancels_batches_in_flight():
    calls: list[int] = []
    clock = FakeClock()
    dash = Dashboard(lambda: calls.append(1), gpu=False, clock=clock)
    dash(started(t=time.time()))
    dash(polled("b1", t=time.time()))
    dash(polled("b2", t=time.time()))
    button = dash.stop_button

    button.click()
    assert calls == []  # not yet: a misclick would cost the batches
    assert button.description == "Cancel 2 batches?" and button.button_style == "danger"
    status = dash.status.value
    assert "answers already returned are kept" in status
    assert "does NOT cancel them" in status and "re-attaches" in status

    clock.now += CONFIRM_S - 1
    button.click()
    assert calls == [1]
    assert button.description == "Cancel in-flight"
    assert "answers already returned" not in dash.status.value
    dash(RunFinished(0, 0, 1.0, True, time.time()))


def test_a_confirmation_left_too_long_asks_again():
    calls: list[int] = []
    clock = FakeClock()
    dash = Dashboard(lambda: calls.append(1), gpu=False, clock=clock)
    dash(started(t=time.time()))
    dash(polled("b1", t=time.time()))
    button = dash.stop_button
    button.click()
    assert button.description == "Cancel 1 batch?"

    clock.now += CONFIRM_S + 1
    dash.render()
    assert button.description == "Stop" and button.button_style == ""
    assert "answers already returned" not in dash.status.value
    button.click()
    assert calls == [] and button.description == "Cancel 1 batch?"
    button.click()
    assert calls == [1]
    dash(RunFinished(0, 0, 1.0, True, time.time()))


def test_one_click_stops_when_no_batch_is_in_flight():
    calls: list[int] = []
    dash = Dashboard(lambda: calls.append(1), gpu=False)
    dash(started(t=time.time()))
    dash(polled("b1", "completed", waiting=0, t=time.time()))
    dash.stop_button.click()
    assert calls == [1] and dash.stop_button.description == "Cancel in-flight"
    dash(RunFinished(0, 0, 1.0, True, time.time()))


# -- the terminal ------------------------------------------------------------------------------


def test_text_lines_say_each_batch_status_change_not_each_poll():
    out = io.StringIO()
    bar = TextProgress(file=out, frames=False)
    bar(started())
    bar(polled("b1", "validating", completed=0, failed=0, t=T0 + 10))
    bar(polled("b1", "in_progress", completed=5, failed=0, t=T0 + 40))
    bar(polled("b1", "in_progress", completed=9, failed=0, t=T0 + 70))  # a poll: no line
    bar(polled("b1", "completed", completed=400, failed=0, waiting=0, t=T0 + 100))
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("nbllm: started:")
    assert "may take up to its completion window (24 h)" in lines[1]  # once, at the first
    assert lines[2:] == [
        "nbllm: b1 · validating · 0/400 done · 10 s of 24 h · 400 waiting",
        "nbllm: b1 · in_progress · 5/400 done · 40 s of 24 h · 400 waiting",
        "nbllm: b1 · completed · 400/400 done · 1 min 40 s of 24 h",
    ]


def test_a_run_in_the_background_gets_no_note_that_the_call_blocks():
    out = io.StringIO()
    bar = TextProgress(file=out, frames=False, blocking=False)
    bar(started())
    bar(polled("b1", "validating", completed=0, failed=0, t=T0 + 10))
    assert "completion window" not in out.getvalue()
    assert "nbllm: b1 · validating" in out.getvalue()


def test_the_bar_counts_the_batches_in_flight_in_its_postfix():
    out = io.StringIO()
    bar = TextProgress(file=out)
    bar(started())
    bar(polled("b1", t=T0 + 10))
    bar(polled("b2", t=T0 + 10))
    text = out.getvalue()
    assert "nbllm: b1 · in_progress" in text and "nbllm: b2 · in_progress" in text
    assert "batches=2" in text.split("\r")[-1]
    bar(TurnFinished(row(0), 0, T0 + 20))
    bar(RunFinished(1, 0, 20.0, True, T0 + 20))


# -- the summary and the DataFrame ------------------------------------------------------------


def result_of(records: list[TurnRecord], **options) -> RunResult:
    return RunResult(records, conversations=len(records), wall_s=60.0, started_at=T0, **options)


def test_the_summary_says_what_the_batch_api_saved():
    result = result_of([row(0, saved=0.0100), row(1, saved=0.0023), row(2, saved=None)])
    summary = result.summary
    assert summary.saved_usd == pytest.approx(0.0123)
    assert summary.to_dict()["saved_usd"] == pytest.approx(0.0123)
    text = str(summary)
    assert "saved $0.0123 against live prices (batch API)" in text
    assert "saved $0.0123 against live prices (batch API)" in summary._repr_html_()


def test_a_run_without_a_batch_says_nothing_of_saving():
    summary = result_of([row(0, saved=None), row(1, saved=None)]).summary
    assert summary.saved_usd is None
    assert "saved" not in str(summary) and "saved" not in summary._repr_html_()


def test_the_df_has_saved_after_the_cost():
    df = result_of([row(0, saved=0.001), row(1, saved=None)]).df
    assert list(df.columns) == list(COLUMNS)
    assert list(df.columns).index("saved_usd") == list(df.columns).index("cost_usd") + 1
    assert str(df["saved_usd"].dtype) == "Float64"
    assert df["saved_usd"].iloc[0] == pytest.approx(0.001) and df["saved_usd"].iloc[1] is pd.NA


def test_compare_shows_the_saving_beside_each_models_cost_where_there_is_one():
    a = TurnRecord("c", 0, "q", answer="x", model="a", cost_usd=0.002, saved_usd=0.002)
    b = TurnRecord("c", 0, "q", answer="x", model="b", cost_usd=0.004, saved_usd=None)
    table = result_of([a, b], models=("a", "b")).compare()
    columns = list(table.columns)
    assert columns.index("saved_usd[a]") == columns.index("cost_usd[a]") + 1
    assert table["saved_usd[a]"].iloc[0] == pytest.approx(0.002)
    live = result_of([replace(a, saved_usd=None), b], models=("a", "b")).compare()
    assert not any(c.startswith("saved_usd") for c in live.columns)


# -- stored runs ---------------------------------------------------------------------------------


def test_list_runs_counts_the_batches_still_in_flight(_nbllm_dir):
    engine = nbllm.FakeEngine(lambda request: "ok")
    nbllm.run([{"id": "a", "turns": ["hi"]}], engine=engine, model="m", progress=False)
    identity = RunIdentity(dataset="d", model="gpt-4o-mini", engine="openai batch")
    path = _nbllm_dir / "runs" / "batchrun0000000" / "checkpoint.sqlite"
    path.parent.mkdir(parents=True)
    store = CheckpointStore.open(path, identity, conversations=3, turns=3)
    try:
        journal = store.journal()
        lines = (BatchLine("r0", "f" * 64, "a", 0),)
        journal.created(BatchRecord("batch_in_flight", "openai", T0, T0 + DAY, "file-1", lines))
        journal.created(BatchRecord("batch_done", "openai", T0, T0 + DAY, "file-2", lines))
        journal.collected("batch_done", "completed", {})
    finally:
        store.close()

    df = nbllm.runs.list_runs()

    assert str(df["batches_in_flight"].dtype) == "Int64"
    by_model = dict(zip(df["model"], df["batches_in_flight"], strict=True))
    assert by_model == {"gpt-4o-mini": 1, "m": 0}


def test_list_runs_reads_a_checkpoint_older_than_the_batches_as_none_in_flight(_nbllm_dir):
    nbllm.run(
        [{"id": "a", "turns": ["hi"]}],
        engine=nbllm.FakeEngine(lambda r: "ok"),
        model="m",
        progress=False,
    )
    (path,) = (_nbllm_dir / "runs").glob("*/checkpoint.sqlite")
    with sqlite3.connect(path) as conn:  # as a file written before schema 6 would be
        conn.execute("DROP TABLE batch_lines")
        conn.execute("DROP TABLE batches")
    conn.close()
    df = nbllm.runs.list_runs()
    assert df["batches_in_flight"].tolist() == [0] and df["error"].isna().all()


# -- the magic ---------------------------------------------------------------------------------


def test_batch_api_in_the_magic_runs_in_the_background(shell, capsys):
    # The test server has no batch endpoints: the job is stopped before it polls any.
    with TestServer() as server:
        shell.user_ns["df"] = pd.DataFrame({"q": ["What was revenue?", "And net income?"]})
        line = f"df -m nbllm-test --api-base {server.url} -o bt --batch-api --no-checkpoint"
        began = time.perf_counter()
        cell = shell.run_cell(f"%%llm_batch {line}\nuser: {{q}}\n")
        assert cell.error_in_exec is None
        assert time.perf_counter() - began < 10  # at once, not after the batch
        job = shell.user_ns["bt_job"]
        assert isinstance(job, Job) and "bt" not in shell.user_ns
        assert f"nbllm job {job.id} started in the background" in capsys.readouterr().out
        result = job.stop(timeout=30)
        assert shell.user_ns["bt"] is result
        assert "batch" in (result.engine or "")


def test_batch_api_from_the_environment_runs_in_the_background(shell, monkeypatch):
    """batch_api from $NBLLM_BATCH_API (or nbllm.toml) holds the kernel no more than the flag."""
    monkeypatch.setenv("NBLLM_BATCH_API", "true")
    with TestServer(batch_delay_s=30) as server:
        shell.user_ns["df"] = pd.DataFrame({"q": ["What was revenue?"]})
        line = f"df -m nbllm-test --api-base {server.url} -o bt --batch-poll-s 0.05 --no-checkpoint"
        began = time.perf_counter()
        cell = shell.run_cell(f"%%llm_batch {line}\nuser: {{q}}\n")
        assert cell.error_in_exec is None
        assert time.perf_counter() - began < 10
        job = shell.user_ns["bt_job"]
        assert isinstance(job, Job)
        job.stop(timeout=30)


def test_the_magics_help_says_batch_api_runs_in_the_background(shell, capsys):
    shell.run_cell("%llm_batch -h")
    out = " ".join(capsys.readouterr().out.split())
    assert "--batch-api implies it" in out


def test_an_ended_batch_s_age_stops_when_it_was_found_ended() -> None:
    """A batch that took 10 s still shows 10 s later on, not the time since it began."""
    ended = BatchUpdated("batch_a", "openai", "completed", 4, 4, 0, 90.0, 90.0 + 86400, 0, 100.0)
    going = replace(ended, status="in_progress", completed=1, t=95.0)
    assert batch_figures(ended, now=500.0).age_s == 10.0
    assert batch_figures(going, now=500.0).age_s == 410.0
