"""What the test server saw: one log entry per request, and the key of a list of messages.

A request's key is ``messages_key`` of its messages; the server remembers each answer
under it, which is how it knows whether an assistant message in a later turn is one it
gave. ``read_log`` reads back the JSONL log that ``TestServer(log_path=...)`` appends.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "RequestLogEntry",
    "answer_for",
    "messages_key",
    "prefix_keys",
    "read_log",
    "would_answer",
]


@dataclass(frozen=True, slots=True)
class RequestLogEntry:
    """One request as the server saw it, so tests can check what the client really sent.

    ``status`` is the HTTP status answered, 0 for a dropped connection, or -1 for a request
    cut off by server shutdown (a hang, or a latency sleep) before it was answered.
    ``key`` is ``messages_key(messages)``; a body that could not be read as messages is
    logged with key "", no messages and turn -1.
    """

    t: float
    conversation: str | None
    key: str
    status: int
    n_messages: int
    turn: int


def messages_key(messages: Sequence[Mapping[str, Any]]) -> str:
    """Hex sha256 of the canonical JSON of ``[[role, content], ...]``.

    Only role and content count, so a client that echoes back the full assistant message object
    (with fields such as ``refusal: null``) still matches the answer the server gave.
    """
    return prefix_keys(messages, ())[1]


def prefix_keys(
    messages: Sequence[Mapping[str, Any]], at: Iterable[int]
) -> tuple[dict[int, str], str]:
    """Keys of ``messages[:i]`` for each i in ``at`` and of all messages, in one pass.

    The canonical form is ``json.dumps([[role, content], ...], separators=(",", ":"),
    ensure_ascii=False)``, which is hashed incrementally so the history check stays O(n).
    """
    wanted = set(at)
    prefixes: dict[int, str] = {}
    h = hashlib.sha256(b"[")
    for i, m in enumerate(messages):
        if i in wanted:
            c = h.copy()
            c.update(b"]")
            prefixes[i] = c.hexdigest()
        item = json.dumps([m["role"], m["content"]], separators=(",", ":"), ensure_ascii=False)
        h.update(item.encode() if i == 0 else b"," + item.encode())
    h.update(b"]")
    return prefixes, h.hexdigest()


def read_log(path: str | os.PathLike[str]) -> list[RequestLogEntry]:
    """Read a ``--log`` JSONL file back; a torn last line (server killed mid-write) is skipped."""
    entries: list[RequestLogEntry] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                entries.append(RequestLogEntry(**json.loads(line)))
            except (ValueError, TypeError):
                continue
    return entries


def answer_for(turn: int, last_user: str, key: str) -> str:
    """The answer to turn ``turn`` whose conversation so far hashes to ``key``."""
    return f"Answer to turn {turn}: {last_user[:60]} [{key[:8]}]"


def would_answer(
    messages: Sequence[Mapping[str, Any]], i: int, key: str, given: Mapping[str, Any]
) -> bool:
    """Whether ``given`` (message ``i``) is what this server answers to ``messages[:i]``,
    whole or cut short by a ``max_tokens``."""
    users = [m["content"] for m in messages[:i] if m["role"] == "user"]
    if not users:
        return False
    expected = answer_for(len(users) - 1, users[-1], key)
    text = given["content"]
    return isinstance(text, str) and bool(text) and expected.startswith(text)
