"""The run's checkpoint: where it lives, what a re-run reads back, what it refuses.

Promises pinned here: a finished (committed) turn is never sent again by a re-run of the
same call, and the turns after it are sent with its stored answer; ``resume=False``
starts over and says so; a file made for another call or in use by another run is
refused with a ``CheckpointError`` naming the file and what to do, before any request,
leaving the file's bytes as they were (damaged, foreign and future files: test_storage);
nothing secret is ever written to disk or to the logs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import (
    answer_from_history,
    digest,
    random_bytes,
    rewrite_as_schema_1,
    schema_of,
    uninterrupted_answers,
)

import nbllm
from nbllm import ChatRequest, ChatResponse, FakeEngine, RequestRejected
from nbllm.errors import CheckpointError
from nbllm.executor.checkpoint import RunIdentity, dataset_hash
from nbllm.executor.events import TurnFinished
from nbllm.testing import TestServer

QUIET = {"progress": False, "cache": False}


def dataset(n: int = 6, question: str = "question") -> list[dict]:
    """``n`` conversations of 1 to 3 turns; every question names its conversation and turn."""
    return [
        {"id": f"c{i}", "turns": [f"c{i} {question} {k}" for k in range(1 + i % 3)]}
        for i in range(n)
    ]


def with_cached_tokens(request: ChatRequest) -> ChatResponse:
    """An answer from history; its engine says it took 2 prompt tokens per earlier turn
    from its cache."""
    text = answer_from_history(request)
    return ChatResponse(
        text, "m", 10 * len(request.messages), 1, cached_tokens=len(request.messages) - 1
    )


def n_turns(data: list[dict]) -> int:
    return sum(len(r["turns"]) for r in data)


def stored_turns(path: Path) -> list[tuple[int, int, str]]:
    """(conversation, turn, answer) of every committed row, read without writing anything."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(
            "SELECT conversation, turn, answer FROM turns ORDER BY conversation, turn"
        ).fetchall()
    finally:
        conn.close()


def run_folders(nbllm_dir: Path) -> list[Path]:
    runs = nbllm_dir / "runs"
    return sorted(p for p in runs.iterdir() if p.is_dir()) if runs.exists() else []


def last_user(request: ChatRequest) -> str:
    return str(request.messages[-1]["content"])


# --------------------------------------------------------------------------- exports


def test_checkpoint_error_is_part_of_the_public_api():
    """Users are told to catch ``nbllm.CheckpointError``; it must be importable from nbllm."""
    assert getattr(nbllm, "CheckpointError", None) is CheckpointError
    assert "CheckpointError" in nbllm.__all__


# --------------------------------------------------------------------------- where it lives


def test_default_checkpoint_is_under_nbllm_dir_runs_fingerprint(_nbllm_dir):
    data = dataset()
    engine = FakeEngine()
    result = nbllm.run(data, engine=engine, model="m", **QUIET)
    identity = RunIdentity(
        dataset=dataset_hash(nbllm.load_conversations(data)),
        model="m",
        engine=engine.identity(),
        params={},
        system=None,
    )
    path = _nbllm_dir / "runs" / identity.fingerprint[:16] / "checkpoint.sqlite"
    assert path.is_file()
    assert run_folders(_nbllm_dir) == [path.parent]
    assert len(stored_turns(path)) == result.summary.turns_ok == n_turns(data)
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    finally:
        conn.close()
    assert meta["kind"] == "checkpoint"
    assert meta["fingerprint"] == identity.fingerprint


def test_without_nbllm_dir_the_checkpoint_goes_to_dot_nbllm_here(tmp_path, monkeypatch):
    monkeypatch.delenv("NBLLM_DIR")
    monkeypatch.chdir(tmp_path)
    nbllm.run(dataset(2), engine=FakeEngine(), model="m", **QUIET)
    [folder] = run_folders(tmp_path / ".nbllm")
    assert (folder / "checkpoint.sqlite").is_file()


def test_checkpoint_false_writes_no_run_and_resumes_nothing(_nbllm_dir):
    data = dataset()
    engine = FakeEngine()
    first = nbllm.run(data, engine=engine, model="m", checkpoint=False, **QUIET)
    second = nbllm.run(data, engine=engine, model="m", checkpoint=False, **QUIET)
    assert not (_nbllm_dir / "runs").exists()
    assert engine.calls == 2 * n_turns(data)
    assert not first.df["resumed"].any() and not second.df["resumed"].any()


