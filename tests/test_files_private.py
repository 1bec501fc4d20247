"""The files nbllm writes hold prompts and answers: they are private whatever the umask,
and nbllm writes or deletes nothing through a symlink planted among them."""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import answer_from_history

import nbllm
from nbllm.errors import CheckpointError
from nbllm.executor.storage import FileLock, lock_path

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes and symlinks")

DATA = [{"id": "a", "turns": ["Revenue in 2019?", "And in 2020?"]}]


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def run(**kwargs):
    engine = nbllm.FakeEngine(answer_from_history)
    return nbllm.run(DATA, engine=engine, model="m", progress=False, **kwargs)


def test_a_run_makes_its_folders_0700_and_its_files_0600(umask_022, _nbllm_dir):
    assert run().df["error"].isna().all()
    made = [_nbllm_dir, *sorted(_nbllm_dir.rglob("*"))]
    folders = [p for p in made if p.is_dir()]
    files = [p for p in made if p.is_file()]
    names = {p.name for p in files}
    assert {"cache.sqlite", "checkpoint.sqlite", "checkpoint.sqlite.lock"} <= names
    assert len(folders) >= 3  # .nbllm, runs, the run's folder
    assert {str(p): oct(mode(p)) for p in folders} == {str(p): "0o700" for p in folders}
    assert {str(p): oct(mode(p)) for p in files} == {str(p): "0o600" for p in files}


def test_wal_and_shm_files_are_0600_while_a_run_holds_them_open(umask_022, tmp_path):
    from nbllm.executor.cache import CACHE_FILE
    from nbllm.executor.storage import open_database

    path = tmp_path / "deep" / "er" / CACHE_FILE
    conn = open_database(path, kind="cache", schema="CREATE TABLE t (x);", version=1)
    try:
        conn.execute("INSERT INTO t VALUES (1)")
        wal = path.with_name(path.name + "-wal")
        shm = path.with_name(path.name + "-shm")
        assert wal.exists() and shm.exists()
        assert [oct(mode(p)) for p in (path, wal, shm)] == ["0o600"] * 3
        assert [oct(mode(p)) for p in (tmp_path / "deep", path.parent)] == ["0o700"] * 2
    finally:
        conn.close()


def test_a_folder_the_user_made_keeps_its_mode(umask_022, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    run(checkpoint=shared, cache=False)
    assert mode(shared) == 0o755
    assert mode(shared / "checkpoint.sqlite") == 0o600


def test_a_symlinked_lock_file_is_refused_and_its_target_untouched(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me", encoding="utf-8")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    lock_path(folder / "checkpoint.sqlite").symlink_to(target)

    with pytest.raises(CheckpointError, match="symlink"):
        run(checkpoint=folder, cache=False)
    assert target.read_text(encoding="utf-8") == "keep me"


def test_a_symlinked_lock_to_a_missing_file_creates_nothing(tmp_path):
    target = tmp_path / "would-be-created"
    lock = tmp_path / "x.lock"
    lock.symlink_to(target)
    with pytest.raises(CheckpointError, match="symlink"):
        FileLock(lock).acquire(tmp_path / "x")
    assert not target.exists()


def test_remove_refuses_a_symlinked_run_folder_and_leaves_its_target(_nbllm_dir, tmp_path):
    run(cache=False)
    (real,) = (_nbllm_dir / "runs").iterdir()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("mine", encoding="utf-8")
    link = _nbllm_dir / "runs" / "ffffffffffffffff"
    link.symlink_to(victim, target_is_directory=True)

    with pytest.raises(CheckpointError, match="symlink"):
        nbllm.runs.remove("ffff")
    assert (victim / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert link.is_symlink()
    assert nbllm.runs.remove(real.name) == real  # a real run folder still goes
    assert not real.exists()


def test_list_runs_reports_a_symlinked_lock_instead_of_failing(_nbllm_dir, tmp_path):
    run(cache=False)
    (folder,) = (_nbllm_dir / "runs").iterdir()
    lock = lock_path(folder / "checkpoint.sqlite")
    lock.unlink()
    lock.symlink_to(tmp_path / "elsewhere")
    listing = nbllm.runs.list_runs()
    assert len(listing) == 1
    assert "symlink" in listing.loc[0, "error"]
