"""The run's checkpoint: every finished turn on disk, so a re-run pays again only for what
was in flight.

One SQLite file per run (``.nbllm/runs/<id>/checkpoint.sqlite`` by default, where
``<id>`` starts the run's fingerprint). The fingerprint is a hash of what decides the
answers: the dataset's conversations, the model, the engine, the sampling parameters
and the default system prompt; never a key or a credential. The engine is the one the
call asked for: a named engine's ``identity()`` (its kind and what decides its answers:
a server's address, a local model's weights), and ``"auto"`` for ``engine="auto"`` on
a local model, so that a different pick by ``auto`` (llama.cpp installed since) resumes
the same run instead of starting a new one (for a server or a provider, ``auto``'s pick
follows from the options, and its identity is kept). Each row keeps the engine and
model that really answered it, so resumed rows name them whatever runs now. A re-run of
the same call finds the same file, reads the finished turns back (``resumed=True``) and
sends requests only for the rest. A file made for another call is refused, naming what
differs. A lock held for the whole run keeps a second process off the same file.

Only answered turns are stored, with why each answer ended (``finish_reason``, schema 2)
and where its time went and which deployment answered (``queue_s``, ``service_s``,
``deployment``, schema 3) and, for ``ensemble="vote"``, how many models gave the answer
(``votes``, schema 4) and how many prompt tokens the engine took from its cache
(``cached_tokens``, schema 5), and what a batch API's answer saved against the live price
(``saved_usd``) and the run's batches (``nbllm.executor.batch_journal``, schema 6); a file
of an older schema
is migrated in place and its rows read back with None for what it lacks. A turn that
failed is tried again on a re-run. Turns are committed by group commit
(``storage.GroupWriter``): a kill -9 loses at most ``storage.MAX_PENDING`` (5) answered
turns, which the next run asks again; no turn is ever half-recorded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nbllm.errors import CheckpointError, ConfigError
from nbllm.executor.batch_journal import BATCH_SCHEMA, CheckpointJournal
from nbllm.executor.storage import (
    FileLock,
    GroupWriter,
    database_path,
    lock_path,
    nbllm_dir,
    open_database,
)
from nbllm.redact import hidden
from nbllm.types import Conversation, TurnRecord

__all__ = [
    "CHECKPOINT_FILE",
    "CheckpointStore",
    "RunIdentity",
    "dataset_hash",
    "resolve_checkpoint_path",
]

log = logging.getLogger("nbllm")

SCHEMA_VERSION = 6
CHECKPOINT_FILE = "checkpoint.sqlite"
_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS turns (
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
    finish_reason TEXT,
    queue_s REAL,
    service_s REAL,
    deployment TEXT,
    votes INTEGER,
    cached_tokens INTEGER,
    saved_usd REAL,
    PRIMARY KEY (conversation, turn)
) WITHOUT ROWID;
"""
    + BATCH_SCHEMA
)
# What each older schema lacks, added in place; its rows read back with None there.
_MIGRATIONS = {
    1: "ALTER TABLE turns ADD COLUMN finish_reason TEXT",
    2: "ALTER TABLE turns ADD COLUMN queue_s REAL; ALTER TABLE turns ADD COLUMN service_s REAL; "
    "ALTER TABLE turns ADD COLUMN deployment TEXT",
    3: "ALTER TABLE turns ADD COLUMN votes INTEGER",
    4: "ALTER TABLE turns ADD COLUMN cached_tokens INTEGER",
    5: "ALTER TABLE turns ADD COLUMN saved_usd REAL;" + BATCH_SCHEMA,
}
_COLUMNS = (
    "conversation, turn, conversation_id, answer, model, engine, latency_s, prompt_tokens, "
    "completion_tokens, cost_usd, attempts, started_at, finished_at, cached, finish_reason, "
    "queue_s, service_s, deployment, votes, cached_tokens, saved_usd"
)


def _canonical(value: Any) -> str:
    return json.dumps(
        value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=repr
    )