def test_an_existing_folder_holds_checkpoint_sqlite(tmp_path):
    folder = tmp_path / "my-run"
    folder.mkdir()
    nbllm.run(dataset(2), engine=FakeEngine(), model="m", checkpoint=folder, **QUIET)
    assert (folder / "checkpoint.sqlite").is_file()
    # A path without a suffix that does not exist yet becomes such a folder too.
    nbllm.run(dataset(2), engine=FakeEngine(), model="m", checkpoint=tmp_path / "new", **QUIET)
    assert (tmp_path / "new" / "checkpoint.sqlite").is_file()


def test_an_existing_folder_with_a_file_like_name_still_holds_the_checkpoint(tmp_path):
    """An existing folder is a folder, whatever its name ends with."""
    folder = tmp_path / "experiment.db"
    folder.mkdir()
    nbllm.run(dataset(2), engine=FakeEngine(), model="m", checkpoint=folder, **QUIET)
    assert (folder / "checkpoint.sqlite").is_file()


@pytest.mark.parametrize("name", ["run.sqlite", "run.db", "run.sqlite3"])
def test_a_sqlite_path_is_the_file_itself(tmp_path, name):
    path = tmp_path / "sub" / name
    data = dataset(3)
    nbllm.run(data, engine=FakeEngine(), model="m", checkpoint=path, **QUIET)
    assert path.is_file()
    assert len(stored_turns(path)) == n_turns(data)
    assert not (path / "checkpoint.sqlite").exists()


# --------------------------------------------------------------------------- resuming


def test_a_rerun_sends_nothing_and_returns_the_same_frame(_nbllm_dir):
    data = dataset()
    first_engine, second_engine = FakeEngine(), FakeEngine()
    first = nbllm.run(data, engine=first_engine, model="m", **QUIET)
    second = nbllm.run(data, engine=second_engine, model="m", **QUIET)
    assert first_engine.calls == n_turns(data)
    assert second_engine.calls == 0
    assert not first.df["resumed"].any()
    assert second.df["resumed"].all()
    assert second.summary.resumed == n_turns(data) == second.summary.turns_ok
    pd.testing.assert_frame_equal(
        first.df.drop(columns="resumed"), second.df.drop(columns="resumed")
    )
    assert len(run_folders(_nbllm_dir)) == 1


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"concurrency": 2}, id="concurrency"),
        pytest.param({"max_conversations": 1}, id="max_conversations"),
        pytest.param({"timeout": 7.0}, id="timeout"),
        pytest.param({"retries": 0}, id="retries"),
        pytest.param({"rpm": 10_000}, id="rpm"),
        pytest.param({"api_key": "a-new-key"}, id="api_key"),
    ],
)
def test_options_that_do_not_change_answers_resume_the_same_run(_nbllm_dir, change):
    """Pace, retries and credentials decide no answer: changing them after a crash resumes."""
    data = dataset()
    with TestServer() as server:
        options = {"model": "nbllm-test", "api_base": server.url, **QUIET}
        nbllm.run(data, api_key="the-old-key", **options)
        assert len(server.requests) == n_turns(data)
        again = nbllm.run(data, **{"api_key": "the-old-key", **options, **change})
        assert len(server.requests) == n_turns(data)
    assert again.df["resumed"].all()
    assert len(run_folders(_nbllm_dir)) == 1


def test_a_rerun_after_failures_sends_only_the_failed_and_skipped_turns(tmp_path):
    data = dataset(8)
    failing = {"c1 question 0", "c5 question 1"}  # c1: both turns; c5: turns 1 and 2
    sent: list[str] = []

    def handler(request: ChatRequest) -> str:
        sent.append(last_user(request))
        if last_user(request) in failing:
            raise RequestRejected("HTTP 400: no")
        return answer_from_history(request)

    path = tmp_path / "ckpt.sqlite"
    first = nbllm.run(data, engine=FakeEngine(handler), model="m", checkpoint=path, **QUIET)
    failed = first.df[first.df["error"].notna()]
    assert sorted(zip(failed["conversation_id"], failed["turn"], strict=True)) == [
        ("c1", 0),
        ("c1", 1),
        ("c5", 1),
        ("c5", 2),
    ]
    assert len(stored_turns(path)) == first.summary.turns_ok == n_turns(data) - 4

    failing.clear()
    sent.clear()
    second = nbllm.run(data, engine=FakeEngine(handler), model="m", checkpoint=path, **QUIET)
    assert sorted(sent) == ["c1 question 0", "c1 question 1", "c5 question 1", "c5 question 2"]
    assert second.summary.turns_ok == n_turns(data)
    resent = second.df[~second.df["resumed"]]
    assert sorted(zip(resent["conversation_id"], resent["turn"], strict=True)) == [
        ("c1", 0),
        ("c1", 1),
        ("c5", 1),
        ("c5", 2),
    ]
    # c5's turn 1 was sent with turn 0's stored answer as its history: every answer is
    # what an uninterrupted run gets.
    assert list(second.df["answer"]) == uninterrupted_answers(data)


