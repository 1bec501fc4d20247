"""The response cache: an answer already paid for is not paid for again.

Keyed by a hash of the normalised request and of who answers it: the engine's
``identity()`` (its kind and the server's address without a password, or a local model's
exact weights), the model, the messages and the sampling parameters other than
credentials (never a key, a header's value or a password). So an answer is only ever
served again for what would have been asked of the same engine, server or weights:
another server with the same model name, or litellm in place of the OpenAI-compatible
engine, is asked afresh. The cache lives in one SQLite file shared by every run in the
folder (``.nbllm/cache.sqlite`` by default), so it works across runs, kernels and
sessions. An explicitly non-zero ``temperature`` asks for a fresh sample each time, so
such requests are not answered from the cache unless ``cache="always"``; their answers
are still stored. Each answer is stored with the engine that produced it, its model and
why it ended (``CachedResponse``) and how many of its prompt tokens the engine took from
its own prompt cache; answers stored by an nbllm older than cache schema 2 have no engine
(None), and older than schema 3 no ``cached_tokens`` (None).

The cache is trusted input: whoever can write the file can plant answers. nbllm creates
it private (0600, in a 0700 folder); a cache shared between users is shared trust.

Answers are committed in batches (``BATCH_ROWS`` answers, or ``BATCH_DELAY_S`` after the
first): the run's checkpoint, committed at once, is what a crash must not lose.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbllm.errors import ConfigError
from nbllm.executor.storage import GroupWriter, database_path, nbllm_dir, open_database
from nbllm.redact import hidden
from nbllm.types import ChatRequest, ChatResponse

__all__ = ["CACHE_FILE", "CachedResponse", "KeyChain", "ResponseCache", "resolve_cache_path"]

log = logging.getLogger("nbllm")

SCHEMA_VERSION = 3  # keys carry their own version tag ("nbllm-request-v1")
CACHE_FILE = "cache.sqlite"
# Answers are committed in batches, not by group commit: keys are random, so each answer
# lands on its own page of the file, and a commit per few answers costs the loop about
# 0.1 ms (measured) against once per batch. A crash loses at most the last batch; with a
# checkpoint (the default) that costs nothing on resume, which reads the checkpoint.
# ``delay_s=0`` commits like the checkpoint (for runs without one).
BATCH_DELAY_S = 0.25
BATCH_ROWS = 200
_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    text TEXT NOT NULL,
    model TEXT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    cost_usd REAL,
    created_at REAL NOT NULL,
    engine TEXT,
    finish_reason TEXT,
    cached_tokens INTEGER
) WITHOUT ROWID;
"""
# Schema 1 stored neither the engine nor why an answer ended, schema 2 not the prompt tokens
# taken from the engine's cache: their answers read back with None there.
_MIGRATIONS = {
    1: "ALTER TABLE responses ADD COLUMN engine TEXT; "
    "ALTER TABLE responses ADD COLUMN finish_reason TEXT",
    2: "ALTER TABLE responses ADD COLUMN cached_tokens INTEGER",
}
_COLUMNS = (
    "key, text, model, prompt_tokens, completion_tokens, cost_usd, created_at, engine, "
    "finish_reason, cached_tokens"
)


@dataclass(frozen=True, slots=True)
class CachedResponse(ChatResponse):
    """An answer from the cache, naming the engine that produced it (None when an nbllm
    older than cache schema 2 stored it)."""

    engine: str | None = None


class KeyChain:
    """Cache keys for the turns of one conversation, hashed incrementally.

    Turn k's messages are turn k-1's plus two, so each key costs only its new messages:
    the hash state after the shared prefix is copied rather than the whole history
    re-encoded. ``request_key`` gives the same key for a whole request.
    """

    __slots__ = ("_state",)

    def __init__(self, model: str, params: Mapping[str, Any], source: str = "") -> None:
        head = json.dumps(
            [source, model.removeprefix("openai/"), hidden(params)],
            sort_keys=True,
            ensure_ascii=False,
            separators=(",", ":"),
            default=repr,
        )
        self._state = hashlib.sha256(b"nbllm-request-v2\0")
        self._feed(self._state, head)

    @staticmethod
    def _feed(state: Any, text: str) -> None:
        data = text.encode()
        state.update(len(data).to_bytes(8, "little"))
        state.update(data)

    def _feed_message(self, state: Any, message: Mapping[str, Any]) -> None:
        extra = {k: v for k, v in message.items() if k not in ("role", "content")}
        self._feed(state, str(message.get("role", "")))
        content = message.get("content", "")
        self._feed(state, content if isinstance(content, str) else json.dumps(content))
        self._feed(state, json.dumps(extra, sort_keys=True) if extra else "")

    def extend(self, message: Mapping[str, Any]) -> None:
        """Add a message that every later request of this conversation starts with."""
        self._feed_message(self._state, message)

    def key_with(self, message: Mapping[str, Any]) -> str:
        """The key of the request made of the messages so far plus ``message``."""
        state = self._state.copy()
        self._feed_message(state, message)
        return state.hexdigest()


