"""What the test server saw: one log entry per request, and the key of a list of messages.

A request's key is ``messages_key`` of its messages; the server remembers each answer
under it, which is how it knows whether an assistant message in a later turn is one it
gave. ``read_log`` reads back the JSONL log that ``TestServer(log_path=...)`` appends.
``read_chat_body`` reads a request as the server takes it: text messages, and user
messages of OpenAI content parts (text and images), as vision models take them, and
``AskedTurn`` is such a request with the keys and turn the server answers it by.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nbllm.engines.openai_wire import BadChatRequest, parse_chat_body, parse_max_tokens
from nbllm.images import content_text

__all__ = [
    "AskedTurn",
    "RequestLogEntry",
    "answer_for",
    "in_history",
    "messages_key",
    "prefix_keys",
    "read_chat_body",
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
    users = [content_text(m["content"]) for m in messages[:i] if m["role"] == "user"]
    if not users:
        return False
    expected = answer_for(len(users) - 1, users[-1], key)
    text = given["content"]
    return isinstance(text, str) and bool(text) and expected.startswith(text)


def read_chat_body(raw: bytes) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``parse_chat_body``, except that a user message's content may be a list of content
    parts: ``{"type": "text", "text": ...}`` and ``{"type": "image_url", "image_url":
    {"url": ...}}``. A message is kept as role and content, the parts as they came, so the
    request's key covers every image's bytes."""
    try:
        return parse_chat_body(raw)
    except BadChatRequest:
        body = _with_parts(raw)
        if body is None:
            raise
    messages: list[dict[str, Any]] = []
    for i, m in enumerate(body["messages"]):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            msg = f"messages[{i}] must be an object with a string 'role'"
            raise BadChatRequest(msg)
        content = m.get("content")
        if isinstance(content, list) and m["role"] == "user":
            for j, part in enumerate(content):
                if not _good_part(part):
                    msg = (
                        f"messages[{i}].content[{j}] must be a text part or an image_url "
                        "part with a string 'url'"
                    )
                    raise BadChatRequest(msg)
        elif not isinstance(content, str):
            msg = f"messages[{i}].content must be a string, or content parts in a user message"
            raise BadChatRequest(msg)
        messages.append({"role": m["role"], "content": content})
    return body, messages


def _with_parts(raw: bytes) -> dict[str, Any] | None:
    """The body, when it is one that only content parts kept ``parse_chat_body`` from reading."""
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(body, dict) or body.get("stream"):
        return None
    messages = body.get("messages")
    if not isinstance(messages, list) or not any(
        isinstance(m, dict) and isinstance(m.get("content"), list) for m in messages
    ):
        return None
    return body


def _good_part(part: Any) -> bool:
    if not isinstance(part, dict):
        return False
    if part.get("type") == "text":
        return isinstance(part.get("text"), str)
    if part.get("type") == "image_url":
        image = part.get("image_url")
        return isinstance(image, dict) and isinstance(image.get("url"), str)
    return False


def in_history(
    answers: Mapping[str, str],
    messages: Sequence[Mapping[str, Any]],
    i: int,
    prefix: str,
    shared: bool,
    structured: Any,
) -> bool:
    """Whether assistant message ``i`` is an answer the server gave to the messages before
    it (``answers``, by their key ``prefix``), gave to a re-ask of them
    (``structured.repaired``), or, with ``shared`` history, would have given."""
    given = messages[i]["content"]
    return (
        answers.get(prefix) == given
        or structured.repaired(prefix, given)
        or (shared and would_answer(messages, i, prefix, messages[i]))
    )


@dataclass(frozen=True, slots=True)
class AskedTurn:
    """A chat request read as the server answers it: its body, messages, their key and
    the keys of each assistant message's history, and the turn it asks for."""

    body: dict[str, Any]
    messages: list[dict[str, Any]]
    max_tokens: int | None
    assistant_at: list[int]
    prefixes: dict[int, str]
    key: str
    turn: int
    last_user: str

    @classmethod
    def read(cls, raw: bytes) -> AskedTurn:
        """Raises ``BadChatRequest`` for a body the server does not answer."""
        body, messages = read_chat_body(raw)
        max_tokens = parse_max_tokens(body)
        assistant_at = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        prefixes, key = prefix_keys(messages, assistant_at)
        users = [content_text(m["content"]) for m in messages if m["role"] == "user"]
        last_user = users[-1] if users else ""
        return cls(
            body, messages, max_tokens, assistant_at, prefixes, key, len(users) - 1, last_user
        )