def test_a_resumed_turn_is_sent_with_the_stored_answers(tmp_path):
    data = [{"id": "c", "turns": ["q0", "q1", "q2"]}, {"id": "d", "turns": ["r0", "r1"]}]
    failing = {"q1", "r1"}
    sent: list[list[dict]] = []

    def handler(request: ChatRequest) -> str:
        sent.append([dict(m) for m in request.messages])
        if last_user(request) in failing:
            raise RequestRejected("HTTP 400: no")
        return answer_from_history(request)

    path = tmp_path / "ckpt.sqlite"
    nbllm.run(data, engine=FakeEngine(handler), model="m", checkpoint=path, **QUIET)
    stored = {(c, t): a for c, t, a in stored_turns(path)}
    assert list(stored) == [(0, 0), (1, 0)]

    failing.clear()
    sent.clear()
    second = nbllm.run(data, engine=FakeEngine(handler), model="m", checkpoint=path, **QUIET)
    first_sent = {messages[-1]["content"]: messages for messages in sent}
    assert first_sent["q1"] == [
        {"role": "user", "content": "q0"},
        {"role": "assistant", "content": stored[(0, 0)]},
        {"role": "user", "content": "q1"},
    ]
    assert first_sent["r1"] == [
        {"role": "user", "content": "r0"},
        {"role": "assistant", "content": stored[(1, 0)]},
        {"role": "user", "content": "r1"},
    ]
    assert second.df["resumed"].tolist() == [True, False, False, True, False]
    assert list(second.df["answer"]) == uninterrupted_answers(data)


async def test_a_cancelled_run_then_a_rerun_completes_the_rest(tmp_path):
    data = dataset(12)
    total = n_turns(data)
    path = tmp_path / "ckpt.sqlite"
    finished: list[TurnFinished] = []
    holder: dict[str, asyncio.Task] = {}

    def cancel_after_some(event):
        if isinstance(event, TurnFinished):
            finished.append(event)
            if len(finished) == 7:
                holder["task"].cancel()

    first_engine = FakeEngine(answer_from_history, latency=0.01)
    holder["task"] = asyncio.ensure_future(
        nbllm.arun(
            data,
            engine=first_engine,
            model="m",
            concurrency=3,
            checkpoint=path,
            listeners=[cancel_after_some],
            **QUIET,
        )
    )
    first = await asyncio.wait_for(holder["task"], 10)
    assert first.interrupted
    done_first = first.summary.turns_ok
    assert 7 <= done_first < total
    # Every turn answered before the stop is in the file: closing committed what was pending.
    assert len(stored_turns(path)) == done_first

    second_engine = FakeEngine(answer_from_history)
    second = await nbllm.arun(data, engine=second_engine, model="m", checkpoint=path, **QUIET)
    assert not second.interrupted
    assert second.summary.turns_ok == total
    assert second_engine.calls == total - done_first
    assert second.summary.resumed == done_first
    ok_first = first.df[first.df["error"].isna()]
    resumed = second.df[second.df["resumed"]]
    assert list(zip(resumed["conversation_id"], resumed["turn"], strict=True)) == list(
        zip(ok_first["conversation_id"], ok_first["turn"], strict=True)
    )
    assert list(second.df["answer"]) == uninterrupted_answers(data)


async def test_a_stopped_run_resumed_keeps_each_rows_cached_tokens(tmp_path):
    data = dataset(12)
    path = tmp_path / "ckpt.sqlite"
    holder: dict[str, asyncio.Task] = {}
    finished: list[TurnFinished] = []

    def cancel_after_some(event):
        if isinstance(event, TurnFinished):
            finished.append(event)
            if len(finished) == 7:
                holder["task"].cancel()

    holder["task"] = asyncio.ensure_future(
        nbllm.arun(
            data, engine=FakeEngine(with_cached_tokens, latency=0.01), model="m",
            concurrency=3, checkpoint=path, listeners=[cancel_after_some], **QUIET,
        )
    )  # fmt: skip
    first = await asyncio.wait_for(holder["task"], 10)
    assert first.interrupted
    second = await nbllm.arun(
        data, engine=FakeEngine(with_cached_tokens), model="m", checkpoint=path, **QUIET
    )
    df = second.df
    assert 7 <= df["resumed"].sum() < len(df)
    # Resumed or sent now, each row holds what its engine said: 2 per earlier turn.
    assert list(df["cached_tokens"]) == [2 * t for t in df["turn"]]
    ok_first = first.df[first.df["error"].isna()]
    resumed = df[df["resumed"]]
    assert list(resumed["cached_tokens"]) == list(ok_first["cached_tokens"])


