"""The SQLite files nbllm writes (checkpoint and response cache): what is refused, and
when rows are committed.

Promises pinned here: a file nbllm cannot use (damaged, another program's, a newer
schema, the other kind of nbllm file) is refused with a ``CheckpointError`` naming the
file and what to do, before any request, leaving its bytes as they were; rows are
committed by group commit: a recorded turn is on disk in the event loop's next turn (no
timer), the rows of one turn of the loop share one transaction, and never more than
``MAX_PENDING`` recorded rows are uncommitted; a write that fails (a full disk) is logged
once and its rows are written by a later try.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path

import pytest
from helpers import CACHE, CHECKPOINT, UNUSABLE, database_options, digest, on_fake_clock

import nbllm
from nbllm import FakeEngine, TurnRecord
from nbllm.errors import CheckpointError
from nbllm.executor.checkpoint import CheckpointStore, RunIdentity
from nbllm.executor.storage import MAX_PENDING, RETRY_S

DATA = [
    {"id": f"c{i}", "turns": [f"c{i} question {k}" for k in range(1 + i % 3)]} for i in range(6)
]

# Where the unusable file is: a checkpoint path, the default cache, a cache path.
TARGETS = {
    "checkpoint": (CHECKPOINT, lambda tmp, nbllm_dir: tmp / "ckpt.sqlite", None),
    "default-cache": (CACHE, lambda tmp, nbllm_dir: nbllm_dir / "cache.sqlite", True),
    "cache-path": (CACHE, lambda tmp, nbllm_dir: tmp / "mine.sqlite", None),
}


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("damage", list(UNUSABLE))
def test_an_unusable_file_is_refused_before_any_request_and_left_as_it_is(
    tmp_path, _nbllm_dir, damage, target
):
    kind, where, option = TARGETS[target]
    path = where(tmp_path, _nbllm_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    make, reason = UNUSABLE[damage]
    make(path, kind)
    before = digest(path)
    engine = FakeEngine()
    with pytest.raises(CheckpointError) as info:
        nbllm.run(
            DATA, engine=engine, model="m", progress=False,
            **database_options(kind, path if option is None else option),
        )  # fmt: skip
    message = str(info.value)
    assert str(path) in message
    assert reason(kind) in message
    assert "pass another path" in message  # what to do
    assert engine.calls == 0
    assert path.is_file()
    assert digest(path) == before


# --------------------------------------------------------------------------- group commit


def committed_rows(path: Path) -> int:
    """Rows a second connection sees: what a kill -9 now would leave."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT COUNT(*) FROM turns").fetchone()[0]
    finally:
        conn.close()


def open_store(path: Path) -> CheckpointStore:
    identity = RunIdentity(dataset="d", model="m", engine="fake")
    return CheckpointStore.open(path, identity, conversations=1000, turns=1000)


def answered(i: int, answer: str | None = None) -> TurnRecord:
    return TurnRecord(conversation_id=f"c{i}", turn=0, question="q", answer=answer or f"a{i}")


async def test_a_turn_is_committed_in_the_loops_next_turn_with_no_timer(tmp_path):
    """One turn of the loop, no time passing: a design that waits for a timer or for a
    batch to fill would still hold the row."""
    path = tmp_path / "ckpt.sqlite"
    store = open_store(path)
    try:
        store.record(0, answered(0))
        await asyncio.sleep(0)
        assert committed_rows(path) == 1
        store.record(1, answered(1))  # later, alone: its own transaction
        await asyncio.sleep(0)
        assert committed_rows(path) == 2
        assert store.commits == 2
        assert not asyncio.get_running_loop()._scheduled  # type: ignore[attr-defined]
    finally:
        store.close()


async def test_turns_recorded_together_share_a_transaction_and_few_are_ever_pending(tmp_path):
    """53 turns answered in one turn of the loop (a busy run): groups of MAX_PENDING, and
    at every moment at most MAX_PENDING - 1 recorded turns are not yet on disk."""
    assert MAX_PENDING == 5  # the README's figure
    path = tmp_path / "ckpt.sqlite"
    n = 53
    store = open_store(path)
    try:
        for i in range(n):
            store.record(i, answered(i))
            assert i + 1 - committed_rows(path) == store.pending < MAX_PENDING
        assert store.commits == n // MAX_PENDING
        await asyncio.sleep(0)  # the rest, in the loop's next turn
        assert committed_rows(path) == n
        assert store.commits == n // MAX_PENDING + 1 < n
    finally:
        store.close()


def test_without_a_running_loop_each_turn_is_committed_at_once(tmp_path):
    path = tmp_path / "ckpt.sqlite"
    store = open_store(path)
    try:
        store.record(0, answered(0))
        assert committed_rows(path) == 1
    finally:
        store.close()


@on_fake_clock
async def test_a_full_disk_is_logged_once_and_the_turns_are_written_by_a_later_try(
    tmp_path, caplog
):
    """SQLite's own "database or disk is full" (the file may not grow): every turn stays
    pending, one error is logged, tries come RETRY_S apart (not one per turn); once the
    disk has room, the next try writes them all."""
    path = tmp_path / "ckpt.sqlite"
    store = open_store(path)
    loop = asyncio.get_running_loop()
    big = "x" * 20_000  # overflow pages: the file must grow to hold it
    conn = store._conn
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    try:
        conn.execute(f"PRAGMA max_page_count = {pages}")
        with caplog.at_level(logging.ERROR, logger="nbllm"):
            store.record(0, answered(0, big))
            await asyncio.sleep(0)
            assert store.pending == 1 and store.commits == 0
            t0 = loop.time()
            for i in range(1, 3 * MAX_PENDING):  # past MAX_PENDING: still no try per turn
                store.record(i, answered(i, big))
            await asyncio.sleep(RETRY_S / 2)
            assert store.commits == 0 and store.pending == 3 * MAX_PENDING
            await asyncio.sleep(RETRY_S / 2 + 0.01)  # the second try: still full
            assert store.pending == 3 * MAX_PENDING
            errors = [r for r in caplog.records if "could not write" in r.getMessage()]
            assert len(errors) == 1
            assert "disk is full" in errors[0].getMessage()
            assert str(path) in errors[0].getMessage()
            conn.execute("PRAGMA max_page_count = 1000000")  # room again
            await asyncio.sleep(RETRY_S)
            assert loop.time() - t0 < 2 * RETRY_S + 0.1
        assert store.pending == 0
        assert committed_rows(path) == 3 * MAX_PENDING
    finally:
        store.close()


def test_turns_that_cannot_be_written_by_close_are_counted_in_the_log(tmp_path, caplog):
    """Still full at the end: close says how many turns are lost and still lets go of the
    file (the next run can open it)."""
    path = tmp_path / "ckpt.sqlite"
    store = open_store(path)
    pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
    store._conn.execute(f"PRAGMA max_page_count = {pages}")
    with caplog.at_level(logging.ERROR, logger="nbllm"):
        for i in range(3):
            store.record(i, answered(i, "x" * 20_000))
        store.close()
    assert "3 rows could not be written to the checkpoint" in caplog.text
    assert committed_rows(path) == 0
    open_store(path).close()  # the lock is free again
