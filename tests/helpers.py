"""What several test files share: a fake model that reads the whole history, files nbllm
must refuse, a run through an ``Executor`` built by the test, and a fake clock.

Import it as ``from helpers import ...`` (pytest puts this folder on ``sys.path``).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import random
import re
import sqlite3
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import nbllm
from nbllm import ChatRequest, Executor, FakeEngine, RunResult
from nbllm.engines import create_engine

# --------------------------------------------------------------------------- a fake model


def answer_from_history(request: ChatRequest) -> str:
    """The question and a digest of every message sent with it.

    A turn sent with any other history (an earlier answer missing, empty or changed) gets
    another answer, so comparing answers checks the history too.
    """
    pairs = [[m.get("role"), m.get("content")] for m in request.messages]
    digest = hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode()).hexdigest()[:8]
    return f"A: {request.messages[-1]['content']} [{digest}]"


def uninterrupted_answers(
    data: Any, handler: Callable[[ChatRequest], str] = answer_from_history
) -> list[str]:
    """The answers, in row order, of one uninterrupted run of ``data`` against ``handler``."""
    out: list[str] = []
    for conv in nbllm.load_conversations(data):
        answers: list[str] = []
        for k in range(len(conv)):
            answers.append(handler(ChatRequest("m", conv.messages_for(k, answers), {})))
        out.extend(answers)
    return out


# --------------------------------------------------------------------------- files to refuse

CHECKPOINT = "checkpoint"
CACHE = "response cache"
_TABLE = {CHECKPOINT: "turns", CACHE: "responses"}


def database_options(kind: str, path: Path | bool) -> dict[str, Any]:
    """``nbllm.run`` options that use ``path`` as the database of ``kind`` and no other."""
    if kind == CHECKPOINT:
        return {"checkpoint": path, "cache": False}
    return {"checkpoint": False, "cache": path}


def real_database(path: Path, kind: str) -> None:
    """A real nbllm file of ``kind`` that spans many pages."""
    data = [{"id": i, "turns": [f"{i} " + "x" * 300, "y" * 300]} for i in range(60)]
    nbllm.run(data, engine=FakeEngine(), model="m", progress=False, **database_options(kind, path))


def truncated(path: Path, kind: str) -> None:
    real_database(path, kind)
    raw = path.read_bytes()
    assert len(raw) >= 8 * 4096, "the file should span many pages"
    path.write_bytes(raw[: len(raw) // 2])


def header_only(path: Path, kind: str) -> None:
    real_database(path, kind)
    path.write_bytes(path.read_bytes()[:100])


def random_bytes(path: Path, kind: str = CHECKPOINT) -> None:
    path.write_bytes(random.Random(7).randbytes(20_000))


def text_file(path: Path, kind: str) -> None:
    path.write_text("conversation_id,turn,answer\n" * 200)


def foreign_sqlite(path: Path, kind: str, *, wal: bool = False) -> None:
    """Another program's SQLite file, with a table of the very name nbllm uses."""
    conn = sqlite3.connect(path)
    try:
        if wal:
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"CREATE TABLE {_TABLE[kind]} (id INTEGER PRIMARY KEY, answer TEXT)")
        conn.executemany(f"INSERT INTO {_TABLE[kind]} (answer) VALUES (?)", [("a",), ("b",)])
        conn.commit()
    finally:
        conn.close()


def future_schema(path: Path, kind: str) -> None:
    real_database(path, kind)
    conn = sqlite3.connect(path)
    try:
        conn.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
        conn.commit()
    finally:
        conn.close()


def other_kind(path: Path, kind: str) -> None:
    """An nbllm file of the other kind: a response cache where a checkpoint is wanted."""
    other = CACHE if kind == CHECKPOINT else CHECKPOINT
    source = path.with_name("other-kind.sqlite")
    nbllm.run(
        [{"id": "a", "turns": ["q"]}], engine=FakeEngine(), model="m", progress=False,
        **database_options(other, source),
    )  # fmt: skip
    path.write_bytes(source.read_bytes())


# name: (maker, what the refusal says, given the kind of file wanted)
UNUSABLE: dict[str, tuple[Callable[[Path, str], None], Callable[[str], str]]] = {
    "truncated-to-half": (truncated, lambda kind: f"not a readable nbllm {kind}"),
    "header-only": (header_only, lambda kind: f"not a readable nbllm {kind}"),
    "random-bytes": (random_bytes, lambda kind: f"not a readable nbllm {kind}"),
    "text": (text_file, lambda kind: f"not a readable nbllm {kind}"),
    "foreign-sqlite": (foreign_sqlite, lambda kind: f"not an nbllm {kind}"),
    "foreign-sqlite-wal": (
        lambda path, kind: foreign_sqlite(path, kind, wal=True),
        lambda kind: f"not an nbllm {kind}",
    ),
    "future-schema": (future_schema, lambda kind: "newer nbllm"),
    "other-kind": (
        other_kind,
        lambda kind: f"holds an nbllm {CACHE if kind == CHECKPOINT else CHECKPOINT}",
    ),
}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- an Executor run