def test_resume_false_sends_everything_again_and_warns(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="nbllm")
    data = dataset()
    total = n_turns(data)
    path = tmp_path / "ckpt.sqlite"
    nbllm.run(data, engine=FakeEngine(), model="m", checkpoint=path, resume=False, **QUIET)
    assert not [r for r in caplog.records if "starting over" in r.getMessage()]

    engine = FakeEngine()
    result = nbllm.run(data, engine=engine, model="m", checkpoint=path, resume=False, **QUIET)
    assert engine.calls == total
    assert not result.df["resumed"].any()
    warnings = [r for r in caplog.records if "starting over" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert f"{total} finished turns" in warnings[0].getMessage()
    assert len(stored_turns(path)) == total


# --------------------------------------------------------------------------- another call


def _other_handler(request: ChatRequest) -> str:
    return "something else"


CHANGES = {
    "question": (lambda: {"data": dataset(question="QUESTION")}, "the dataset"),
    "model": (lambda: {"model": "other-model"}, "the model"),
    "temperature": (lambda: {"temperature": 0.7}, "the sampling parameters"),
    "max_tokens": (lambda: {"max_tokens": 5}, "the sampling parameters"),
    "system": (lambda: {"system": "Be brief."}, "the system prompt"),
    "engine": (lambda: {"engine": FakeEngine(_other_handler)}, "the engine"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_changed_call_on_an_explicit_path_is_refused(tmp_path, change):
    path = tmp_path / "ckpt.sqlite"
    nbllm.run(dataset(), engine=FakeEngine(), model="m", checkpoint=path, **QUIET)
    before = digest(path)

    make, what = CHANGES[change]
    call = {"engine": FakeEngine(), "model": "m", **make()}
    data = call.pop("data", dataset())
    with pytest.raises(CheckpointError) as info:
        nbllm.run(data, checkpoint=path, **call, **QUIET)
    message = str(info.value)
    assert str(path) in message
    assert what in message
    assert "resume=False" in message and "checkpoint=" in message  # how to start fresh
    assert call["engine"].calls == 0
    assert digest(path) == before

    # resume=False is the way to start over in that file.
    fresh = nbllm.run(data, checkpoint=path, resume=False, **call, **QUIET)
    assert fresh.summary.turns_ok == n_turns(data)
    assert not fresh.df["resumed"].any()
    assert call["engine"].calls == n_turns(data)


def test_with_the_default_location_changed_data_is_a_new_run(_nbllm_dir):
    first_engine, second_engine = FakeEngine(), FakeEngine()
    nbllm.run(dataset(), engine=first_engine, model="m", **QUIET)
    changed = dataset(question="QUESTION")
    second = nbllm.run(changed, engine=second_engine, model="m", **QUIET)
    assert second_engine.calls == n_turns(changed)
    assert not second.df["resumed"].any()
    assert len(run_folders(_nbllm_dir)) == 2


# --------------------------------------------------------------------------- unusable files


# The damaged, foreign and future files of both kinds: tests/executor/test_storage.py.


def test_an_unusable_checkpoint_sends_no_http_request(tmp_path):
    path = tmp_path / "ckpt.sqlite"
    random_bytes(path)
    before = digest(path)
    with TestServer() as server, pytest.raises(CheckpointError, match=r"ckpt\.sqlite"):
        nbllm.run(dataset(), model="nbllm-test", api_base=server.url, checkpoint=path, **QUIET)
    assert server.requests == []
    assert digest(path) == before


# --------------------------------------------------------------------------- one run per file


async def test_a_second_run_on_a_checkpoint_in_use_in_this_process_is_refused(tmp_path):
    data = dataset(8)
    path = tmp_path / "ckpt.sqlite"
    sending = asyncio.Event()

    async def slow(request: ChatRequest) -> str:
        sending.set()
        await asyncio.sleep(0.05)
        return answer_from_history(request)

    first = asyncio.ensure_future(
        nbllm.arun(
            data, engine=FakeEngine(slow), model="m", checkpoint=path, concurrency=2, **QUIET
        )
    )
    try:
        await asyncio.wait_for(sending.wait(), 10)
        second_engine = FakeEngine(slow)
        with pytest.raises(CheckpointError) as info:
            await nbllm.arun(data, engine=second_engine, model="m", checkpoint=path, **QUIET)
        assert "in use by another run" in str(info.value)
        assert str(path) in str(info.value)
        assert second_engine.calls == 0
        assert not first.done()
    finally:
        result = await asyncio.wait_for(first, 10)
    assert result.summary.turns_ok == n_turns(data)
    # Once the first run is over the file is free: a third run resumes all of it.
    third_engine = FakeEngine(slow)
    third = await nbllm.arun(data, engine=third_engine, model="m", checkpoint=path, **QUIET)
    assert third_engine.calls == 0 and third.df["resumed"].all()


def test_a_run_in_another_thread_holds_the_checkpoint(tmp_path):
    data = dataset(6)
    path = tmp_path / "ckpt.sqlite"
    started, release = threading.Event(), threading.Event()
    box: dict = {}

    def handler(request: ChatRequest) -> str:
        started.set()
        release.wait(10)
        return "ok"

    def background():
        try:
            box["result"] = nbllm.run(
                data, engine=FakeEngine(handler), model="m", checkpoint=path, **QUIET
            )
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=background, name="nbllm-test-background-run")
    thread.start()
    try:
        assert started.wait(10), "the background run never sent a request"
        engine = FakeEngine(handler)
        with pytest.raises(CheckpointError, match="in use by another run"):
            nbllm.run(data, engine=engine, model="m", checkpoint=path, **QUIET)
        assert engine.calls == 0
    finally:
        release.set()
        thread.join(10)
    assert not thread.is_alive()
    assert "error" not in box, box.get("error")
    assert box["result"].summary.turns_ok == n_turns(data)
    again = nbllm.run(data, engine=FakeEngine(handler), model="m", checkpoint=path, **QUIET)
    assert again.df["resumed"].all()


LOCK_HOLDER = """
import sys
import nbllm

data = [{"id": f"c{i}", "turns": [f"c{i} q{k}" for k in range(3)]} for i in range(20)]
nbllm.run(
    data,
    engine=nbllm.FakeEngine(latency=0.3),
    model="m",
    checkpoint=sys.argv[1],
    cache=False,
    concurrency=2,
    progress=False,
)
"""


def test_a_second_process_is_refused_while_the_first_holds_the_checkpoint(tmp_path):
    script = tmp_path / "holder.py"
    script.write_text(textwrap.dedent(LOCK_HOLDER))
    path = tmp_path / "ckpt.sqlite"
    lock = path.with_name(path.name + ".lock")
    data = [{"id": f"c{i}", "turns": [f"c{i} q{k}" for k in range(3)]} for i in range(20)]
    with open(tmp_path / "holder.log", "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, str(script), str(path)], stdout=log_file, stderr=log_file
        )
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and proc.poll() is None:
                if lock.exists() and lock.read_text().strip() == f"pid {proc.pid}":
                    break
                time.sleep(0.02)
            assert proc.poll() is None, (tmp_path / "holder.log").read_text()
            assert lock.read_text().strip() == f"pid {proc.pid}", "the child never took the lock"

            engine = FakeEngine()
            with pytest.raises(CheckpointError) as info:
                nbllm.run(data, engine=engine, model="m", checkpoint=path, **QUIET)
            assert "in use by another run" in str(info.value)
            assert f"pid {proc.pid}" in str(info.value)
            assert engine.calls == 0
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    # kill -9 drops the lock: the same call now runs, resuming what the child committed.
    engine = FakeEngine()
    result = nbllm.run(data, engine=engine, model="m", checkpoint=path, **QUIET)
    assert result.summary.turns_ok == 60
    assert engine.calls + result.summary.resumed == 60


# --------------------------------------------------------------------------- loss bound


async def test_an_answered_turn_is_committed_at_once_while_the_run_goes_on(tmp_path):
    """Committed while the run still goes, by the loop's next turn after the answer: no
    timer, no batch to fill (the loop's turns themselves: test_storage)."""
    path = tmp_path / "ckpt.sqlite"
    gate, answered = asyncio.Event(), asyncio.Event()

    async def handler(request: ChatRequest) -> str:
        if last_user(request).startswith("slow"):
            await gate.wait()
        return "answer"

    def on_event(event):
        if isinstance(event, TurnFinished) and event.record.conversation_id == "fast":
            answered.set()

    data = [{"id": "fast", "turns": ["fast 0"]}, {"id": "slow", "turns": ["slow 0"]}]
    task = asyncio.ensure_future(
        nbllm.arun(
            data,
            engine=FakeEngine(handler),
            model="m",
            checkpoint=path,
            listeners=[on_event],
            **QUIET,
        )
    )
    try:
        await asyncio.wait_for(answered.wait(), 5)
        await asyncio.sleep(0)
        # A kill -9 now would lose nothing answered.
        assert stored_turns(path) == [(0, 0, "answer")]
        assert not task.done()
    finally:
        gate.set()
        result = await asyncio.wait_for(task, 10)
    assert result.summary.turns_ok == 2


def test_every_answered_turn_is_in_the_file_when_the_run_returns(tmp_path):
    path = tmp_path / "ckpt.sqlite"
    data = dataset(5)

    def handler(request: ChatRequest) -> str:
        if last_user(request) == "c2 question 1":
            raise RequestRejected("HTTP 400: no")
        return f"A: {last_user(request)}"

    result = nbllm.run(data, engine=FakeEngine(handler), model="m", checkpoint=path, **QUIET)
    ok = result.df[result.df["error"].isna()]
    rows = stored_turns(path)  # read at once: close() committed what was pending
    conversation_index = {r["id"]: i for i, r in enumerate(data)}
    expected = [
        (conversation_index[c], t, a)
        for c, t, a in zip(ok["conversation_id"], ok["turn"], ok["answer"], strict=True)
    ]
    assert rows == expected
    assert len(rows) == n_turns(data) - 2


# --------------------------------------------------------------------------- no secrets


SENTINEL = "sk-sentinel-5f2c9a7e31"


def _files_containing(folder: Path, needle: bytes) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and needle in p.read_bytes()]


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"model": "nbllm-test"}, id="openai"),
        pytest.param({"model": "openai/nbllm-test", "engine": "litellm"}, id="litellm"),
    ],
)
def test_no_secret_is_written_to_disk_or_to_the_logs(_nbllm_dir, caplog, capsys, options):
    for name in ("nbllm", "litellm", "LiteLLM"):
        caplog.set_level(logging.DEBUG, logger=name)
    data = dataset(6)
    mid_run: list[tuple[list[str], list[str]]] = []  # (file names, files with the secret)

    def look_mid_run(event):
        # While the run goes, with the -wal and -shm files still there.
        if isinstance(event, TurnFinished) and len(mid_run) < 4:
            names = sorted(p.name for p in _nbllm_dir.rglob("*") if p.is_file())
            mid_run.append((names, _files_containing(_nbllm_dir, SENTINEL.encode())))

    with TestServer(api_key=SENTINEL) as server:
        results = [
            nbllm.run(
                data,
                api_base=server.url,
                api_key=SENTINEL,
                checkpoint=True,
                cache=True,
                progress=False,
                listeners=[look_mid_run],
                **options,
            )
            for _ in range(2)
        ]
    assert results[0].summary.turns_ok == n_turns(data), results[0].df["error"].tolist()
    assert results[1].df["resumed"].all()
    assert any(name.endswith("-wal") for names, _ in mid_run for name in names), mid_run
    assert [leaks for _, leaks in mid_run if leaks] == []
    assert _files_containing(_nbllm_dir, SENTINEL.encode()) == []
    captured = capsys.readouterr()
    assert SENTINEL not in captured.out and SENTINEL not in captured.err
    assert SENTINEL not in caplog.text
    assert all(SENTINEL not in str(r.__dict__) for r in caplog.records)


