"""SQLite files nbllm writes: where they live, opening them safely, locking them, and
writing rows in batches.

Unless given another path, they live under ``nbllm_dir()``: ``$NBLLM_DIR``, or ``.nbllm``
in the working folder.

Both the checkpoint and the response cache are SQLite databases in WAL mode
(standard library only, no pickle). Opening checks that the file really is an nbllm
database of a schema this version understands; anything else is a ``CheckpointError``
naming the file and what to do. nbllm never deletes or rewrites such a file itself.

Rows are written in batches: a batch is committed when it holds ``max_rows`` rows or
its oldest row is ``max_delay_s`` old, whichever comes first. A crash therefore loses
at most the rows of the batch not yet committed (by default 0.25 s or 200 rows of
work); every committed row is whole, because each batch is one transaction.

A run holds an exclusive lock on a file beside its database (``lock_path``) for as long
as it runs, so a second process never writes the same file. The operating system drops
the lock when the process dies, even on ``kill -9``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from nbllm.errors import CheckpointError

__all__ = ["BatchWriter", "database_path", "nbllm_dir", "open_database"]

log = logging.getLogger("nbllm")

MAX_ROWS = 200
MAX_DELAY_S = 0.25


def nbllm_dir() -> Path:
    """Where nbllm keeps runs and the response cache: ``$NBLLM_DIR`` or ``./.nbllm``."""
    return Path(os.environ.get("NBLLM_DIR") or ".nbllm")


def database_path(path: str | os.PathLike[str], file_name: str) -> Path:
    """The database file for a path the user gave: a ``.sqlite``/``.sqlite3``/``.db`` path
    that is not a folder is the file itself; any other path is a folder holding
    ``file_name``."""
    given = Path(path).expanduser()
    if given.suffix in (".sqlite", ".sqlite3", ".db") and not given.is_dir():
        return given
    return given / file_name


def _unusable(path: Path, what: str, advice: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}. {advice} (nbllm leaves the file as it is.)")


def open_database(
    path: Path,
    *,
    kind: str,
    schema: str,
    version: int,
    readonly: bool = False,
    verify: bool = True,
) -> sqlite3.Connection:
    """Open (or create) an nbllm SQLite file of ``kind`` with ``schema`` at ``version``.

    ``verify`` runs SQLite's quick integrity check on an existing file (time grows with
    its size: right for a run's checkpoint, too slow for a large shared cache).
    """
    advice = "Move it aside or pass another path"
    if path.exists() and path.is_dir():
        raise _unusable(path, "is a folder, not an nbllm database file", advice)
    existed = path.exists() and path.stat().st_size > 0
    if not readonly:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if readonly:
            conn = _connect_readonly(path)
        else:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise _unusable(path, f"cannot be opened (SQLite says: {exc})", advice) from exc
    try:
        # Only reads until the file is known to be ours: a foreign file stays byte-identical.
        conn.execute("PRAGMA busy_timeout = 5000")
        if existed and verify:
            check = conn.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                msg = f"integrity check failed: {check}"
                raise sqlite3.DatabaseError(msg)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        # A file with no table at all holds nothing to lose: it is what a crash between
        # creating the file and committing the schema leaves behind, so it is made anew.
        if existed and (tables or readonly):
            _check_ours(conn, path, tables, kind=kind, version=version, advice=advice)
        if not readonly:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            if "meta" not in tables:
                conn.executescript(
                    "BEGIN;"
                    + schema
                    + "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
                    + f"INSERT INTO meta VALUES ('kind', '{kind}'), "
                    + f"('schema_version', '{version}');"
                    + "COMMIT;"
                )
    except CheckpointError:
        conn.close()
        raise
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise _unusable(
            path, f"is not a readable nbllm {kind} (SQLite says: {exc})", advice
        ) from exc
    return conn


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """A connection that writes nothing, not even SQLite's -wal / -shm files.

    Without a -wal file every committed row is in the main file, which is then opened as
    immutable; with one (a run in progress, or one that was killed), the -shm file is
    there too and a plain read-only connection reads the log as well.
    """
    wal = path.with_name(path.name + "-wal")
    mode = "mode=ro" if wal.exists() else "immutable=1"
    return sqlite3.connect(f"{path.resolve().as_uri()}?{mode}", uri=True, isolation_level=None)


def _check_ours(
    conn: sqlite3.Connection, path: Path, tables: set[str], *, kind: str, version: int, advice: str
) -> None:
    if "meta" not in tables:
        raise _unusable(path, f"is an SQLite database but not an nbllm {kind}", advice)
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        found = int(meta["schema_version"])
    except (sqlite3.Error, KeyError, ValueError, TypeError):
        raise _unusable(path, f"is an SQLite database but not an nbllm {kind}", advice) from None
    if meta.get("kind") != kind:
        raise _unusable(path, f"holds an nbllm {meta.get('kind')}, not a {kind}", advice)
    if found > version:
        raise _unusable(
            path,
            f"was written by a newer nbllm ({kind} schema {found}; this version reads "
            f"up to {version})",
            "Upgrade nbllm, or pass another path",
        )


# -- locks -----------------------------------------------------------------------


def lock_path(database: Path) -> Path:
    """The lock file a run holds while it writes ``database``."""
    return database.with_name(database.name + ".lock")


if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _lock_file(handle: IO[str]) -> None:
        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)

    def _unlock_file(handle: IO[str]) -> None:
        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _lock_file(handle: IO[str]) -> None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock_file(handle: IO[str]) -> None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def lock_holder(lock: Path) -> str:
    """Who holds ``lock``, as its holder wrote it (``pid 1234``)."""
    try:
        return lock.read_text(encoding="utf-8").strip() or "another process"
    except OSError:
        return "another process"


class FileLock:
    """An exclusive lock on ``path`` that the OS drops when the process dies (even kill -9)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None

    def acquire(self, what: Path) -> None:
        """Take the lock for a run on ``what``, or raise ``CheckpointError`` naming its holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held open for the run
        try:
            _lock_file(handle)
        except OSError:
            handle.close()
            msg = (
                f"{what} is in use by another run ({lock_holder(self.path)}). Wait for it to "
                "finish, stop it, or pass another checkpoint= path"
            )
            raise CheckpointError(msg) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            _unlock_file(self._file)
            self._file.close()
            self._file = None


@contextmanager
def lock_if_free(lock: Path) -> Iterator[bool]:
    """Hold ``lock`` for the ``with`` block if it is free: yields False when a live run
    holds it. A missing lock file is free, and none is created (a listing writes nothing)."""
    try:
        handle: IO[str] = open(lock, encoding="utf-8")  # noqa: SIM115
    except FileNotFoundError:
        yield True
        return
    with handle:
        try:
            _lock_file(handle)
            locked = True
        except OSError:
            locked = False
        try:
            yield locked
        finally:
            if locked:
                _unlock_file(handle)


# -- batches -----------------------------------------------------------------------


class BatchWriter:
    """Collects rows and commits them in batches from the event loop.

    Subclasses say how rows are written (``_write``). ``add`` never blocks for long: it
    commits only when a batch is full; otherwise a timer commits the batch soon after.
    A failed write is logged once and the rows stay pending for the next try, so a full
    disk slows nothing down and loses no row that can still be written later.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        max_rows: int = MAX_ROWS,
        max_delay_s: float = MAX_DELAY_S,
    ) -> None:
        self._conn = conn
        self._pending: list[tuple[Any, ...]] = []
        self._timer: asyncio.TimerHandle | None = None
        self.max_rows = max_rows
        self.max_delay_s = max_delay_s
        self._warned = False

    def add(self, row: tuple[Any, ...]) -> None:
        self._pending.append(row)
        if len(self._pending) >= self.max_rows:
            self.flush()
        elif self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.max_delay_s, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        """Commit every pending row now, in one transaction."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        rows, self._pending = self._pending, []
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._write(self._conn, rows)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._pending = rows + self._pending
            if not self._warned:
                self._warned = True
                log.error("nbllm: could not write to %s: %s; will retry", self.describe(), exc)

    def _write(self, conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        return "the database"

    def close(self) -> None:
        """Commit what is pending and close the file. Idempotent."""
        if self._conn is None:
            return
        self.flush()
        self._conn.close()
        self._conn = None  # type: ignore[assignment]