def run_executor(
    data: Any, *, model: str, api_base: str | None = None, engine: str = "auto", **options: Any
) -> RunResult:
    """``nbllm.run`` with no checkpoint and no cache, through an ``Executor`` built here,
    so that a test can pass what ``nbllm.run`` does not take (``rate_window_s``)."""

    async def main() -> RunResult:
        connections = max(options.get("concurrency", 32), 8)  # as nbllm.run opens them
        chosen = create_engine(engine, model=model, api_base=api_base, max_connections=connections)
        try:
            executor = Executor(chosen, model=model, **options)
            return await executor.run(nbllm.load_conversations(data))
        finally:
            await chosen.aclose()

    return asyncio.run(main())


# --------------------------------------------------------------------------- a fake clock


class FakeClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock stands still while callbacks run and jumps to the next
    timer when nothing else is ready: a wait takes no real time, and every time is exact.

    For code that waits only on the loop's own timers (limits, retries, fake engines);
    real I/O, threads and other processes still need the real clock.
    """

    def __init__(self) -> None:
        super().__init__()
        self._now = 0.0

    def time(self) -> float:
        return self._now

    def _run_once(self) -> None:
        # asyncio's own step: run what is ready, else sleep until the first timer. Moving
        # the clock to that timer first makes the sleep zero.
        if not self._ready:
            timers = [timer.when() for timer in self._scheduled if not timer.cancelled()]
            if timers:
                self._now = max(self._now, min(timers))
        super()._run_once()


def on_fake_clock(test: Callable[..., Any]) -> Callable[..., Any]:
    """Run an ``async def`` test on a ``FakeClockLoop`` (the test itself is then plain)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> Any:
        loop = FakeClockLoop()
        try:
            return loop.run_until_complete(test(*args, **kwargs))
        finally:
            loop.close()

    return run


# --------------------------------------------------------------------------- HTML as seen


class _VisibleText(HTMLParser):
    """The text a reader of an HTML page sees (no scripts, no styles)."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self._hidden += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._hidden = max(0, self._hidden - 1)

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.parts.append(data)


def visible_text(html: str) -> str:
    """The words of an HTML page as a reader sees them, on one line."""
    parser = _VisibleText()
    parser.feed(html)
    return re.sub(r"\s+", " ", " ".join(parser.parts))


# --------------------------------------------------------------------------- older files


def rewrite_as_schema_1(
    path: Path,
    *,
    table: str,
    create: str,
    columns: str,
    rows_query: str = "",
    keep: int = -1,
    version: int = 1,
) -> None:
    """Rewrite the nbllm database at ``path`` as an earlier nbllm wrote it: ``table`` made
    by its schema-1 (or ``version``) ``create`` statement, holding ``columns`` of the first
    ``keep`` rows (all by default, in ``rows_query`` order), with the same meta at that
    schema_version, WAL."""
    source = sqlite3.connect(path)
    meta = source.execute("SELECT key, value FROM meta").fetchall()
    rows = source.execute(f"SELECT {columns} FROM {table} {rows_query} LIMIT ?", (keep,)).fetchall()
    source.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript(create + "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);")
    conn.executemany("INSERT INTO meta VALUES (?, ?)", meta)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
    marks = ", ".join("?" * len(columns.split(",")))
    conn.executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", rows)
    conn.commit()
    conn.close()


def schema_of(path: Path, table: str) -> tuple[str, list[str]]:
    """The schema version in the meta of the nbllm database at ``path``, and the columns of
    its ``table``, read without writing anything."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        columns = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
    finally:
        conn.close()
    return version[0], columns


def after_turns(n: int, action: Callable[[], object]) -> Callable[[Any], None]:
    """A run listener that calls ``action`` once, when the ``n``-th turn has finished (to
    kill a replica with requests in flight, say)."""
    from nbllm.executor.events import TurnFinished

    finished = 0

    def listener(event: Any) -> None:
        nonlocal finished
        finished += 1
        if finished == n:
            action()

    listener.event_types = (TurnFinished,)  # type: ignore[attr-defined]
    return listener


class FakeClock:
    """A clock that stands still until a test moves ``now``."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