def test_a_password_in_api_base_is_not_written_to_disk(_nbllm_dir, caplog):
    caplog.set_level(logging.DEBUG, logger="nbllm")
    data = dataset(4)
    with TestServer() as server:
        api_base = f"http://user:{SENTINEL}@127.0.0.1:{server.port}/v1"
        result = nbllm.run(
            data, model="nbllm-test", api_base=api_base, retries=0, progress=False, cache=True
        )
    assert result.summary.turns_ok == n_turns(data)  # the lean engine can use such a URL
    assert list(_nbllm_dir.rglob("checkpoint.sqlite")), "the run kept no checkpoint"
    assert _files_containing(_nbllm_dir, SENTINEL.encode()) == []
    assert SENTINEL not in caplog.text


def test_a_key_from_the_environment_is_not_written_to_disk(_nbllm_dir, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="nbllm")
    monkeypatch.setenv("NBLLM_API_KEY", SENTINEL)
    data = dataset(4)
    with TestServer(api_key=SENTINEL) as server:
        result = nbllm.run(data, model="nbllm-test", api_base=server.url, progress=False)
    assert result.summary.turns_ok == n_turns(data)  # the key was used
    assert _files_containing(_nbllm_dir, SENTINEL.encode()) == []
    assert SENTINEL not in caplog.text


