"""A run's batches in its checkpoint: the ``BatchJournal`` a ``BatchEngine`` writes.

Two tables of the checkpoint file (schema 6): ``batches``, one row per batch the provider
created (its id, its input file, its status, whether its answers were read), and
``batch_lines``, one row per request in it (its ``custom_id``, the fingerprint of what
it sends, the conversation and turn that asked it, and once read its answer). Every
write is its own transaction, committed before the method returns; the turns' group
commit is flushed first, so the file never holds a batch's answer without the turns
that led to it. ``open_batches`` is what a re-run follows again; ``answer`` what it
takes without asking again.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping

from nbllm.engines.batch.lines import BatchLine, BatchRecord

__all__ = ["BATCH_SCHEMA", "CheckpointJournal", "batches_in_flight"]

BATCH_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    api TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL,
    input_file_id TEXT,
    status TEXT NOT NULL,
    lines INTEGER NOT NULL,
    collected INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS batch_lines (
    batch_id TEXT NOT NULL,
    custom_id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    conversation TEXT,
    turn INTEGER,
    answer TEXT,
    PRIMARY KEY (batch_id, custom_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS batch_lines_by_fingerprint ON batch_lines (fingerprint);
"""


class CheckpointJournal:
    """The ``BatchJournal`` on a checkpoint's connection; ``flush`` commits its pending turns."""

    def __init__(self, conn: sqlite3.Connection, flush: Callable[[], bool]) -> None:
        self._conn = conn
        self._flush = flush

    def _write(self, statements: list[tuple[str, list[tuple[object, ...]]]]) -> None:
        self._flush()
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            for sql, rows in statements:
                self._conn.executemany(sql, rows)
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise

    def open_batches(self) -> list[BatchRecord]:
        out = []
        query = (
            "SELECT id, api, created_at, expires_at, input_file_id, status FROM batches "
            "WHERE collected = 0 ORDER BY created_at"
        )
        for row in self._conn.execute(query).fetchall():
            batch_id, api, created, expires, file_id, status = row
            lines = tuple(
                BatchLine(*row)
                for row in self._conn.execute(
                    "SELECT custom_id, fingerprint, conversation, turn FROM batch_lines "
                    "WHERE batch_id = ? ORDER BY custom_id",
                    (batch_id,),
                )
            )
            out.append(BatchRecord(batch_id, api, created, expires, file_id, lines, status))
        return out

    def created(self, record: BatchRecord) -> None:
        batch_row = (
            record.id, record.api, record.created_at, record.expires_at,
            record.input_file_id, record.status, len(record.lines),
        )  # fmt: skip
        self._write(
            [
                (
                    "INSERT OR REPLACE INTO batches VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
                    [batch_row],
                ),
                (
                    "INSERT OR REPLACE INTO batch_lines VALUES (?, ?, ?, ?, ?, NULL)",
                    [
                        (record.id, x.custom_id, x.fingerprint, x.conversation, x.turn)
                        for x in record.lines
                    ],
                ),
            ]
        )

    def updated(self, batch_id: str, status: str) -> None:
        self._write([("UPDATE batches SET status = ? WHERE id = ?", [(status, batch_id)])])

    def collected(self, batch_id: str, status: str, answers: Mapping[str, str]) -> None:
        self._write(
            [
                (
                    "UPDATE batches SET status = ?, collected = 1 WHERE id = ?",
                    [(status, batch_id)],
                ),
                (
                    "UPDATE batch_lines SET answer = ? WHERE batch_id = ? AND fingerprint = ?",
                    [(text, batch_id, fp) for fp, text in answers.items()],
                ),
            ]
        )

    def answer(self, fingerprint: str) -> str | None:
        row = self._conn.execute(
            "SELECT answer FROM batch_lines WHERE fingerprint = ? AND answer IS NOT NULL LIMIT 1",
            (fingerprint,),
        ).fetchone()
        return None if row is None else str(row[0])


def batches_in_flight(conn: sqlite3.Connection) -> int:
    """Batches of a checkpoint created and not yet read (0 for a file of an older schema)."""
    try:
        return int(conn.execute("SELECT COUNT(*) FROM batches WHERE collected = 0").fetchone()[0])
    except sqlite3.OperationalError:  # no such table
        return 0
