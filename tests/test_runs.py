"""``nbllm.runs``: the stored runs under ``$NBLLM_DIR/runs``, listed and removed."""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
from helpers import answer_from_history

import nbllm
from nbllm.errors import CheckpointError
from nbllm.runs import COLUMNS

TWO_TURNS = [{"id": "a", "turns": ["Revenue in 2019?", "And in 2020?"]}]
THREE_TURNS = [
    {"id": "x", "turns": ["Net income?"]},
    {"id": "y", "turns": ["Stores?", "Employees?"]},
]


def run(data, model="m"):
    engine = nbllm.FakeEngine(answer_from_history)
    return nbllm.run(data, engine=engine, model=model, progress=False, cache=False)


def snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``folder``: size, mtime and a hash of its bytes."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            stat = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out[str(path.relative_to(folder))] = (stat.st_size, stat.st_mtime_ns, digest)
    return out


@contextmanager
def live_run(data) -> Iterator[threading.Thread]:
    """A run in a thread, holding its checkpoint's lock until the block ends."""
    started = threading.Event()
    release = threading.Event()
    errors: list[BaseException] = []

    async def slow(request):
        started.set()
        while not release.is_set():
            await asyncio.sleep(0.01)
        return "late answer"

    def target():
        try:
            nbllm.run(data, engine=nbllm.FakeEngine(slow), model="m", progress=False, cache=False)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="nbllm-test-live-run")
    thread.start()
    try:
        assert started.wait(10), "the run never sent its first request"
        yield thread
    finally:
        release.set()
        thread.join(10)
    assert not thread.is_alive()
    assert not errors, errors


def test_no_runs_is_an_empty_frame(tmp_path):
    for df in (nbllm.runs.list_runs(), nbllm.runs.list_runs(tmp_path / "elsewhere")):
        assert df.empty
        assert list(df.columns) == list(COLUMNS)


def test_list_after_two_runs_newest_first(_nbllm_dir):
    run(TWO_TURNS, model="first")
    run(THREE_TURNS, model="second")

    df = nbllm.runs.list_runs()

    assert list(df.columns) == list(COLUMNS)
    assert df["model"].tolist() == ["second", "first"]
    assert df["done"].tolist() == [3, 2]
    assert df["total"].tolist() == [3, 2]
    assert df["conversations"].tolist() == [2, 1]
    assert df["batches_in_flight"].tolist() == [0, 0]  # no batch_api=True
    assert df["engine"].str.startswith("fake ").all()
    assert not df["in_use"].any()
    assert df["error"].isna().all()
    assert df["created"].iloc[0] > df["created"].iloc[1]
    assert str(df["created"].dt.tz) == "UTC"
    assert (df["updated"] >= df["created"]).all()
    now = pd.Timestamp.now(tz="UTC")
    assert ((now - df["created"]) < pd.Timedelta(minutes=5)).all()
    for row in df.itertuples():
        folder = _nbllm_dir / "runs" / row.id
        assert Path(row.path) == folder
        assert len(row.id) == 16
        assert row.size_bytes == sum(p.stat().st_size for p in folder.iterdir())
        assert row.size_bytes > 0
    # The same list from an explicit root.
    again = nbllm.runs.list_runs(root=_nbllm_dir)
    assert again["id"].tolist() == df["id"].tolist()


def test_unfinished_turns_count_as_not_done(_nbllm_dir):
    def fail_second(request):
        if "2020" in request.messages[-1]["content"]:
            raise nbllm.RequestRejected("no")
        return "ok"

    nbllm.run(TWO_TURNS, engine=nbllm.FakeEngine(fail_second), model="m", progress=False)

    (row,) = nbllm.runs.list_runs().itertuples()
    assert (row.done, row.total) == (1, 2)


def test_in_use_while_a_run_holds_the_lock(_nbllm_dir):
    with live_run(THREE_TURNS):
        (row,) = nbllm.runs.list_runs().itertuples()
        assert row.in_use
        assert row.error is None
        assert row.model == "m"
        assert (row.done, row.total) == (0, 3)
        with pytest.raises(CheckpointError, match="in use"):
            nbllm.runs.remove(row.id)
        assert Path(row.path).is_dir()
        # Looking did not take the lock away from the run.
        assert nbllm.runs.list_runs()["in_use"].tolist() == [True]

    (row,) = nbllm.runs.list_runs().itertuples()
    assert not row.in_use
    assert (row.done, row.total) == (3, 3)


def test_unreadable_runs_get_a_row_with_the_reason(_nbllm_dir):
    run(TWO_TURNS)
    runs = _nbllm_dir / "runs"
    garbage = runs / "0000garbage"
    garbage.mkdir()
    (garbage / "checkpoint.sqlite").write_bytes(b"not a database, just bytes " * 200)
    (runs / "0000empty").mkdir()
    truncated = runs / "0000truncated"
    good = next(p for p in runs.iterdir() if len(p.name) == 16)
    truncated.mkdir()
    data = (good / "checkpoint.sqlite").read_bytes()
    (truncated / "checkpoint.sqlite").write_bytes(data[:100] + b"\0" * (len(data) - 100))
    before = snapshot(runs)

    df = nbllm.runs.list_runs()

    assert snapshot(runs) == before
    assert len(df) == 4
    assert df["id"].iloc[0] == good.name  # readable runs first
    bad = df.set_index("id").loc[["0000empty", "0000garbage", "0000truncated"]]
    assert bad["error"].notna().all()
    assert bad["model"].isna().all()
    assert bad["done"].isna().all()
    assert bad["created"].isna().all()
    assert "not a readable nbllm checkpoint" in bad.loc["0000garbage", "error"]
    assert "no checkpoint.sqlite" in bad.loc["0000empty", "error"]
    assert bad.loc["0000garbage", "size_bytes"] == 27 * 200


