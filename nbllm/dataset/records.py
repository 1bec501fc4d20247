"""Records: dicts, ``Conversation`` objects, and the JSONL (or JSON array) files that hold them.

Each record is named by its position (``record 3``, or ``line 4`` of a file) in messages.
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

from nbllm.dataset.cells import (
    SHAPES,
    check_id,
    describe,
    did_you_mean,
    is_list_like,
    optional_text,
    question_text,
    reference_text,
)
from nbllm.dataset.extras import opening_messages, turn_images, turn_params
from nbllm.errors import DatasetError
from nbllm.images import ImageReader
from nbllm.types import Conversation

__all__ = ["from_items", "from_path", "read_records"]

_RECORD_KEYS = (
    "id",
    "turns",
    "system",
    "context",
    "references",
    "meta",
    "images",
    "messages",
    "turn_params",
)
_KEY_LABELS = {k: f"key {k!r}" for k in _RECORD_KEYS}
_ATTR_LABELS = {
    "id": "attribute 'id'",
    "turns": "attribute 'questions'",
    "references": "attribute 'references'",
    "system": "attribute 'system'",
    "context": "attribute 'context'",
    "meta": "attribute 'meta'",
    "images": "attribute 'images'",
    "messages": "attribute 'messages'",
    "turn_params": "attribute 'turn_params'",
}


def from_path(path_like: str | os.PathLike[str]) -> list[Conversation]:
    path = Path(os.fsdecode(path_like))
    return from_items(read_records(path), f"{path}, ")


def read_records(path_like: str | os.PathLike[str]) -> list[tuple[str, Any]]:
    """The JSON records of a ``.jsonl`` file (or a ``.json`` array), each with its position
    (``line 4`` / ``record 3``) for messages; any problem is a ``DatasetError``."""
    path = Path(os.fsdecode(path_like))
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json"):
        msg = (
            f"{str(path)!r}: a path must name a .jsonl (or .json) file with one JSON object per "
            f"line, got suffix {suffix!r}; {SHAPES}"
        )
        raise DatasetError(msg)
    if not path.exists():
        where = "" if path.is_absolute() else f" (relative to {os.getcwd()!r})"
        msg = f"no such file: {str(path)!r}{where}"
        raise DatasetError(msg)
    if path.is_dir():
        msg = f"{str(path)!r} is a directory, expected a .jsonl file"
        raise DatasetError(msg)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        msg = f"cannot read {str(path)!r}: {exc}"
        raise DatasetError(msg) from exc
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]

    items: list[tuple[str, Any]] = []
    if suffix == ".json" and raw.lstrip().startswith(b"["):
        # a plain JSON array of records is read too
        try:
            records = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            msg = f"{path}: invalid JSON ({exc})"
            raise DatasetError(msg) from exc
        items = [(f"record {i}", rec) for i, rec in enumerate(records)]
    else:
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as exc:
                msg = f"{path}, line {number}: not valid UTF-8 ({exc.reason})"
                raise DatasetError(msg) from exc
            except json.JSONDecodeError as exc:
                msg = f"{path}, line {number}: invalid JSON ({exc.msg} at column {exc.colno})"
                raise DatasetError(msg) from exc
            items.append((f"line {number}", record))
    if not items:
        msg = f"{path}: empty dataset (no records)"
        raise DatasetError(msg)
    return items


def from_items(items: list[tuple[str, Any]], prefix: str) -> list[Conversation]:
    """Records (dicts or Conversations) at positions like ``record 3`` / ``line 4``."""
    conversations: list[Conversation] = []
    seen: dict[Hashable, str] = {}
    reader = ImageReader()
    for position, item in items:
        where = f"{prefix}{position}"
        if isinstance(item, Conversation):
            fields = {
                "id": item.id,
                "turns": item.questions,
                "references": item.references,
                "system": item.system,
                "context": item.context,
                "meta": item.meta,
                "images": item.images,
                "messages": item.messages,
                "turn_params": item.turn_params,
            }
            conversation = _build(where, fields, _ATTR_LABELS, reader)
        elif isinstance(item, Mapping):
            conversation = _from_mapping(item, where, reader)
        else:
            msg = (
                f"{where}: expected a mapping like {{'id': ..., 'turns': [...]}} or a "
                f"Conversation, got {describe(item)}"
            )
            raise DatasetError(msg)
        cid = conversation.id
        if cid in seen:
            msg = f"{prefix}duplicate conversation id {cid!r}: {seen[cid]} and {position}"
            raise DatasetError(msg)
        seen[cid] = position
        conversations.append(conversation)
    return conversations


def _from_mapping(record: Mapping[Any, Any], where: str, reader: ImageReader) -> Conversation:
    allowed = ", ".join(repr(k) for k in _RECORD_KEYS)
    for key in record:
        if key not in _RECORD_KEYS:
            hint = did_you_mean(key, _RECORD_KEYS)
            msg = f"{where}: unknown key {key!r}{hint}; allowed keys: {allowed}"
            raise DatasetError(msg)
    for key in ("id", "turns"):
        if key not in record:
            msg = f"{where}: missing key {key!r}; allowed keys: {allowed} ('id', 'turns' required)"
            raise DatasetError(msg)
    return _build(where, record, _KEY_LABELS, reader)


def _build(
    where: str, record: Mapping[Any, Any], labels: Mapping[str, str], reader: ImageReader
) -> Conversation:
    cid = check_id(record["id"], f"{where}, {labels['id']}")
    where = f"{where} (id={cid!r})"
    turns = record["turns"]
    if not is_list_like(turns):
        msg = f"{where}, {labels['turns']}: expected a list of question strings, got " + (
            describe(turns)
        )
        raise DatasetError(msg)
    turns = list(turns)
    if not turns:
        msg = f"{where}, {labels['turns']}: empty conversation {cid!r} (no turns)"
        raise DatasetError(msg)
    questions = tuple(
        question_text(q, f"{where}, {labels['turns']}, turn {t}") for t, q in enumerate(turns)
    )

    refs: tuple[str | None, ...] = ()
    references = record.get("references")
    if references is not None:
        if not is_list_like(references):
            msg = (
                f"{where}, {labels['references']}: expected a list with one reference per turn, "
                f"got {describe(references)}"
            )
            raise DatasetError(msg)
        references = list(references)
        if len(references) != len(questions):
            msg = (
                f"{where}, {labels['references']}: expected a list of length {len(questions)} "
                f"(one reference per turn, None where absent), got length {len(references)}"
            )
            raise DatasetError(msg)
        refs = tuple(reference_text(r) for r in references)

    meta = record.get("meta")
    if meta is None:
        meta = {}
    elif not isinstance(meta, Mapping):
        msg = f"{where}, {labels['meta']}: expected a mapping (dict), got {describe(meta)}"
        raise DatasetError(msg)
    system = optional_text(record.get("system"), f"{where}, {labels['system']}")
    messages, system = opening_messages(
        record.get("messages"), system, f"{where}, {labels['messages']}"
    )
    n = len(questions)
    return Conversation(
        id=cid,
        questions=questions,
        references=refs,
        system=system,
        context=optional_text(record.get("context"), f"{where}, {labels['context']}"),
        meta=dict(meta),
        images=turn_images(record.get("images"), n, f"{where}, {labels['images']}", reader),
        messages=messages,
        turn_params=turn_params(record.get("turn_params"), n, f"{where}, {labels['turn_params']}"),
    )