def test_a_credential_passed_as_an_engine_parameter_is_not_written_to_disk(_nbllm_dir):
    """Extra keywords go to the engine; with litellm ``extra_headers`` is how a gateway's
    key is sent (and ``aws_secret_access_key`` how Bedrock's is). They reach the run's
    fingerprint, which is fine as a hash, but must not be stored in plain text."""
    data = dataset(4)
    first = nbllm.run(
        data,
        engine=FakeEngine(),
        model="m",
        extra_headers={"X-Gateway-Key": SENTINEL},
        aws_secret_access_key=SENTINEL,
        progress=False,
    )
    assert first.summary.turns_ok == n_turns(data)
    assert list(_nbllm_dir.rglob("checkpoint.sqlite"))
    assert _files_containing(_nbllm_dir, SENTINEL.encode()) == []


def test_a_password_in_api_base_is_not_in_a_failed_rows_error(_nbllm_dir, caplog):
    """Result rows are what users save (``nbllm run --out results.csv``): an error must
    name the server without its password, as ``public_url`` is there to do."""
    caplog.set_level(logging.DEBUG, logger="nbllm")
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    api_base = f"http://user:{SENTINEL}@127.0.0.1:{port}/v1"
    result = nbllm.run(dataset(2), model="nbllm-test", api_base=api_base, retries=0, **QUIET)
    errors = result.df["error"].dropna().tolist()
    assert [e for e in errors if e.startswith("ConnectionFailed")], errors
    assert [e for e in errors if SENTINEL in e] == []
    assert SENTINEL not in caplog.text


