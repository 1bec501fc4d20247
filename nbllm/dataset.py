"""Turn the data people have into validated :class:`~nbllm.types.Conversation` objects.

``load_conversations(data, system=None)`` accepts five shapes and checks everything
before a single request is sent. Every :class:`~nbllm.errors.DatasetError` names *where*
(row label, record position or file line, and the column or key) and *what* was expected.

1. **Long DataFrame** -- one row per turn. Required columns ``conversation_id``, ``turn``,
   ``question``; optional ``system``, ``context``, ``reference``. Turns are integers running
   ``0..n-1`` or ``1..n`` per conversation (any row order); ``system`` / ``context`` must be the
   same on every row of a conversation (or empty on some rows). Conversations come out in order
   of first appearance::

       conversation_id  turn  question             reference
       "c1"             0     "What is 2+2?"       "4"
       "c1"             1     "And times 3?"       "12"
       "c2"             0     "Capital of France?" "Paris"

2. **Wide DataFrame** -- one row per conversation, columns ``question_0, question_1, ...``
   (or ``question_1, ...``) and optionally ``answer_<k>`` (reference answers), ``id`` or
   ``conversation_id`` (default: the row's index label), ``system``, ``context``. A row may stop
   early: trailing empty questions end that conversation (ConvFinQA style)::

       id    question_0        question_1       answer_0  answer_1
       "a"   "Revenue 2019?"   "And in 2020?"   "10"      "12"
       "b"   "Net income?"     NaN              "3"       NaN

3. **A list of dicts** -- ``{"id": "a", "turns": ["q1", "q2"], "references": ["r1", None],
   "system": "...", "context": "...", "meta": {...}}``; only ``id`` and ``turns`` are required.

4. **A path** (``str`` or ``os.PathLike``) to a ``.jsonl`` file (or ``.json``) holding one
   such record per line; blank lines are skipped::

       {"id": "a", "turns": ["Hi", "What did I just say?"]}
       {"id": "b", "turns": ["Name a prime."], "references": ["2"]}

5. **A list of** :class:`~nbllm.types.Conversation` -- checked the same way.

``system=`` is a default system prompt, stored only on conversations that have none.
Anything else raises ``DatasetError`` listing the accepted shapes.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import warnings
from collections.abc import Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nbllm.errors import ConfigError, DatasetError
from nbllm.types import Conversation

__all__ = ["load_conversations", "read_records"]

_SHAPES = (
    "accepted inputs: a long DataFrame (columns 'conversation_id', 'turn', 'question'; one row "
    "per turn), a wide DataFrame (columns 'question_0', 'question_1', ...; one row per "
    "conversation), a list of dicts {'id': ..., 'turns': [...]}, a list of Conversation "
    "objects, or a path to a .jsonl file"
)
_LONG_REQUIRED = ("conversation_id", "turn", "question")
_LONG_OPTIONAL = ("system", "context", "reference")
_WIDE_OPTIONAL = ("id", "conversation_id", "system", "context")
_RECORD_KEYS = ("id", "turns", "system", "context", "references", "meta")
_QUESTION_RE = re.compile(r"question_(\d+)")
_ANSWER_RE = re.compile(r"answer_(\d+)")

_KEY_LABELS = {k: f"key {k!r}" for k in _RECORD_KEYS}
_ATTR_LABELS = {
    "id": "attribute 'id'",
    "turns": "attribute 'questions'",
    "references": "attribute 'references'",
    "system": "attribute 'system'",
    "context": "attribute 'context'",
    "meta": "attribute 'meta'",
}


def load_conversations(data: Any, *, system: str | None = None) -> list[Conversation]:
    """Validate ``data`` and return its conversations, in input order.

    ``data`` is a long or wide DataFrame, a sequence of dicts or ``Conversation`` objects,
    or a path to a ``.jsonl`` file (see the module docstring). ``system`` is a default system
    prompt, stored only on conversations that have none of their own.

    Raises ``DatasetError`` naming the row / record / line and column / key of the first
    problem found.
    """
    if system is not None and not isinstance(system, str):
        msg = f"system= expects a string or None, got {_describe(system)}"
        raise ConfigError(msg)
    if isinstance(data, pd.DataFrame):
        conversations, hints = _from_dataframe(data)
        for hint in hints:
            warnings.warn(hint, UserWarning, stacklevel=2)
    elif isinstance(data, (str, os.PathLike)):
        conversations = _from_path(data)
    elif isinstance(data, Mapping):
        msg = (
            "got a single mapping; pass a list of records such as "
            f"[{{'id': ..., 'turns': [...]}}] ({_SHAPES})"
        )
        raise DatasetError(msg)
    elif isinstance(data, (Sequence, Iterator)) and not isinstance(data, (bytes, bytearray)):
        items = list(data)
        if not items:
            msg = "empty dataset: no records"
            raise DatasetError(msg)
        conversations = _from_items([(f"record {i}", item) for i, item in enumerate(items)], "")
    else:
        msg = f"cannot read conversations from {_describe(data)}; {_SHAPES}"
        raise DatasetError(msg)
    if system:
        conversations = [
            c if c.system else dataclasses.replace(c, system=system) for c in conversations
        ]
    return conversations


# --------------------------------------------------------------------------- helpers


def _scalar(value: Any) -> Any:
    """Numpy scalars become Python scalars; everything else is returned unchanged."""
    return value.item() if isinstance(value, np.generic) else value


def _is_missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    if isinstance(value, (float, np.floating)):
        return bool(value != value)
    return False


def _describe(value: Any) -> str:
    """A short 'what we got' for error messages: ``NaN``, ``int 5``, ``an empty string``."""
    value = _scalar(value)
    if value is None:
        return "None"
    if _is_missing(value):
        return "NaN"
    if isinstance(value, str):
        if not value:
            return "an empty string"
        return f"a blank string {value!r}" if value.isspace() else f"str {value!r}"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _did_you_mean(name: Any, candidates: Sequence[Any], cutoff: float = 0.6) -> str:
    """`` (did you mean 'x'?)`` for the closest string candidate, or ``''``."""
    if not isinstance(name, str):
        return ""
    by_lower: dict[str, str] = {}
    for c in candidates:
        if isinstance(c, str):
            by_lower.setdefault(c.lower(), c)
    match = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=cutoff)
    return f" (did you mean {by_lower[match[0]]!r}?)" if match else ""


def _check_id(value: Any, where: str) -> Hashable:
    value = _scalar(value)
    if _is_missing(value):
        msg = f"{where}: expected a conversation id, got {_describe(value)}"
        raise DatasetError(msg)
    try:
        hash(value)
    except TypeError:
        msg = f"{where}: expected a hashable conversation id, got {_describe(value)}"
        raise DatasetError(msg) from None
    return value


def _question(value: Any, where: str) -> str:
    value = _scalar(value)
    if isinstance(value, str) and value and not value.isspace():
        return str(value)
    msg = f"{where}: expected a non-empty string, got {_describe(value)}"
    raise DatasetError(msg)


def _reference(value: Any) -> str | None:
    value = _scalar(value)
    if _is_missing(value):
        return None
    return value if type(value) is str else str(value)


def _optional_text(value: Any, where: str) -> str | None:
    """System / context: a string, or absent (None, NaN or blank)."""
    value = _scalar(value)
    if _is_missing(value):
        return None
    if not isinstance(value, str):
        msg = f"{where}: expected a string (or nothing), got {_describe(value)}"
        raise DatasetError(msg)
    return str(value) if value.strip() else None


# --------------------------------------------------------------------------- DataFrames


def _label(index: pd.Index, i: int) -> Any:
    label = index[i]
    return tuple(map(_scalar, label)) if isinstance(label, tuple) else _scalar(label)


def _from_dataframe(df: pd.DataFrame) -> tuple[list[Conversation], list[str]]:
    columns = list(df.columns)
    names = [c for c in columns if isinstance(c, str)]
    if len(df) == 0:
        msg = f"empty dataset: the DataFrame has no rows (columns: {columns})"
        raise DatasetError(msg)
    questions = _numbered(names, _QUESTION_RE, "question")
    is_long = all(c in names for c in _LONG_REQUIRED)
    if questions and is_long:
        msg = (
            "the DataFrame has both long-format columns ('conversation_id', 'turn', 'question') "
            "and wide-format 'question_<k>' columns; keep one shape"
        )
        raise DatasetError(msg)
    if questions:
        answers = _numbered(names, _ANSWER_RE, "answer")
        used = {*questions.values(), *answers.values(), *(c for c in _WIDE_OPTIONAL if c in names)}
        _check_unique_columns(df, used)
        candidates = [*_WIDE_OPTIONAL]
        for k in range(max(questions) + 2):
            candidates += [f"question_{k}", f"answer_{k}"]
        hints = _ignored_column_hints(names, used, candidates)
        return _from_wide(df, questions, answers), hints

    missing = [c for c in _LONG_REQUIRED if c not in names]
    if missing:
        spare = [c for c in names if c not in _LONG_REQUIRED and c not in _LONG_OPTIONAL]
        suggestions = {c: _did_you_mean(c, spare) for c in missing}
        if len(missing) == len(_LONG_REQUIRED) and not any(suggestions.values()):
            msg = f"the DataFrame has neither accepted shape (found columns: {columns}); {_SHAPES}"
            raise DatasetError(msg)
        listed = ", ".join(f"{c!r}{suggestions[c]}" for c in missing)
        plural = "s" if len(missing) > 1 else ""
        msg = (
            f"missing column{plural} {listed}; found columns: {columns} (a long DataFrame needs "
            "'conversation_id', 'turn', 'question'; a wide one needs 'question_0', ...)"
        )
        raise DatasetError(msg)
    used = {*_LONG_REQUIRED, *(c for c in _LONG_OPTIONAL if c in names)}
    _check_unique_columns(df, used)
    hints = _ignored_column_hints(names, used, [*_LONG_REQUIRED, *_LONG_OPTIONAL])
    return _from_long(df), hints


def _numbered(names: Sequence[str], pattern: re.Pattern[str], stem: str) -> dict[int, str]:
    """``{k: column}`` for columns named ``<stem>_<k>``, sorted by ``k``."""
    found: dict[int, str] = {}
    for name in names:
        m = pattern.fullmatch(name)
        if m is None:
            continue
        k = int(m.group(1))
        if m.group(1) != str(k):
            msg = f"column {name!r}: expected the name {stem}_{k!s} (no leading zeros)"
            raise DatasetError(msg)
        found[k] = name
    return dict(sorted(found.items()))


def _check_unique_columns(df: pd.DataFrame, used: set[str]) -> None:
    dupes = df.columns[df.columns.duplicated()]
    for name in dupes:
        if name in used:
            msg = f"column {name!r} appears more than once; keep one"
            raise DatasetError(msg)


def _ignored_column_hints(
    names: Sequence[str], used: set[str], candidates: Sequence[str]
) -> list[str]:
    """Warnings for ignored columns that look like a misspelled column nbllm reads."""
    hints = []
    for name in names:
        if name in used or name in candidates:
            continue
        suggestion = _did_you_mean(name, [c for c in candidates if c not in used], cutoff=0.8)
        if suggestion:
            hints.append(f"column {name!r} is ignored{suggestion}")
    return hints


def _from_long(df: pd.DataFrame) -> list[Conversation]:
    n = len(df)
    index = df.index

    # conversation ids: no NaN, hashable; codes in order of first appearance
    id_col = df["conversation_id"]
    missing = id_col.isna().to_numpy()
    if missing.any():
        i = int(np.argmax(missing))
        where = f"row {_label(index, i)!r}, column 'conversation_id'"
        _check_id(id_col.iloc[i], where)
        msg = f"{where}: expected a conversation id, got {_describe(id_col.iloc[i])}"
        raise DatasetError(msg)
    try:
        codes, uniques = pd.factorize(id_col, sort=False)
    except TypeError:
        for i, value in enumerate(id_col.tolist()):
            _check_id(value, f"row {_label(index, i)!r}, column 'conversation_id'")
        raise  # pragma: no cover - factorize failed on something hash() accepts
    ids = [_scalar(u) for u in uniques.tolist()]
    codes = np.asarray(codes, dtype=np.intp)

    def row(i: int, *, turn: int | None = None) -> str:
        extra = "" if turn is None else f", turn {turn}"
        return f"row {_label(index, i)!r} (conversation_id={ids[codes[i]]!r}{extra})"

    turns = _turn_numbers(df["turn"], row)

    questions = df["question"].tolist()
    for i, q in enumerate(questions):
        if type(q) is str and q and not q.isspace():
            continue
        questions[i] = _question(q, f"{row(i, turn=int(turns[i]))}, column 'question'")

    references: list[str | None] | None = None
    if "reference" in df.columns:
        references = [v if type(v) is str else _reference(v) for v in df["reference"].tolist()]

    # structure: per conversation, turns sorted must be base, base+1, ... with base 0 or 1
    order = np.lexsort((turns, codes))
    sorted_codes = codes[order]
    sorted_turns = turns[order]
    first_of_group = np.ones(n, dtype=bool)
    first_of_group[1:] = sorted_codes[1:] != sorted_codes[:-1]
    starts = np.flatnonzero(first_of_group)
    ends = np.append(starts[1:], n)
    sizes = ends - starts
    position = np.arange(n) - np.repeat(starts, sizes)
    base = np.repeat(sorted_turns[starts], sizes)
    duplicate = np.zeros(n, dtype=bool)
    duplicate[1:] = ~first_of_group[1:] & (sorted_turns[1:] == sorted_turns[:-1])
    bad = ((base != 0) & (base != 1)) | duplicate | (sorted_turns - base != position)
    if bad.any():
        _raise_turn_structure(
            int(np.argmax(bad)),
            order,
            sorted_turns,
            base,
            position,
            duplicate,
            ids,
            sorted_codes,
            index,
        )

    order_list = order.tolist()
    systems = _per_conversation(df, "system", order_list, codes, ids, index)
    contexts = _per_conversation(df, "context", order_list, codes, ids, index)

    sorted_questions = [questions[i] for i in order_list]
    sorted_refs = [references[i] for i in order_list] if references is not None else None
    conversations = []
    for g, (s, e) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
        conversations.append(
            Conversation(
                id=ids[g],
                questions=tuple(sorted_questions[s:e]),
                references=tuple(sorted_refs[s:e]) if sorted_refs is not None else (),
                system=systems[g],
                context=contexts[g],
            )
        )
    return conversations


def _turn_numbers(col: pd.Series, row: Any) -> np.ndarray:
    """The ``turn`` column as int64, or a DatasetError naming the first bad row."""

    def fail(i: int, value: Any) -> None:
        msg = f"{row(i)}, column 'turn': expected an integer turn number, got {_describe(value)}"
        raise DatasetError(msg)

    dtype = col.dtype
    if pd.api.types.is_bool_dtype(dtype):
        fail(0, col.iloc[0])
    if pd.api.types.is_integer_dtype(dtype):
        missing = col.isna().to_numpy()
        if missing.any():
            i = int(np.argmax(missing))
            fail(i, col.iloc[i])
        return col.to_numpy(dtype=np.int64)
    if pd.api.types.is_float_dtype(dtype):
        values = col.to_numpy(dtype=np.float64, na_value=np.nan)
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(values) | (values != np.floor(values))
        if bad.any():
            i = int(np.argmax(bad))
            fail(i, values[i])
        return values.astype(np.int64)
    out = np.empty(len(col), dtype=np.int64)
    for i, value in enumerate(col.tolist()):
        value = _scalar(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(i, value)
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            fail(i, value)
        out[i] = int(value)
    return out


def _raise_turn_structure(
    j: int,
    order: np.ndarray,
    sorted_turns: np.ndarray,
    base: np.ndarray,
    position: np.ndarray,
    duplicate: np.ndarray,
    ids: list[Hashable],
    sorted_codes: np.ndarray,
    index: pd.Index,
) -> None:
    cid = ids[int(sorted_codes[j])]
    first = int(base[j])
    start = j - int(position[j])
    if first not in (0, 1):
        msg = (
            f"conversation_id={cid!r}: turns must run 0..n-1 or 1..n, but the first turn is "
            f"{first} (row {_label(index, int(order[start]))!r}, column 'turn')"
        )
    elif duplicate[j]:
        msg = (
            f"conversation_id={cid!r}: duplicate turn {int(sorted_turns[j])} in rows "
            f"{_label(index, int(order[j - 1]))!r} and {_label(index, int(order[j]))!r}"
        )
    else:
        msg = (
            f"conversation_id={cid!r}: turn {first + int(position[j])} is missing (turns must "
            f"run {first}, {first + 1}, ... with no gaps); row {_label(index, int(order[j]))!r} "
            f"has turn {int(sorted_turns[j])}"
        )
    raise DatasetError(msg)


def _per_conversation(
    df: pd.DataFrame,
    column: str,
    order: list[int],
    codes: np.ndarray,
    ids: list[Hashable],
    index: pd.Index,
) -> list[str | None]:
    """One value of ``column`` per conversation: the first non-empty, all others equal to it."""
    out: list[str | None] = [None] * len(ids)
    if column not in df.columns:
        return out
    raw = df[column].tolist()
    values: list[str | None] = []
    for i, value in enumerate(raw):
        if type(value) is str:
            values.append(value if value and not value.isspace() else None)
        elif _is_missing(value):
            values.append(None)
        else:
            where = (
                f"row {_label(index, i)!r} (conversation_id={ids[codes[i]]!r}), column {column!r}"
            )
            values.append(_optional_text(value, where))
    source = [0] * len(ids)
    code_list = codes.tolist()
    for i in order:
        value = values[i]
        if value is None:
            continue
        g = code_list[i]
        current = out[g]
        if current is None:
            out[g] = value
            source[g] = i
        elif current != value:
            msg = (
                f"conversation_id={ids[g]!r}, column {column!r}: rows "
                f"{_label(index, source[g])!r} and {_label(index, i)!r} differ "
                f"({_short(current)} vs {_short(value)}); it must be the same on every row of a "
                "conversation (or empty)"
            )
            raise DatasetError(msg)
    return out


def _short(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _from_wide(
    df: pd.DataFrame, questions: dict[int, str], answers: dict[int, str]
) -> list[Conversation]:
    ks = list(questions)
    if ks[0] not in (0, 1):
        msg = (
            f"wide DataFrame: question columns must start at 'question_0' or 'question_1', "
            f"the first is {questions[ks[0]]!r}"
        )
        raise DatasetError(msg)
    for expected, k in enumerate(ks, start=ks[0]):
        if k != expected:
            msg = (
                f"wide DataFrame: missing column 'question_{expected}' (question columns must be "
                f"contiguous; found {list(questions.values())})"
            )
            raise DatasetError(msg)
    for k, name in answers.items():
        if k not in questions:
            msg = f"wide DataFrame: column {name!r} has no matching column 'question_{k}'"
            raise DatasetError(msg)
    if "id" in df.columns and "conversation_id" in df.columns:
        msg = "wide DataFrame: both 'id' and 'conversation_id' columns are present; keep one"
        raise DatasetError(msg)
    id_name = next((c for c in ("id", "conversation_id") if c in df.columns), None)

    q_names = list(questions.values())
    a_names = [answers.get(k) for k in ks]
    extras = [c for c in ("system", "context") if c in df.columns]
    used = [*q_names, *(a for a in a_names if a is not None), *extras]
    if id_name is not None:
        used.append(id_name)
    position = {name: p for p, name in enumerate(used)}

    conversations: list[Conversation] = []
    seen: dict[Hashable, Any] = {}
    labels = [
        tuple(map(_scalar, label)) if isinstance(label, tuple) else _scalar(label)
        for label in df.index.tolist()
    ]
    rows = df[used].itertuples(index=False, name=None)
    for label, values in zip(labels, rows, strict=True):
        if id_name is None:
            cid = _check_id(label, f"row {label!r}, index label")
            where = f"row {label!r}"
        else:
            cid = _check_id(values[position[id_name]], f"row {label!r}, column {id_name!r}")
            where = f"row {label!r} ({id_name}={cid!r})"
        if cid in seen:
            msg = f"duplicate conversation id {cid!r}: rows {seen[cid]!r} and {label!r}"
            raise DatasetError(msg)
        seen[cid] = label

        texts: list[str] = []
        empty_at: str | None = None
        for name in q_names:
            value = _scalar(values[position[name]])
            if _is_missing(value) or (isinstance(value, str) and not value.strip()):
                empty_at = empty_at or name
                continue
            if not isinstance(value, str):
                msg = (
                    f"{where}, column {name!r}: expected a non-empty string (or an empty cell to "
                    f"end the conversation), got {_describe(value)}"
                )
                raise DatasetError(msg)
            if empty_at is not None:
                msg = (
                    f"{where}, column {name!r}: a question after the empty column {empty_at!r}; "
                    "only trailing questions may be empty"
                )
                raise DatasetError(msg)
            texts.append(str(value))
        if not texts:
            msg = f"{where}: empty conversation {cid!r} (column {q_names[0]!r} is empty)"
            raise DatasetError(msg)

        refs: list[str | None] = []
        for t, a_name in enumerate(a_names):
            ref = None if a_name is None else _reference(values[position[a_name]])
            if t < len(texts):
                refs.append(ref)
            elif ref is not None and ref.strip():
                msg = (
                    f"{where}, column {a_name!r}: a reference answer for a turn whose question "
                    f"{q_names[t]!r} is empty"
                )
                raise DatasetError(msg)

        system = context = None
        if "system" in position:
            system = _optional_text(values[position["system"]], f"{where}, column 'system'")
        if "context" in position:
            context = _optional_text(values[position["context"]], f"{where}, column 'context'")
        conversations.append(
            Conversation(
                id=cid,
                questions=tuple(texts),
                references=tuple(refs),
                system=system,
                context=context,
            )
        )
    return conversations


# --------------------------------------------------------------------------- records


def _from_path(path_like: str | os.PathLike[str]) -> list[Conversation]:
    path = Path(os.fsdecode(path_like))
    return _from_items(read_records(path), f"{path}, ")


def read_records(path_like: str | os.PathLike[str]) -> list[tuple[str, Any]]:
    """The JSON records of a ``.jsonl`` file (or a ``.json`` array), each with its position
    (``line 4`` / ``record 3``) for messages; any problem is a ``DatasetError``."""
    path = Path(os.fsdecode(path_like))
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json"):
        msg = (
            f"{str(path)!r}: a path must name a .jsonl (or .json) file with one JSON object per "
            f"line, got suffix {suffix!r}; {_SHAPES}"
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


def _from_items(items: list[tuple[str, Any]], prefix: str) -> list[Conversation]:
    """Records (dicts or Conversations) at positions like ``record 3`` / ``line 4``."""
    conversations: list[Conversation] = []
    seen: dict[Hashable, str] = {}
    for position, item in items:
        where = f"{prefix}{position}"
        if isinstance(item, Conversation):
            conversation = _build(
                where,
                item.id,
                item.questions,
                item.references,
                item.system,
                item.context,
                item.meta,
                _ATTR_LABELS,
            )
        elif isinstance(item, Mapping):
            conversation = _from_mapping(item, where)
        else:
            msg = (
                f"{where}: expected a mapping like {{'id': ..., 'turns': [...]}} or a "
                f"Conversation, got {_describe(item)}"
            )
            raise DatasetError(msg)
        cid = conversation.id
        if cid in seen:
            msg = f"{prefix}duplicate conversation id {cid!r}: {seen[cid]} and {position}"
            raise DatasetError(msg)
        seen[cid] = position
        conversations.append(conversation)
    return conversations


def _from_mapping(record: Mapping[Any, Any], where: str) -> Conversation:
    allowed = ", ".join(repr(k) for k in _RECORD_KEYS)
    for key in record:
        if key not in _RECORD_KEYS:
            hint = _did_you_mean(key, _RECORD_KEYS)
            msg = f"{where}: unknown key {key!r}{hint}; allowed keys: {allowed}"
            raise DatasetError(msg)
    for key in ("id", "turns"):
        if key not in record:
            msg = f"{where}: missing key {key!r}; allowed keys: {allowed} ('id', 'turns' required)"
            raise DatasetError(msg)
    return _build(
        where,
        record["id"],
        record["turns"],
        record.get("references"),
        record.get("system"),
        record.get("context"),
        record.get("meta"),
        _KEY_LABELS,
    )


def _is_list_like(value: Any) -> bool:
    if isinstance(value, (str, bytes, bytearray, Mapping)):
        return False
    return isinstance(value, (Sequence, np.ndarray, pd.Series))


def _build(
    where: str,
    raw_id: Any,
    turns: Any,
    references: Any,
    system: Any,
    context: Any,
    meta: Any,
    labels: Mapping[str, str],
) -> Conversation:
    cid = _check_id(raw_id, f"{where}, {labels['id']}")
    where = f"{where} (id={cid!r})"
    if not _is_list_like(turns):
        msg = f"{where}, {labels['turns']}: expected a list of question strings, got " + (
            _describe(turns)
        )
        raise DatasetError(msg)
    turns = list(turns)
    if not turns:
        msg = f"{where}, {labels['turns']}: empty conversation {cid!r} (no turns)"
        raise DatasetError(msg)
    questions = tuple(
        _question(q, f"{where}, {labels['turns']}, turn {t}") for t, q in enumerate(turns)
    )

    refs: tuple[str | None, ...] = ()
    if references is not None:
        if not _is_list_like(references):
            msg = (
                f"{where}, {labels['references']}: expected a list with one reference per turn, "
                f"got {_describe(references)}"
            )
            raise DatasetError(msg)
        references = list(references)
        if len(references) != len(questions):
            msg = (
                f"{where}, {labels['references']}: expected a list of length {len(questions)} "
                f"(one reference per turn, None where absent), got length {len(references)}"
            )
            raise DatasetError(msg)
        refs = tuple(_reference(r) for r in references)

    if meta is None:
        meta = {}
    elif not isinstance(meta, Mapping):
        msg = f"{where}, {labels['meta']}: expected a mapping (dict), got {_describe(meta)}"
        raise DatasetError(msg)
    return Conversation(
        id=cid,
        questions=questions,
        references=refs,
        system=_optional_text(system, f"{where}, {labels['system']}"),
        context=_optional_text(context, f"{where}, {labels['context']}"),
        meta=dict(meta),
    )