def request_key(request: ChatRequest, source: str = "") -> str:
    """The cache key of ``request`` sent to the engine whose ``identity()`` is ``source``."""
    chain = KeyChain(request.model, request.params, source)
    for message in request.messages[:-1]:
        chain.extend(message)
    return chain.key_with(request.messages[-1])


def resolve_cache_path(cache: Any) -> Path | None:
    """The cache file for ``cache=``: False/None off, True/"always" the default file, or a path."""
    if cache is False or cache is None:
        return None
    if cache is True or cache == "always":
        return nbllm_dir() / CACHE_FILE
    if isinstance(cache, (str, os.PathLike)):
        return database_path(cache, CACHE_FILE)
    msg = f"cache= expected True, False, 'always' or a path, got {cache!r}"
    raise ConfigError(msg)


class ResponseCache(GroupWriter):
    """Answers by request key. Reads see committed and pending answers alike."""

    insert = f"INSERT OR REPLACE INTO responses ({_COLUMNS})"
    width = 10

    def __init__(
        self,
        path: Path,
        *,
        reuse_sampled: bool = False,
        delay_s: float = BATCH_DELAY_S,
        max_pending: int = BATCH_ROWS,
    ) -> None:
        conn = open_database(
            path,
            kind="response cache",
            schema=_SCHEMA,
            version=SCHEMA_VERSION,
            verify=False,
            migrations=_MIGRATIONS,
        )
        super().__init__(conn, max_pending=max_pending, delay_s=delay_s)
        self.path = path
        self.reuse_sampled = reuse_sampled
        self._recent: dict[str, CachedResponse] = {}
        self._read_failed = False

    def reusable(self, params: Mapping[str, Any]) -> bool:
        """Whether answers to requests with these parameters may come from the cache."""
        temperature = params.get("temperature")
        return self.reuse_sampled or temperature is None or temperature == 0

    def get(self, key: str) -> CachedResponse | None:
        """The stored answer to the request with this key, naming the engine that gave it."""
        hit = self._recent.get(key)
        if hit is None:
            try:
                row = self._conn.execute(
                    "SELECT text, model, prompt_tokens, completion_tokens, cost_usd, "
                    "finish_reason, engine, cached_tokens FROM responses WHERE key = ?",
                    (key,),
                ).fetchone()
            except sqlite3.Error as exc:
                # A damaged page must not stop the run: the request is simply sent.
                if not self._read_failed:
                    self._read_failed = True
                    log.error("nbllm: could not read %s: %s; sending requests", self.path, exc)
                return None
            if row is None:
                return None
            text, model, prompt, completion, cost, finish_reason, engine, cached_tokens = row
            hit = CachedResponse(
                text, model, prompt, completion, cost, finish_reason,
                cached_tokens=cached_tokens, engine=engine,
            )  # fmt: skip
        return hit

    def put(self, key: str, response: ChatResponse, engine: str | None = None) -> None:
        """Store ``response`` to the request with this key; ``engine`` names the engine
        that produced it (the engine's ``name``)."""
        self._recent[key] = CachedResponse(
            response.text,
            response.model,
            response.prompt_tokens,
            response.completion_tokens,
            response.cost_usd,
            response.finish_reason,
            cached_tokens=response.cached_tokens,
            engine=engine,
        )
        self.add(
            (
                key,
                response.text,
                response.model,
                response.prompt_tokens,
                response.completion_tokens,
                response.cost_usd,
                time.time(),
                engine,
                response.finish_reason,
                response.cached_tokens,
            )
        )

    def flush(self) -> bool:
        written = super().flush()
        if not self._pending:
            self._recent.clear()
        return written

    def describe(self) -> str:
        return f"the response cache {self.path}"
