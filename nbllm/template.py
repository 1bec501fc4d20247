"""The conversation template of a ``%%llm_batch`` cell: a table's rows become conversations.

::

    system: You are a careful financial analyst.
    {context}
    user: {question_0}
    user: {question_1}
    reference: {answer_1}
    user: What does this chart show?
    image: {chart_path}

- an optional ``system:`` block (it runs until the first ``user:`` line), then
- one ``user:`` block per turn (a block runs until the next marker line), each optionally
  followed by a ``reference:`` block holding that turn's reference answer and by
  ``image:`` lines, one image each, sent with that turn's question (``nbllm.images``);
- a marker is a line starting with ``system:``, ``user:``, ``reference:`` or ``image:``;
- ``{column}`` is filled from each row (DataFrame columns or record keys; ``{x:.2f}`` and
  ``{{`` / ``}}`` work as in ``str.format``). A placeholder naming no column is an error
  before any request is sent. A turn whose placeholders are empty (NaN, None, blank) ends
  that row's conversation, as trailing empty questions do in a wide DataFrame; empty values
  in the system block become empty text, in a reference block no reference, in an image
  line no image. An image line that is one placeholder (``image: {photo}``) takes the
  cell as it is: a path, a URL, bytes, or a list of them; any other line is text, such as
  ``image: /data/charts/{chart_id}.png``.

Each row becomes one record ``{"id", "turns", "system", "references", "images"}``, ready for
``nbllm.run``. Its id comes from the column named by ``id_column`` (the magic's
``--id COLUMN``), else from a column or key named ``id`` or ``conversation_id``, else it is the
row's index label (the record's position). ``with_conversation_ids`` does the same for DATA
that already is a conversation dataset. Every problem is a one-line ``DatasetError``.
"""

from __future__ import annotations

import math
import os
import re
import string
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from nbllm.dataset import did_you_mean, read_records
from nbllm.errors import DatasetError

__all__ = ["ConversationTemplate", "with_conversation_ids"]


_MARKER = re.compile(r"(system|user|reference|image):[ \t]?(.*)")
_FORMATTER = string.Formatter()
_CONVERSIONS: dict[str, Callable[[Any], str]] = {"r": repr, "s": str, "a": ascii}


@dataclass(frozen=True)
class _Text:
    """One block of template text, parsed into literal text and placeholders."""

    parts: tuple[tuple[str, str | None, str | None, str | None], ...]

    @classmethod
    def parse(cls, text: str, where: str) -> _Text:
        try:
            parts = tuple(_FORMATTER.parse(text))
        except ValueError as exc:
            msg = f"{where}: {exc} (write {{{{ and }}}} for literal braces)"
            raise DatasetError(msg) from None
        for _, name, spec, conversion in parts:
            if name is not None and not name.strip():
                msg = f"{where}: an empty placeholder {{}}; name a column: {{column}}"
                raise DatasetError(msg)
            if conversion is not None and conversion not in _CONVERSIONS:
                msg = f"{where}: unknown conversion !{conversion} (use !r, !s or !a)"
                raise DatasetError(msg)
            if spec and "{" in spec:
                msg = f"{where}: a placeholder inside a format spec is not supported"
                raise DatasetError(msg)
        return cls(parts)

    @property
    def fields(self) -> list[str]:
        return [name for _, name, _, _ in self.parts if name is not None]

    @property
    def cell(self) -> str | None:
        """The column, when the text is that one placeholder alone (``{photo}``)."""
        if len(self.parts) == 1:
            literal, name, spec, conversion = self.parts[0]
            if not literal and name is not None and not spec and conversion is None:
                return name
        return None

    def render(self, row: Mapping[str, Any], where: str) -> str | None:
        """The text with each placeholder filled in, or None if one of them is empty."""
        out = []
        for literal, name, spec, conversion in self.parts:
            out.append(literal)
            if name is None:
                continue
            value = row.get(name)
            if _is_empty(value):
                return None
            if conversion is not None:
                value = _CONVERSIONS[conversion](value)
            try:
                out.append(format(value, spec or ""))
            except (TypeError, ValueError) as exc:
                msg = f"{where}, placeholder {{{name}:{spec}}}: {exc}"
                raise DatasetError(msg) from None
        return "".join(out).strip()


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()  # a numpy scalar
    if isinstance(value, float):
        return math.isnan(value)
    return type(value).__name__ in ("NAType", "NaTType")


