"""SQLite files nbllm writes: where they live, opening them safely, locking them, and
committing rows as soon as they come (group commit).

Unless given another path, they live under ``nbllm_dir()``: ``$NBLLM_DIR``, or ``.nbllm``
in the working folder.

Both the checkpoint and the response cache are SQLite databases in WAL mode
(standard library only, no pickle). Opening checks that the file really is an nbllm
database of a schema this version understands; anything else is a ``CheckpointError``
naming the file and what to do. A file of an older schema is brought up to date in
place, in one transaction, by the migrations its kind gives (adding columns only, so
nothing stored is rewritten); a newer one is refused. nbllm never deletes a file itself.

A run's checkpoint is written by group commit (``GroupWriter``; the response cache uses
it with a delay, in batches): a row added from the event loop is committed in the
loop's next turn, in one transaction with every row added meanwhile, so at low rates
each row is committed within a fraction of a millisecond and at high rates the groups
grow by themselves, with no timer. A group is also committed the
moment it holds ``MAX_PENDING`` rows, so at most that many added rows are ever
uncommitted. The commit runs on the loop, not in a writer thread: a thread must win
the GIL back from a busy loop (up to 5 ms each time), so its rows would wait longest
exactly when they come fastest, and no bound on the rows a crash loses would hold.

``synchronous=NORMAL`` in WAL mode: a commit writes to the log without waiting for the
disk (tens of microseconds), and a committed row survives the death of the process
(kill -9, a crash of the kernel). After a power loss or an operating-system crash, the
transactions committed since SQLite last copied its log into the file (at most about
4 MB of log) may be missing, never half-written. That copy (SQLite's automatic
checkpoint, every ~1000 pages of log) is the only disk sync the loop waits for.

A run holds an exclusive lock on a file beside its database (``lock_path``) for as long
as it runs, so a second process never writes the same file. The operating system drops
the lock when the process dies, even on ``kill -9``. The lock file is opened without
following a symlink: a lock file that is a symlink is refused, and its target untouched.

The files hold prompts and answers, so they are private whatever the umask: a folder
nbllm creates is 0700, a database it creates is 0600 (SQLite gives its -wal and -shm
files the same mode), and so is a lock file. A folder or file that already exists is
left as it is: a folder the user made, shared on purpose, stays shared.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

from nbllm.engines.files import private_dir
from nbllm.errors import CheckpointError

__all__ = ["GroupWriter", "database_path", "nbllm_dir", "open_database", "private_dir"]

log = logging.getLogger("nbllm")

MAX_PENDING = 5
"""A group is committed at once when it holds this many rows: at most this many rows
added are ever uncommitted, whatever the rate."""
STATEMENT_ROWS = 64  # rows per INSERT statement (SQLite allows 32766 values in one)
RETRY_S = 1.0
"""After a failed write (a full disk), the next try comes this much later."""
SYNCHRONOUS = "NORMAL"
FILE_MODE = 0o600
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # absent on Windows, where symlinks need privileges


def _create_private(path: Path) -> bool:
    """Create ``path`` empty with mode 0600 unless it exists; True if it was created here."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, FILE_MODE)
    except FileExistsError:
        return False
    os.close(fd)
    os.chmod(path, FILE_MODE)
    return True


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
    migrations: Mapping[int, str] | None = None,
) -> sqlite3.Connection:
    """Open (or create) an nbllm SQLite file of ``kind`` with ``schema`` at ``version``.

    ``verify`` runs SQLite's quick integrity check on an existing file (time grows with
    its size: right for a run's checkpoint, too slow for a large shared cache).
    ``migrations[v]`` is the SQL that takes a file of schema ``v`` to ``v + 1``; a file of
    an older schema is migrated in place (not when ``readonly``: the caller reads it as it
    is), or refused when no migration leads from its schema.
    """
    advice = "Move it aside or pass another path"
    if path.exists() and path.is_dir():
        raise _unusable(path, "is a folder, not an nbllm database file", advice)
    existed = path.exists() and path.stat().st_size > 0
    created = False
    if not readonly:
        try:
            private_dir(path.parent)
            # Created before SQLite does, so it is never readable by others, not even for
            # a moment; SQLite gives the -wal and -shm files the mode of this file.
            created = _create_private(path)
        except OSError as exc:
            raise _unusable(path, f"cannot be created ({exc.strerror})", advice) from exc
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
        found = version
        if existed and (tables or readonly):
            found = _check_ours(conn, path, tables, kind=kind, version=version, advice=advice)
            if not readonly and any(v not in (migrations or {}) for v in range(found, version)):
                raise _unusable(
                    path,
                    f"was written by an older nbllm ({kind} schema {found}), which this "
                    f"version cannot bring up to schema {version}",
                    advice,
                )
        if not readonly:
            _to_wal(conn)
            conn.execute(f"PRAGMA synchronous = {SYNCHRONOUS}")
            if created:
                _private_companions(path)
            if found < version:
                _migrate(conn, version=version, migrations=migrations or {})
            if "meta" not in tables:
                # OR IGNORE: another run may have made the same new file meanwhile (a
                # shared cache opened by two runs at once).
                conn.executescript(
                    "BEGIN IMMEDIATE;"
                    + schema
                    + "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
                    + f"INSERT OR IGNORE INTO meta VALUES ('kind', '{kind}'), "
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


def _private_companions(path: Path) -> None:
    """Make the -wal and -shm files of a database created here 0600, should this SQLite
    not copy the database's mode to them."""
    for suffix in ("-wal", "-shm"):
        with suppress(FileNotFoundError):
            os.chmod(path.with_name(path.name + suffix), FILE_MODE)


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """A connection that writes nothing, not even SQLite's -wal / -shm files.

    Without a -wal file every committed row is in the main file, which is then opened as
    immutable; with one (a run in progress, or one that was killed), the -shm file is
    there too and a plain read-only connection reads the log as well.
    """
    wal = path.with_name(path.name + "-wal")
    mode = "mode=ro" if wal.exists() else "immutable=1"
    return sqlite3.connect(f"{path.resolve().as_uri()}?{mode}", uri=True, isolation_level=None)


def _to_wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL. The switch takes the file for itself and SQLite does not wait for
    it (no busy handler): a second run opening the same new file at that moment is told
    "database is locked", so it tries again for up to a few seconds."""
    for _ in range(250):
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc):
                raise
            time.sleep(0.02)
    conn.execute("PRAGMA journal_mode = WAL")


def _check_ours(
    conn: sqlite3.Connection, path: Path, tables: set[str], *, kind: str, version: int, advice: str
) -> int:
    """The file's schema version, once it is known to be an nbllm ``kind`` this version
    can read."""
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
    return found


def _migrate(conn: sqlite3.Connection, *, version: int, migrations: Mapping[int, str]) -> None:
    """Bring a file of an older schema up to ``version`` in one transaction.

    The version is read again inside the transaction: another process may have migrated
    the file (a shared cache) since it was checked.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        query = "SELECT value FROM meta WHERE key = 'schema_version'"
        found = int(conn.execute(query).fetchone()[0])
        while found < version:
            for statement in migrations[found].split(";"):
                if statement.strip():
                    conn.execute(statement)
            found += 1
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(found),))
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


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
        private_dir(self.path.parent)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, FILE_MODE)
        except OSError as exc:
            # ELOOP: the lock file is a symlink, which could make the run overwrite its target.
            msg = (
                f"{self.path}: cannot open the lock file for {what} ({exc.strerror}); a lock "
                "file that is a symlink is refused. Remove it or pass another checkpoint= path"
            )
            raise CheckpointError(msg) from None
        handle = os.fdopen(fd, "r+", encoding="utf-8")  # held open for the run
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
        fd = os.open(lock, os.O_RDONLY | _NOFOLLOW)
    except FileNotFoundError:
        yield True
        return
    except OSError as exc:
        msg = f"{lock}: cannot open the lock file ({exc.strerror}); a symlink is refused"
        raise CheckpointError(msg) from None
    handle: IO[str] = os.fdopen(fd, encoding="utf-8")
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