def dataset_hash(conversations: Sequence[Conversation]) -> str:
    """A hash of what is sent for each conversation (not references or meta, never sent)."""
    digest = hashlib.sha256()
    for conv in conversations:
        sent = [conv.id, conv.questions, conv.system, conv.context, *conv.sent_extras()]
        digest.update(_canonical(sent).encode())
        digest.update(b"\n")
    return digest.hexdigest()


@dataclass(frozen=True)
class RunIdentity:
    """What decides a run's answers. Equal identities may share a checkpoint.

    ``engine`` is what the call asked for: the engine's ``identity()``, or ``"auto"``
    when ``auto`` picks among local engines.
    """

    dataset: str
    model: str
    engine: str
    params: Mapping[str, Any] = field(default_factory=dict)
    system: str | None = None

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(_canonical(asdict(self)).encode()).hexdigest()

    def public(self) -> dict[str, Any]:
        """The identity as stored in the checkpoint and shown in messages: no secrets."""
        return {**asdict(self), "params": hidden(self.params)}

    def differences(self, stored: Mapping[str, Any]) -> list[str]:
        """What differs from a stored (public) identity, in words."""
        mine = json.loads(_canonical(self.public()))
        names = {
            "dataset": "the dataset's conversations",
            "params": "the sampling parameters",
            "system": "the system prompt",
            "model": "the model",
            "engine": "the engine",
        }
        out = []
        for key, label in names.items():
            if stored.get(key) != mine.get(key):
                if key == "dataset":
                    out.append(f"{label} changed")
                else:
                    out.append(f"{label}: stored {stored.get(key)!r}, now {mine.get(key)!r}")
        return out


def resolve_checkpoint_path(checkpoint: Any, fingerprint: str) -> Path | None:
    """The checkpoint file for ``checkpoint=``: False/None off, True the default place,
    a path ending in .sqlite/.db a file, any other path a folder to hold one."""
    if checkpoint is False or checkpoint is None:
        return None
    if checkpoint is True:
        return nbllm_dir() / "runs" / fingerprint[:16] / CHECKPOINT_FILE
    if isinstance(checkpoint, (str, os.PathLike)):
        return database_path(checkpoint, CHECKPOINT_FILE)
    msg = f"checkpoint= expected True, False or a path, got {checkpoint!r}"
    raise ConfigError(msg)