@dataclass(frozen=True)
class ConversationTemplate:
    """The body of a ``%%llm_batch`` cell: ``system:``, then ``user:`` (and ``reference:``)
    blocks with ``{column}`` placeholders. ``parse`` returns None for an empty body."""

    system: _Text | None
    turns: tuple[tuple[_Text, _Text | None], ...]
    images: tuple[tuple[_Text, ...], ...] = ()

    @classmethod
    def parse(cls, body: str) -> ConversationTemplate | None:
        if not body.strip():
            return None
        system: list[str] | None = None
        turns: list[tuple[list[str], list[str] | None]] = []
        images: list[list[list[str]]] = []
        current: list[str] | None = None
        for number, line in enumerate(body.splitlines(), start=1):
            match = _MARKER.fullmatch(line)
            if match is None:
                if current is not None:
                    current.append(line)
                elif line.strip():
                    msg = (
                        f"template line {number}: {line.strip()!r} comes before the "
                        "first 'system:' or 'user:' line"
                    )
                    raise DatasetError(msg)
                continue
            kind, text = match.groups()
            if kind == "system":
                if system is not None or turns:
                    msg = (
                        f"template line {number}: one 'system:' block is allowed, "
                        "before the first 'user:' line"
                    )
                    raise DatasetError(msg)
                system = current = [text]
            elif kind == "user":
                current = [text]
                turns.append((current, None))
                images.append([])
            elif kind == "image":
                if not turns:
                    msg = f"template line {number}: an 'image:' line must follow a 'user:' block"
                    raise DatasetError(msg)
                current = [text]
                images[-1].append(current)
            else:
                if not turns or turns[-1][1] is not None:
                    msg = (
                        f"template line {number}: a 'reference:' block must follow "
                        "a 'user:' block (one per turn)"
                    )
                    raise DatasetError(msg)
                current = [text]
                turns[-1] = (turns[-1][0], current)
        if not turns:
            msg = "the template has no 'user:' line (one per turn)"
            raise DatasetError(msg)
        parsed: list[tuple[_Text, _Text | None]] = []
        for k, (question, reference) in enumerate(turns):
            text = "\n".join(question).strip()
            if not text:
                msg = f"template turn {k} ('user:' block {k + 1}) is empty"
                raise DatasetError(msg)
            where = f"template turn {k}"
            ref = None if reference is None else _Text.parse("\n".join(reference), where)
            parsed.append((_Text.parse(text, where), ref))
        system_text = None if system is None else _Text.parse("\n".join(system), "system block")
        pictures = tuple(
            tuple(
                _Text.parse("\n".join(block).strip(), f"template turn {k}, image")
                for block in blocks
            )
            for k, blocks in enumerate(images)
        )
        if not any(pictures):
            pictures = ()
        return cls(system_text, tuple(parsed), pictures)

    @property
    def fields(self) -> list[str]:
        """Every placeholder name, in order of first use."""
        texts = [self.system] if self.system is not None else []
        for question, reference in self.turns:
            texts += [question] if reference is None else [question, reference]
        texts += [image for blocks in self.images for image in blocks]
        return list(dict.fromkeys(name for text in texts for name in text.fields))

    def records(self, data: Any, id_column: str | None = None) -> list[dict[str, Any]]:
        """One ``{"id", "turns", "system", "references"}`` record per row of ``data``; the ids
        come from ``id_column`` when given (see the module docs)."""
        columns, rows = _rows(data, id_column)
        missing = [name for name in self.fields if name not in columns]
        if missing:
            listed = ", ".join(f"{{{name}}}" + did_you_mean(name, columns) for name in missing)
            msg = f"the template uses {listed}, but DATA has no such column; " + (
                f"its columns are {columns}"
            )
            raise DatasetError(msg)
        with_references = any(reference is not None for _, reference in self.turns)
        records = []
        for label, cid, row in rows:
            turns: list[str] = []
            references: list[str | None] = []
            pictures: list[list[Any]] = []
            for question, reference in self.turns:
                text = question.render(row, f"{label}, turn {len(turns)}")
                if text is None:
                    break  # an empty turn ends this conversation
                turns.append(text)
                rendered = None if reference is None else reference.render(row, label)
                references.append(rendered or None)
                if self.images:
                    at = f"{label}, turn {len(turns) - 1}, image"
                    pictures.append(_images(self.images[len(turns) - 1], row, at))
            if not turns:
                fields = ", ".join(f"{{{f}}}" for f in self.turns[0][0].fields)
                msg = (
                    f"{label}: the first turn is empty ({fields} has no value), so "
                    "this conversation has nothing to ask; drop such rows first"
                )
                raise DatasetError(msg)
            record: dict[str, Any] = {"id": cid, "turns": turns}
            if self.system is not None:
                # An empty value in the system block is just absent text.
                filled = {k: "" if _is_empty(v) else v for k, v in row.items()}
                record["system"] = self.system.render(filled, f"{label}, system block") or None
            if with_references:
                record["references"] = references
            if any(pictures):
                record["images"] = pictures
            records.append(record)
        return records