# -- group commit --------------------------------------------------------------------


class GroupWriter:
    """Commits rows added from the event loop by group commit.

    ``add`` appends a row and asks the loop to commit in its next turn; every row added
    until then joins the same transaction, so a commit costs the loop once per turn of
    the loop, not once per row. A group holding ``max_pending`` rows is committed at once,
    within ``add``. Without a running loop (plain code, tests) ``add`` commits at once.
    ``delay_s`` > 0 trades promptness for fewer commits: the group is committed that long
    after its first row (batches, for a file a crash may lose the last rows of).
    Subclasses say where rows go: ``insert`` (``INSERT ... INTO table (columns)``) and
    ``width`` (values per row). A group is one multi-row INSERT, which SQLite commits as
    one transaction: per turn of the loop, one statement.

    A failed write (a full disk) is logged once and the rows stay pending; the next try
    comes ``RETRY_S`` later, or at ``flush``/``close``. Nothing is lost that can still be
    written later, and a full disk does not slow the run down with a try per row.
    ``commits`` counts the transactions committed.
    """

    insert: str
    width: int

    def __init__(
        self, conn: sqlite3.Connection, *, max_pending: int = MAX_PENDING, delay_s: float = 0.0
    ) -> None:
        self._conn = conn
        self._pending: list[tuple[Any, ...]] = []
        self._scheduled: asyncio.Handle | None = None
        self._retry_at = 0.0  # time.monotonic() before which a failed write is not tried again
        self.max_pending = max_pending
        self.delay_s = delay_s
        self._statements: dict[int, str] = {}
        self.commits = 0
        self._warned = False

    @property
    def pending(self) -> int:
        """Rows added and not committed yet."""
        return len(self._pending)

    def add(self, row: tuple[Any, ...]) -> None:
        self._pending.append(row)
        if (
            len(self._pending) >= self.max_pending
            and time.monotonic() >= self._retry_at
            and self.flush()
        ):
            return
        if self._scheduled is None:
            self._schedule()

    def _schedule(self) -> None:
        wait = max(self.delay_s, self._retry_at - time.monotonic())
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            if time.monotonic() >= self._retry_at:
                self.flush()
            return
        if wait <= 0:
            self._scheduled = loop.call_soon(self._on_loop)
        else:
            self._scheduled = loop.call_later(wait, self._on_loop)

    def _on_loop(self) -> None:
        self._scheduled = None
        if not self.flush():
            # Tried again later: a run that adds nothing more would otherwise keep the rows
            # pending until close.
            self._schedule()

    def flush(self) -> bool:
        """Commit every pending row now, in one transaction; False if the write failed
        (the rows stay pending)."""
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        if not self._pending:
            return True
        rows, self._pending = self._pending, []
        try:
            if len(rows) <= STATEMENT_ROWS:
                # One statement is one transaction: no BEGIN and COMMIT to pay for.
                self._conn.execute(self._statement(len(rows)), [v for row in rows for v in row])
            else:  # a backlog (after a full disk)
                self._conn.execute("BEGIN IMMEDIATE")
                for start in range(0, len(rows), STATEMENT_ROWS):
                    chunk = rows[start : start + STATEMENT_ROWS]
                    self._conn.execute(
                        self._statement(len(chunk)), [v for row in chunk for v in row]
                    )
                self._conn.execute("COMMIT")
        except BaseException as exc:
            self._pending = rows + self._pending
            if self._conn.in_transaction:  # a failed COMMIT can leave it open
                with suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
            if not isinstance(exc, sqlite3.Error):
                raise
            self._retry_at = time.monotonic() + RETRY_S
            if not self._warned:
                self._warned = True
                log.error("nbllm: could not write to %s: %s; will retry", self.describe(), exc)
            return False
        self._retry_at = 0.0
        self.commits += 1
        return True

    def _statement(self, n: int) -> str:
        """``insert`` with room for ``n`` rows (kept: SQLite's statement cache finds it)."""
        sql = self._statements.get(n)
        if sql is None:
            row = "(" + ", ".join("?" * self.width) + ")"
            sql = self._statements[n] = f"{self.insert} VALUES " + ", ".join([row] * n)
        return sql

    def describe(self) -> str:
        return "the database"

    def close(self) -> None:
        """Commit what is pending and close the file. Idempotent."""
        if self._conn is None:
            return
        if not self.flush():
            log.error(
                "nbllm: %d rows could not be written to %s", len(self._pending), self.describe()
            )
        self._conn.close()
        self._conn = None  # type: ignore[assignment]