class CheckpointStore(GroupWriter):
    """The finished turns of one run, in one SQLite file, written by group commit.

    Use ``CheckpointStore.open(...)``; ``close()`` commits what is pending and drops the lock.
    """

    insert = f"INSERT OR REPLACE INTO turns ({_COLUMNS})"
    width = len(_COLUMNS.split(","))

    def __init__(self, conn: Any, path: Path, lock: FileLock, **writer: Any) -> None:
        super().__init__(conn, **writer)
        self.path = path
        self._lock = lock
        self.discarded = 0

    @classmethod
    def open(
        cls,
        path: Path,
        identity: RunIdentity,
        *,
        conversations: int,
        turns: int,
        resume: bool = True,
        **writer: Any,
    ) -> CheckpointStore:
        lock = FileLock(lock_path(path))
        lock.acquire(path)
        conn = None
        try:
            conn = open_database(
                path,
                kind="checkpoint",
                schema=_SCHEMA,
                version=SCHEMA_VERSION,
                migrations=_MIGRATIONS,
            )
            store = cls(conn, path, lock, **writer)
            store._prepare(identity, conversations=conversations, turns=turns, resume=resume)
        except BaseException:
            if conn is not None:
                conn.close()
            lock.release()
            raise
        return store

    def _meta(self) -> dict[str, str]:
        return dict(self._conn.execute("SELECT key, value FROM meta").fetchall())

    def _prepare(
        self, identity: RunIdentity, *, conversations: int, turns: int, resume: bool
    ) -> None:
        meta = self._meta()
        stored = meta.get("fingerprint")
        done = self._conn.execute("SELECT COUNT(*) FROM turns").fetchone()[0]
        if stored is not None and stored != identity.fingerprint and resume:
            stored_identity = json.loads(meta.get("identity", "{}"))
            differs = "; ".join(identity.differences(stored_identity)) or "its fingerprint"
            msg = (
                f"{self.path} holds another run ({done} finished turns): {differs}. "
                "Pass resume=False (--fresh) to start over in that file, or another "
                "checkpoint= path (checkpoint=True picks one per call)"
            )
            raise CheckpointError(msg)
        now = str(time.time())
        values = {
            "fingerprint": identity.fingerprint,
            "identity": _canonical(identity.public()),
            "model": identity.model,
            "engine": identity.engine,
            "conversations": str(conversations),
            "turns": str(turns),
            "updated_at": now,
        }
        if "created_at" not in meta or not resume:
            values["created_at"] = now
        self._conn.execute("BEGIN IMMEDIATE")
        if not resume and done:
            self._conn.execute("DELETE FROM turns")
            self._conn.execute("DELETE FROM batch_lines")
            self._conn.execute("DELETE FROM batches")
            self.discarded = done
        self._conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", values.items())
        self._conn.execute("COMMIT")
        if self.discarded:
            log.warning(
                "nbllm: starting over (resume=False): %d finished turns in %s discarded",
                self.discarded,
                self.path,
            )

    def done(self, conversations: Sequence[Conversation]) -> dict[tuple[int, int], TurnRecord]:
        """The finished turns, as result rows marked ``resumed``, by (conversation, turn)."""
        out: dict[tuple[int, int], TurnRecord] = {}
        query = f"SELECT {_COLUMNS} FROM turns ORDER BY conversation, turn"
        for row in self._conn.execute(query):
            index, turn = row[0], row[1]
            if index >= len(conversations) or turn >= len(conversations[index]):
                continue
            conv = conversations[index]
            if turn > 0 and (index, turn - 1) not in out:
                continue  # never reached without its earlier turns; kept out of the history
            out[(index, turn)] = TurnRecord(
                conversation_id=conv.id,
                turn=turn,
                question=conv.questions[turn],
                answer=row[3],
                reference=conv.references[turn],
                model=row[4],
                engine=row[5],
                latency_s=row[6],
                prompt_tokens=row[7],
                completion_tokens=row[8],
                cost_usd=row[9],
                attempts=row[10],
                started_at=row[11],
                finished_at=row[12],
                cached=bool(row[13]),
                resumed=True,
                finish_reason=row[14],
                queue_s=row[15],
                service_s=row[16],
                deployment=row[17],
                votes=row[18],
                cached_tokens=row[19],
                saved_usd=row[20],
            )
        return out

    def record(self, conversation: int, record: TurnRecord) -> None:
        """Queue an answered turn; it counts as done once its group is committed (in the
        loop's next turn, or at once when ``max_pending`` turns wait)."""
        self.add(
            (
                conversation,
                record.turn,
                _canonical(_plain_id(record.conversation_id)),
                record.answer,
                record.model,
                record.engine,
                record.latency_s,
                record.prompt_tokens,
                record.completion_tokens,
                record.cost_usd,
                record.attempts,
                record.started_at,
                record.finished_at,
                int(record.cached),
                record.finish_reason,
                record.queue_s,
                record.service_s,
                record.deployment,
                record.votes,
                record.cached_tokens,
                record.saved_usd,
            )
        )

    def keep_call(self, text: str | None) -> None:
        """Keep the run's call (``nbllm.run_call``) for ``nbllm.runs.resume``."""
        if text is not None:
            self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('call', ?)", (text,))

    def journal(self) -> CheckpointJournal:
        """This run's batches (``batch_api=True``), in this file."""
        return CheckpointJournal(self._conn, self.flush)

    def describe(self) -> str:
        return f"the checkpoint {self.path}"

    def close(self) -> None:
        try:
            # After a failed write (a full disk) only the last try below, which says what
            # could not be written.
            if self._conn is not None and self.flush():
                self._conn.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('updated_at', ?)", (str(time.time()),)
                )
            super().close()
        finally:
            self._lock.release()


def _plain_id(value: Hashable) -> Any:
    return value if isinstance(value, (str, int, float, bool)) or value is None else repr(value)
