"""Background runs: ``nbllm.submit`` returns at once, ``nbllm.jobs()`` lists, ``stop()`` keeps
what finished."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

import nbllm
from nbllm import prepare
from nbllm.errors import ConfigError, DatasetError, RequestRejected
from nbllm.executor import Executor
from nbllm.jobs import JOB_COLUMNS, Job

QUIET = {"progress": False}


def dataset(n: int = 3, turns: int = 2) -> list[dict]:
    return [{"id": f"c{i}", "turns": [f"q{i}.{k}" for k in range(turns)]} for i in range(n)]


def test_submit_returns_while_the_batch_runs():
    engine = nbllm.FakeEngine(latency=0.5)
    t0 = time.perf_counter()
    job = nbllm.submit(dataset(), engine=engine, **QUIET)
    returned_after = time.perf_counter() - t0

    assert returned_after < engine.latency
    assert isinstance(job, Job)
    assert job.status == "running" and not job.done()
    assert job.turns_total == 6
    assert job._thread.name == f"nbllm-job-{job.id}" and job._thread.daemon
    assert "running" in repr(job) and "/6 turns" in repr(job)

    result = job.result(timeout=30)
    assert job.done() and job.status == "done"
    assert result.summary.turns_ok == 6 and not result.interrupted
    assert job.turns_done == 6
    assert job.wall_s >= engine.latency
    assert job.result() is result  # the same result every time


def test_jobs_lists_every_job_most_recent_first():
    first = nbllm.submit(dataset(1), engine=nbllm.FakeEngine(), **QUIET)
    first.result(timeout=30)
    second = nbllm.submit(dataset(2), engine=nbllm.FakeEngine(latency=0.3), **QUIET)

    listed = nbllm.jobs()
    assert tuple(listed.columns) == JOB_COLUMNS
    top = listed.head(2).set_index("id")
    assert list(top.index) == [second.id, first.id]
    assert top.loc[second.id, "status"] == "running"
    assert top.loc[second.id, "turns_total"] == 4
    assert top.loc[second.id, "model"] == "fake"
    assert top.loc[first.id, "status"] == "done"  # finished jobs stay listed
    assert top.loc[first.id, "turns_done"] == 2

    second.result(timeout=30)
    assert nbllm.jobs().set_index("id").loc[second.id, "status"] == "done"


def test_result_times_out_while_running():
    job = nbllm.submit(dataset(1), engine=nbllm.FakeEngine(latency=0.5), **QUIET)
    with pytest.raises(TimeoutError, match=f"job {job.id} is still running"):
        job.result(timeout=0.01)
    job.result(timeout=30)


def test_stop_returns_the_finished_turns():
    later_turns = 0
    all_first_turns_done = threading.Event()

    async def handler(request):
        nonlocal later_turns
        if len(request.messages) > 1:  # turn 1: its conversation's turn 0 has its row
            later_turns += 1
            if later_turns == 3:
                all_first_turns_done.set()
            await asyncio.sleep(60)
        return "first answer"

    job = nbllm.submit(
        dataset(3), engine=nbllm.FakeEngine(handler), concurrency=8, stop_grace_s=0.2, **QUIET
    )
    assert all_first_turns_done.wait(timeout=30)

    t0 = time.perf_counter()
    result = job.stop(timeout=30)
    assert time.perf_counter() - t0 < 5  # the grace ran out, cancelling the hung requests

    assert result.interrupted
    assert job.status == "stopped" and job.done()
    df = result.df
    first, second = df[df["turn"] == 0], df[df["turn"] == 1]
    assert (first["answer"] == "first answer").all() and first["error"].isna().all()
    assert second["answer"].isna().all()
    assert second["error"].str.startswith("not run").all()
    assert job.result() is result
    job._thread.join(timeout=10)
    assert not job._thread.is_alive()


def test_stop_at_once_keeps_nothing_and_says_so():
    """A stop that may come before the job's loop exists still ends the run cleanly.

    No grace: whether or not the first requests went out before the stop, none may finish.
    """
    job = nbllm.submit(dataset(2), engine=nbllm.FakeEngine(latency=5), stop_grace_s=0, **QUIET)
    result = job.stop(timeout=30)
    assert result.interrupted and job.status == "stopped"
    assert result.summary.turns == 4 and result.summary.turns_ok == 0


def test_stop_after_the_end_returns_the_result():
    job = nbllm.submit(dataset(1), engine=nbllm.FakeEngine(), **QUIET)
    result = job.result(timeout=30)
    assert job.stop() is result
    assert job.status == "done"


def test_failing_requests_are_rows_and_the_job_is_done():
    def handler(request):
        raise RequestRejected("no such thing", status=400)

    job = nbllm.submit(dataset(2), engine=nbllm.FakeEngine(handler), **QUIET)
    result = job.result(timeout=30)
    assert job.status == "done"
    assert result.summary.turns_failed == 4
    assert result.df["error"].str.contains("no such thing|skipped", regex=True).all()


def test_a_run_that_raises_fails_the_job(monkeypatch):
    class BrokenExecutor(Executor):
        async def run(self, conversations):
            await super().run(conversations)
            raise RuntimeError("broken after the run")

    monkeypatch.setattr(prepare, "Executor", BrokenExecutor)
    job = nbllm.submit(dataset(1), engine=nbllm.FakeEngine(), **QUIET)
    with pytest.raises(RuntimeError, match="broken after the run"):
        job.result(timeout=30)
    assert job.status == "failed"
    assert "RuntimeError: broken after the run" in repr(job)
    assert nbllm.jobs().set_index("id").loc[job.id, "status"] == "failed"


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"model": "m", "concurrency": 0}, ConfigError, "concurrency="),
        ({"api_base": "http://127.0.0.1:9/v1"}, ConfigError, "model= is required"),
        ({"model": "m", "engine": "no-such-engine"}, ConfigError, "no-such-engine"),
        ({"model": "m", "checkpoint": 3}, ConfigError, "checkpoint="),
    ],
)
def test_bad_options_raise_at_submit(options, error, message):
    before = set(nbllm.jobs()["id"])
    with pytest.raises(error, match=message):
        nbllm.submit(dataset(1), **options, **QUIET)
    assert set(nbllm.jobs()["id"]) == before  # nothing was listed


def test_bad_data_raises_at_submit():
    engine = nbllm.FakeEngine()
    with pytest.raises(DatasetError, match="record 0"):
        nbllm.submit([{"id": "a", "turns": []}], engine=engine, **QUIET)
    assert engine.calls == 0


def test_done_callbacks_run_in_the_job_thread_or_at_once():
    seen: list[tuple[str, str, str]] = []
    release = threading.Event()

    async def handler(request):
        await asyncio.to_thread(release.wait, 30)
        return "ok"

    job = nbllm.submit(dataset(1, turns=1), engine=nbllm.FakeEngine(handler), **QUIET)
    job.add_done_callback(
        lambda j: seen.append(("early", j.status, threading.current_thread().name))
    )
    release.set()
    job.result(timeout=30)
    job.add_done_callback(
        lambda j: seen.append(("late", j.status, threading.current_thread().name))
    )
    assert seen == [
        ("early", "done", f"nbllm-job-{job.id}"),
        ("late", "done", threading.current_thread().name),
    ]


def test_a_failing_callback_is_logged_not_raised(caplog):
    def bad(job):
        raise ValueError("callback bug")

    job = nbllm.submit(dataset(1, turns=1), engine=nbllm.FakeEngine(), **QUIET)
    with caplog.at_level(logging.ERROR, logger="nbllm"):
        job.result(timeout=30)
        job.add_done_callback(bad)
    assert "callback" in caplog.text and "failed" in caplog.text


def test_the_callers_listeners_still_hear_the_run():
    events = []
    job = nbllm.submit(
        dataset(2, turns=1), engine=nbllm.FakeEngine(), listeners=[events.append], **QUIET
    )
    job.result(timeout=30)
    names = [type(e).__name__ for e in events]
    assert names[0] == "RunStarted" and names[-1] == "RunFinished"
    assert names.count("TurnFinished") == 2


def test_a_job_that_cannot_reach_its_server_stops_by_itself_and_says_why():
    def refused(request):
        error = nbllm.ConnectionFailed("connection to http://127.0.0.1:9/v1 failed")
        raise error from ConnectionRefusedError(111, "Connect call failed")

    job = nbllm.submit(dataset(3), engine=nbllm.FakeEngine(refused), **QUIET)
    result = job.result(timeout=30)
    assert job.status == "stopped" and not result.interrupted
    assert result.stop_reason == "cannot reach fake: connection refused"
    assert result.summary.turns_ok == 0


class _Loaded(nbllm.FakeEngine):
    """Stands for a local model: made for the job, so the job must close it."""

    def __init__(self, closed: list[str]) -> None:
        super().__init__()
        self._closed = closed

    async def aclose(self) -> None:
        self._closed.append(threading.current_thread().name)
        await super().aclose()


def test_a_local_model_loads_in_the_jobs_thread_not_in_the_calling_cell(monkeypatch):
    loaded_in: list[str] = []
    closed: list[str] = []

    def slow_local_engine(engine, **options):
        time.sleep(0.5)  # a model load blocks the thread it runs in
        loaded_in.append(threading.current_thread().name)
        return _Loaded(closed)

    monkeypatch.setattr(prepare, "create_engine", slow_local_engine)
    t0 = time.perf_counter()
    job = nbllm.submit(dataset(2), engine="torch", checkpoint=False, cache=False, **QUIET)
    assert time.perf_counter() - t0 < 0.4  # the cell is free while the model loads
    assert job.turns_total == 4 and job.status == "running"

    result = job.result(timeout=30)
    assert result.summary.turns_ok == 4
    assert loaded_in == [f"nbllm-job-{job.id}"]
    assert closed == [f"nbllm-job-{job.id}"]  # the job's engine, closed by the job


def test_a_local_job_whose_checkpoint_is_refused_fails_and_closes_its_model(monkeypatch, tmp_path):
    closed: list[str] = []
    monkeypatch.setattr(prepare, "create_engine", lambda engine, **_: _Loaded(closed))
    damaged = tmp_path / "checkpoint.sqlite"
    damaged.write_bytes(b"not a database, " * 64)
    job = nbllm.submit(dataset(1), engine="torch", checkpoint=str(damaged), **QUIET)
    with pytest.raises(nbllm.CheckpointError):
        job.result(timeout=30)
    assert job.status == "failed"
    assert len(closed) == 1


def test_a_server_engine_is_still_made_in_the_calling_cell(monkeypatch):
    made_in: list[str] = []

    def engine_for_a_server(engine, **options):
        made_in.append(threading.current_thread().name)
        return nbllm.FakeEngine()

    monkeypatch.setattr(prepare, "create_engine", engine_for_a_server)
    job = nbllm.submit(dataset(1), model="m", api_base="http://127.0.0.1:9/v1", **QUIET)
    job.result(timeout=30)
    assert made_in == [threading.current_thread().name]