def test_another_kind_of_nbllm_file_is_named(_nbllm_dir):
    nbllm.run(TWO_TURNS, engine=nbllm.FakeEngine(), model="m", progress=False)  # fills the cache
    folder = _nbllm_dir / "runs" / "cachecopy"
    folder.mkdir()
    shutil.copy(_nbllm_dir / "cache.sqlite", folder / "checkpoint.sqlite")

    df = nbllm.runs.list_runs().set_index("id")

    assert "response cache, not a checkpoint" in df.loc["cachecopy", "error"]


def test_list_and_remove_touch_no_other_run(_nbllm_dir):
    run(TWO_TURNS, model="first")
    run(THREE_TURNS, model="second")
    runs = _nbllm_dir / "runs"
    before = snapshot(runs)

    df = nbllm.runs.list_runs()
    nbllm.runs.list_runs()
    assert snapshot(runs) == before

    keep, gone = df["id"].tolist()
    removed = nbllm.runs.remove(gone)

    assert removed == runs / gone
    assert not removed.exists()
    assert snapshot(runs) == {k: v for k, v in before.items() if k.startswith(keep)}
    assert nbllm.runs.list_runs()["id"].tolist() == [keep]


def test_remove_by_prefix(_nbllm_dir):
    run(TWO_TURNS)
    (run_id,) = nbllm.runs.list_runs()["id"]
    runs = _nbllm_dir / "runs"

    removed = nbllm.runs.remove(run_id[:6])

    assert removed == runs / run_id
    assert not removed.exists()
    assert nbllm.runs.list_runs().empty
    # Nothing was kept: the same call runs again from scratch.
    assert run(TWO_TURNS).summary.resumed == 0


def test_remove_exact_id_even_when_it_starts_another(_nbllm_dir):
    runs = _nbllm_dir / "runs"
    for name in ("abc", "abcdef"):
        (runs / name).mkdir(parents=True)

    assert nbllm.runs.remove("abc", root=_nbllm_dir) == runs / "abc"
    assert [p.name for p in runs.iterdir()] == ["abcdef"]


def test_remove_refuses_unknown_and_ambiguous_ids(_nbllm_dir):
    runs = _nbllm_dir / "runs"
    with pytest.raises(CheckpointError, match=r"no stored run 'abc'.*none"):
        nbllm.runs.remove("abc")

    for name in ("abc123", "abd456"):
        (runs / name).mkdir(parents=True)
        (runs / name / "checkpoint.sqlite").write_bytes(b"x")
    before = snapshot(runs)

    with pytest.raises(CheckpointError, match="'ab' matches 2 runs: abc123, abd456"):
        nbllm.runs.remove("ab")
    with pytest.raises(CheckpointError, match=r"no stored run 'zz'.*abc123, abd456"):
        nbllm.runs.remove("zz")
    for bad in ("", ".", "..", "../runs", "abc123/checkpoint.sqlite"):
        with pytest.raises(CheckpointError, match="not a run id"):
            nbllm.runs.remove(bad)
    assert snapshot(runs) == before
    assert _nbllm_dir.is_dir()

    assert nbllm.runs.remove("abd") == runs / "abd456"
    assert sorted(p.name for p in runs.iterdir()) == ["abc123"]


def test_runs_is_part_of_the_package():
    assert importlib.import_module("nbllm.runs") is nbllm.runs
    assert callable(nbllm.runs.list_runs)
    assert callable(nbllm.runs.remove)
    assert callable(nbllm.runs.resume)
    assert nbllm.runs.__all__ == ["list_runs", "remove", "resume"]  # none hides a builtin


def test_list_is_the_first_name_of_list_runs(_nbllm_dir):
    run(TWO_TURNS)
    assert nbllm.runs.list is nbllm.runs.list_runs
    pd.testing.assert_frame_equal(nbllm.runs.list(), nbllm.runs.list_runs())


CRASHING_RUN = """
import asyncio, os, nbllm

async def answer(request):
    if "Employees" in request.messages[-1]["content"]:
        await asyncio.sleep(1.0)  # the earlier answers' batch is committed meanwhile
        os._exit(9)  # as if killed: no cleanup, the -wal and -shm files stay
    return "ok"

nbllm.run(
    [{"id": "x", "turns": ["Net income?"]}, {"id": "y", "turns": ["Stores?", "Employees?"]}],
    engine=nbllm.FakeEngine(answer), model="m", progress=False, cache=False, concurrency=2,
)
"""


def test_a_killed_run_is_listed_with_what_it_committed(_nbllm_dir):
    env = {**os.environ, "NBLLM_DIR": str(_nbllm_dir)}
    proc = subprocess.run([sys.executable, "-c", CRASHING_RUN], env=env, timeout=60, check=False)
    assert proc.returncode == 9
    runs = _nbllm_dir / "runs"
    before = snapshot(runs)
    assert any(name.endswith("-wal") for name in before)

    (row,) = nbllm.runs.list_runs().itertuples()

    assert row.error is None
    assert not row.in_use
    assert (row.done, row.total) == (2, 3)
    # The database and its log are untouched; SQLite's -shm file is only a shared-memory
    # index of the log, which every reader of a WAL database may rebuild.
    after = snapshot(runs)
    assert after.keys() == before.keys()
    assert {k: v for k, v in after.items() if not k.endswith("-shm")} == {
        k: v for k, v in before.items() if not k.endswith("-shm")
    }
