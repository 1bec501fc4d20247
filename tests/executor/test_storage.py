"""The SQLite files nbllm writes (checkpoint and response cache): what is refused, and
when rows are committed.

Promises pinned here: a file nbllm cannot use (damaged, another program's, a newer
schema, the other kind of nbllm file) is refused with a ``CheckpointError`` naming the
file and what to do, before any request, leaving its bytes as they were; a batch of rows
is committed as soon as it holds 200 rows, without waiting the 0.25 s of the timer.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from helpers import CACHE, CHECKPOINT, UNUSABLE, database_options, digest

import nbllm
from nbllm import FakeEngine, TurnRecord
from nbllm.errors import CheckpointError
from nbllm.executor.checkpoint import CheckpointStore, RunIdentity
from nbllm.executor.storage import MAX_ROWS

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


# --------------------------------------------------------------------------- batches


def committed_rows(path: Path) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT COUNT(*) FROM turns").fetchone()[0]
    finally:
        conn.close()


async def test_a_batch_is_committed_the_moment_it_holds_200_rows(tmp_path):
    """No await comes between the rows: the 0.25 s timer cannot have run, so only the row
    count can have committed them."""
    assert MAX_ROWS == 200  # the README's figure
    path = tmp_path / "ckpt.sqlite"
    n = MAX_ROWS + 1
    identity = RunIdentity(dataset="d", model="m", engine="fake")
    store = CheckpointStore.open(path, identity, conversations=n, turns=n)
    try:
        for i in range(n):
            record = TurnRecord(conversation_id=f"c{i}", turn=0, question="q", answer=f"a{i}")
            store.record(i, record)
            if i == MAX_ROWS - 2:
                assert committed_rows(path) == 0  # 199 rows, younger than 0.25 s: pending
            if i == MAX_ROWS - 1:
                assert committed_rows(path) == MAX_ROWS
        assert committed_rows(path) == MAX_ROWS  # the 201st starts the next batch
    finally:
        store.close()
    assert committed_rows(path) == n