def _images(blocks: Sequence[_Text], row: Mapping[str, Any], where: str) -> list[Any]:
    """A turn's images from its ``image:`` lines; an empty cell is no image."""
    out: list[Any] = []
    for block in blocks:
        name = block.cell
        value: Any = row.get(name) if name is not None else block.render(row, where)
        if hasattr(value, "tolist") and getattr(value, "ndim", 0) == 1:
            value = value.tolist()  # an array or a Series
        if isinstance(value, (list, tuple)):
            out.extend(v for v in value if not _is_empty(v))
        elif not _is_empty(value):
            out.append(value)
    return out


def _check_id_column(column: str, columns: Sequence[str]) -> None:
    if column not in columns:
        hint = did_you_mean(column, columns)
        msg = f"the id column {column!r} is not in DATA{hint}; its columns are {list(columns)}"
        raise DatasetError(msg)


def _check_records(data: Sequence[Any], purpose: str) -> list[dict[str, Any]]:
    """The dicts of ``data`` with text keys; anything else is a one-line error."""
    for i, item in enumerate(data):
        if not isinstance(item, Mapping):
            msg = f"{purpose} dicts, but record {i} is a {type(item).__name__}"
            raise DatasetError(msg)
    return [{str(k): v for k, v in r.items()} for r in data]


def _readable(data: Any) -> Any:
    """``data`` with a path read into its records."""
    if isinstance(data, (str, os.PathLike)):
        return [record for _, record in read_records(Path(data))]
    return data


def _rows(
    data: Any, id_column: str | None = None
) -> tuple[list[str], Iterator[tuple[str, Any, dict[str, Any]]]]:
    """Column names and ``(label for messages, conversation id, {column: value})`` per row."""
    data = _readable(data)
    if isinstance(data, pd.DataFrame):
        frame = data
        columns = [str(c) for c in frame.columns]
        if id_column is not None:
            _check_id_column(id_column, columns)
        id_name = id_column or next((c for c in ("id", "conversation_id") if c in columns), None)

        def frame_rows() -> Iterator[tuple[str, Any, dict[str, Any]]]:
            values = frame.itertuples(index=False, name=None)
            for label, row_values in zip(frame.index, values, strict=True):
                row = dict(zip(columns, row_values, strict=True))
                cid = label if id_name is None else row[id_name]
                yield f"row {label!r}", cid, row

        return columns, frame_rows()
    if isinstance(data, Sequence) and data and not isinstance(data, (str, bytes)):
        records = _check_records(data, "a template fills its placeholders from")
        columns = list(dict.fromkeys(k for r in records for k in r))
        if id_column is not None:
            _check_id_column(id_column, columns)

        def record_rows() -> Iterator[tuple[str, Any, dict[str, Any]]]:
            for i, row in enumerate(records):
                if id_column is None:
                    cid = row.get("id", row.get("conversation_id", i))
                else:
                    cid = _record_id(row, id_column, i)
                yield f"record {i}", cid, row

        return columns, record_rows()
    msg = (
        "a template needs DATA to be a DataFrame, a non-empty list of dicts or a "
        f"path to a .jsonl / .json file, got {type(data).__name__}"
    )
    raise DatasetError(msg)


def _record_id(record: Mapping[str, Any], column: str, position: int) -> Any:
    if column not in record:
        msg = f"record {position} has no {column!r}, the id column"
        raise DatasetError(msg)
    return record[column]


def with_conversation_ids(data: Any, column: str) -> Any:
    """A conversation dataset whose conversation ids are the values of ``column``.

    ``data``: a long or wide DataFrame, a list of dicts, or a path to a ``.jsonl`` / ``.json``
    file of them. A DataFrame comes back with ``column`` as its ``conversation_id`` (an
    ``id`` or ``conversation_id`` column it had is dropped); records come back with ``id``.
    """
    data = _readable(data)
    if isinstance(data, pd.DataFrame):
        columns = [str(c) for c in data.columns]
        _check_id_column(column, columns)
        replaced = [c for c in data.columns if c in ("id", "conversation_id") and c != column]
        return data.drop(columns=replaced).rename(columns={column: "conversation_id"})
    if isinstance(data, Sequence) and data and not isinstance(data, (str, bytes)):
        records = _check_records(data, "--id takes conversation ids from a column of")
        _check_id_column(column, list(dict.fromkeys(k for r in records for k in r)))
        out = []
        for i, record in enumerate(records):
            cid = _record_id(record, column, i)
            kept = {k: v for k, v in record.items() if k not in (column, "conversation_id")}
            out.append(kept | {"id": cid})
        return out
    msg = (
        "an id column needs DATA to be a DataFrame, a non-empty list of dicts or a "
        f"path to a .jsonl / .json file, got {type(data).__name__}"
    )
    raise DatasetError(msg)