def test_a_file_left_by_a_crash_before_the_schema_was_written_is_made_anew(tmp_path):
    """Creating the file and committing its schema are two steps; a kill between them
    leaves an SQLite file with no table, which must not block the next run forever."""
    path = tmp_path / "run.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode = WAL")  # writes the header, as a new checkpoint does
    conn.close()
    assert path.stat().st_size > 0
    engine = nbllm.FakeEngine()
    result = nbllm.run(
        [{"id": "a", "turns": ["q"]}], engine=engine, model="m", checkpoint=path, progress=False
    )
    assert result.summary.turns_ok == 1
    assert engine.calls == 1


# --------------------------------------------------------------------------- schema 1

# The turns table of checkpoint schema 1 (nbllm before finish_reason), as it was written.
V1_TURNS = """
CREATE TABLE turns (
    conversation INTEGER NOT NULL,
    turn INTEGER NOT NULL,
    conversation_id TEXT NOT NULL,
    answer TEXT NOT NULL,
    model TEXT,
    engine TEXT,
    latency_s REAL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    cost_usd REAL,
    attempts INTEGER NOT NULL,
    started_at REAL,
    finished_at REAL,
    cached INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (conversation, turn)
) WITHOUT ROWID;
"""
V1_COLUMNS = (
    "conversation, turn, conversation_id, answer, model, engine, latency_s, prompt_tokens, "
    "completion_tokens, cost_usd, attempts, started_at, finished_at, cached"
)


def as_schema_1(path: Path, keep: int) -> None:
    """Rewrite the checkpoint at ``path`` as the previous nbllm wrote it (schema 1, WAL),
    holding the same run and its first ``keep`` turns."""
    rewrite_as_schema_1(
        path,
        table="turns",
        create=V1_TURNS,
        columns=V1_COLUMNS,
        rows_query="ORDER BY conversation, turn",
        keep=keep,
    )


def test_a_schema_1_checkpoint_is_migrated_and_resumed_with_no_finish_reason(tmp_path):
    """The previous nbllm's file: its turns are resumed (finish_reason None: it was never
    stored), the rest are sent and stored with theirs, and the file is schema 2 after."""
    path = tmp_path / "ckpt.sqlite"
    data = dataset(6)
    total = n_turns(data)
    nbllm.run(data, engine=FakeEngine(), model="m", checkpoint=path, **QUIET)
    as_schema_1(path, keep=5)
    assert schema_of(path, "turns") == ("1", V1_COLUMNS.split(", "))

    engine = FakeEngine()
    result = nbllm.run(data, engine=engine, model="m", checkpoint=path, **QUIET)
    assert engine.calls == total - 5
    assert result.summary.resumed == 5
    df = result.df
    assert df.loc[df["resumed"], "finish_reason"].isna().all()
    assert (df.loc[~df["resumed"], "finish_reason"] == "stop").all()
    added = ["finish_reason", "queue_s", "service_s", "deployment", "votes", "cached_tokens"]
    added.append("saved_usd")
    assert schema_of(path, "turns") == ("6", [*V1_COLUMNS.split(", "), *added])
    assert df.loc[df["resumed"], "queue_s"].isna().all()

    again = nbllm.run(data, engine=FakeEngine(), model="m", checkpoint=path, **QUIET)
    assert again.summary.resumed == total
    assert again.df["finish_reason"].tolist() == df["finish_reason"].tolist()


# --------------------------------------------------------------------------- schema 4

# The turns table of checkpoint schema 4 (nbllm before cached_tokens), as it was written.
V4_TURNS = V1_TURNS.replace(
    "    PRIMARY KEY",
    "    finish_reason TEXT,\n    queue_s REAL,\n    service_s REAL,\n    deployment TEXT,\n"
    "    votes INTEGER,\n    PRIMARY KEY",
)
V4_COLUMNS = f"{V1_COLUMNS}, finish_reason, queue_s, service_s, deployment, votes"


def test_a_schema_4_checkpoint_is_migrated_and_resumed_with_no_cached_tokens(tmp_path):
    path = tmp_path / "ckpt.sqlite"
    data = dataset(6)
    total = n_turns(data)
    engine = FakeEngine(with_cached_tokens)
    nbllm.run(data, engine=engine, model="m", checkpoint=path, **QUIET)
    rewrite_as_schema_1(
        path, table="turns", create=V4_TURNS, columns=V4_COLUMNS,
        rows_query="ORDER BY conversation, turn", keep=5, version=4,
    )  # fmt: skip
    assert schema_of(path, "turns") == ("4", V4_COLUMNS.split(", "))

    engine = FakeEngine(with_cached_tokens)
    result = nbllm.run(data, engine=engine, model="m", checkpoint=path, **QUIET)
    assert engine.calls == total - 5
    df = result.df
    assert df.loc[df["resumed"], "cached_tokens"].isna().all()  # never stored: unknown
    sent = df[~df["resumed"]]
    assert list(sent["cached_tokens"]) == [2 * t for t in sent["turn"]]
    assert schema_of(path, "turns") == (
        "6",
        [*V4_COLUMNS.split(", "), "cached_tokens", "saved_usd"],
    )

    engine = FakeEngine(with_cached_tokens)
    again = nbllm.run(data, engine=engine, model="m", checkpoint=path, **QUIET)
    assert again.summary.resumed == total and engine.calls == 0
    assert again.df["cached_tokens"].equals(df["cached_tokens"])


def test_a_checkpoint_of_a_schema_nbllm_cannot_migrate_is_refused_as_it_is(tmp_path):
    path = tmp_path / "ckpt.sqlite"
    data = dataset(2)
    nbllm.run(data, engine=FakeEngine(), model="m", checkpoint=path, **QUIET)
    as_schema_1(path, keep=1)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = '0' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    before = digest(path)
    engine = FakeEngine()
    with pytest.raises(CheckpointError, match="older nbllm") as info:
        nbllm.run(data, engine=engine, model="m", checkpoint=path, **QUIET)
    assert str(path) in str(info.value)
    assert "pass another path" in str(info.value)
    assert engine.calls == 0
    assert digest(path) == before


def test_a_failed_migration_changes_nothing(tmp_path):
    """A schema 1 file whose table cannot take the new column (here: it has one already):
    refused, and still schema 1, because the migration is one transaction."""
    path = tmp_path / "ckpt.sqlite"
    data = dataset(2)
    nbllm.run(data, engine=FakeEngine(), model="m", checkpoint=path, **QUIET)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    engine = FakeEngine()
    with pytest.raises(CheckpointError, match="finish_reason"):
        nbllm.run(data, engine=engine, model="m", checkpoint=path, **QUIET)
    assert engine.calls == 0
    assert schema_of(path, "turns")[0] == "1"
