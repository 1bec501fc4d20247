"""DataFrames: the long shape (one row per turn) and the wide one (one row per conversation).

Columns nbllm does not read are ignored, with a warning when one looks like a misspelling of
a column it does read.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from nbllm.dataset.cells import (
    SHAPES,
    check_id,
    describe,
    did_you_mean,
    is_missing,
    optional_text,
    question_text,
    reference_text,
    scalar,
)
from nbllm.dataset.extras import cell_images
from nbllm.errors import DatasetError
from nbllm.images import ImageReader
from nbllm.types import Conversation

__all__ = ["from_dataframe"]

_LONG_REQUIRED = ("conversation_id", "turn", "question")
_LONG_OPTIONAL = ("system", "context", "reference", "image")
_WIDE_OPTIONAL = ("id", "conversation_id", "system", "context")
_QUESTION_RE = re.compile(r"question_(\d+)")
_ANSWER_RE = re.compile(r"answer_(\d+)")
_IMAGE_RE = re.compile(r"image_(\d+)")
_STEMS = ("question", "answer", "image")
_ENDS_IN_NUMBER = re.compile(r".*\d\W*")


def _label(index: pd.Index, i: int) -> Any:
    label = index[i]
    return tuple(map(scalar, label)) if isinstance(label, tuple) else scalar(label)


def from_dataframe(df: pd.DataFrame) -> tuple[list[Conversation], list[str]]:
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
        images = _numbered(names, _IMAGE_RE, "image")
        used = {
            *questions.values(),
            *answers.values(),
            *images.values(),
            *(c for c in _WIDE_OPTIONAL if c in names),
        }
        _check_unique_columns(df, used)
        numbered = [f"{stem}_{k}" for k in range(max(questions) + 2) for stem in _STEMS]
        _refuse_misspelled_numbered(names, used, numbered)
        hints = _ignored_column_hints(names, used, [*_WIDE_OPTIONAL, *numbered])
        return _from_wide(df, questions, answers, images), hints

    missing = [c for c in _LONG_REQUIRED if c not in names]
    if missing:
        spare = [c for c in names if c not in _LONG_REQUIRED and c not in _LONG_OPTIONAL]
        suggestions = {c: did_you_mean(c, spare) for c in missing}
        if len(missing) == len(_LONG_REQUIRED) and not any(suggestions.values()):
            msg = f"the DataFrame has neither accepted shape (found columns: {columns}); {SHAPES}"
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


def _refuse_misspelled_numbered(
    names: Sequence[str], used: set[str], numbered: Sequence[str]
) -> None:
    """Refuse a column that looks like a misspelled ``question_<k>`` / ``answer_<k>``.

    Ignoring it would not just lose a column: ``question0`` beside ``question_1`` would make
    ``question_1`` the first turn, and every conversation would run without its real one.
    Only names ending in a number are taken for one (``questions`` or ``question_type``
    are other columns).
    """
    free = [c for c in numbered if c not in used]
    for name in names:
        if name in used or not _ENDS_IN_NUMBER.fullmatch(name):
            continue
        suggestion = did_you_mean(name, free, cutoff=0.8)
        if suggestion:
            msg = (
                f"wide DataFrame: column {name!r} is not a turn column{suggestion}; turn "
                "columns are named exactly 'question_<k>' and 'answer_<k>' (rename or drop it)"
            )
            raise DatasetError(msg)


def _ignored_column_hints(
    names: Sequence[str], used: set[str], candidates: Sequence[str]
) -> list[str]:
    """Warnings for ignored columns that look like a misspelled column nbllm reads."""
    hints = []
    for name in names:
        if name in used or name in candidates:
            continue
        suggestion = did_you_mean(name, [c for c in candidates if c not in used], cutoff=0.8)
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
        check_id(id_col.iloc[i], where)
        msg = f"{where}: expected a conversation id, got {describe(id_col.iloc[i])}"
        raise DatasetError(msg)
    try:
        codes, uniques = pd.factorize(id_col, sort=False)
    except TypeError:
        for i, value in enumerate(id_col.tolist()):
            check_id(value, f"row {_label(index, i)!r}, column 'conversation_id'")
        raise  # pragma: no cover - factorize failed on something hash() accepts
    ids = [scalar(u) for u in uniques.tolist()]
    codes = np.asarray(codes, dtype=np.intp)

    def row(i: int, *, turn: int | None = None) -> str:
        extra = "" if turn is None else f", turn {turn}"
        return f"row {_label(index, i)!r} (conversation_id={ids[codes[i]]!r}{extra})"

    turns = _turn_numbers(df["turn"], row)

    questions = df["question"].tolist()
    for i, q in enumerate(questions):
        if type(q) is str and q and not q.isspace():
            continue
        questions[i] = question_text(q, f"{row(i, turn=int(turns[i]))}, column 'question'")

    images: list[tuple[str, ...]] | None = None
    if "image" in df.columns:
        reader = ImageReader()
        images = [
            cell_images(v, f"{row(i, turn=int(turns[i]))}, column 'image'", reader)
            for i, v in enumerate(df["image"].tolist())
        ]

    references: list[str | None] | None = None
    if "reference" in df.columns:
        references = [v if type(v) is str else reference_text(v) for v in df["reference"].tolist()]

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
    sorted_images = [images[i] for i in order_list] if images is not None else None
    conversations = []
    for g, (s, e) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
        conversations.append(
            Conversation(
                id=ids[g],
                questions=tuple(sorted_questions[s:e]),
                references=tuple(sorted_refs[s:e]) if sorted_refs is not None else (),
                system=systems[g],
                context=contexts[g],
                images=tuple(sorted_images[s:e]) if sorted_images is not None else (),
            )
        )
    return conversations


def _turn_numbers(col: pd.Series, row: Any) -> np.ndarray:
    """The ``turn`` column as int64, or a DatasetError naming the first bad row."""

    def fail(i: int, value: Any) -> None:
        msg = f"{row(i)}, column 'turn': expected an integer turn number, got {describe(value)}"
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
        value = scalar(value)
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
        elif is_missing(value):
            values.append(None)
        else:
            where = (
                f"row {_label(index, i)!r} (conversation_id={ids[codes[i]]!r}), column {column!r}"
            )
            values.append(optional_text(value, where))
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
    df: pd.DataFrame,
    questions: dict[int, str],
    answers: dict[int, str],
    images: dict[int, str],
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
    for k, name in [*answers.items(), *images.items()]:
        if k not in questions:
            msg = f"wide DataFrame: column {name!r} has no matching column 'question_{k}'"
            raise DatasetError(msg)
    if "id" in df.columns and "conversation_id" in df.columns:
        msg = "wide DataFrame: both 'id' and 'conversation_id' columns are present; keep one"
        raise DatasetError(msg)
    id_name = next((c for c in ("id", "conversation_id") if c in df.columns), None)

    q_names = list(questions.values())
    a_names = [answers.get(k) for k in ks]
    i_names = [images.get(k) for k in ks]
    extras = [c for c in ("system", "context") if c in df.columns]
    used = [*q_names, *(a for a in a_names if a is not None), *images.values(), *extras]
    if id_name is not None:
        used.append(id_name)
    position = {name: p for p, name in enumerate(used)}

    conversations: list[Conversation] = []
    seen: dict[Hashable, Any] = {}
    reader = ImageReader()
    labels = [
        tuple(map(scalar, label)) if isinstance(label, tuple) else scalar(label)
        for label in df.index.tolist()
    ]
    rows = df[used].itertuples(index=False, name=None)
    for label, values in zip(labels, rows, strict=True):
        if id_name is None:
            cid = check_id(label, f"row {label!r}, index label")
            where = f"row {label!r}"
        else:
            cid = check_id(values[position[id_name]], f"row {label!r}, column {id_name!r}")
            where = f"row {label!r} ({id_name}={cid!r})"
        if cid in seen:
            msg = f"duplicate conversation id {cid!r}: rows {seen[cid]!r} and {label!r}"
            raise DatasetError(msg)
        seen[cid] = label

        texts: list[str] = []
        empty_at: str | None = None
        for name in q_names:
            value = scalar(values[position[name]])
            if is_missing(value) or (isinstance(value, str) and not value.strip()):
                empty_at = empty_at or name
                continue
            if not isinstance(value, str):
                msg = (
                    f"{where}, column {name!r}: expected a non-empty string (or an empty cell to "
                    f"end the conversation), got {describe(value)}"
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
            ref = None if a_name is None else reference_text(values[position[a_name]])
            if t < len(texts):
                refs.append(ref)
            elif ref is not None and ref.strip():
                msg = (
                    f"{where}, column {a_name!r}: a reference answer for a turn whose question "
                    f"{q_names[t]!r} is empty"
                )
                raise DatasetError(msg)

        pictures = _wide_images(values, position, i_names, q_names, len(texts), where, reader)
        system = context = None
        if "system" in position:
            system = optional_text(values[position["system"]], f"{where}, column 'system'")
        if "context" in position:
            context = optional_text(values[position["context"]], f"{where}, column 'context'")
        conversations.append(
            Conversation(
                id=cid,
                questions=tuple(texts),
                references=tuple(refs),
                system=system,
                context=context,
                images=pictures,
            )
        )
    return conversations


def _wide_images(
    values: tuple[Any, ...],
    position: dict[str, int],
    names: list[str | None],
    q_names: list[str],
    n_turns: int,
    where: str,
    reader: ImageReader,
) -> tuple[tuple[str, ...], ...]:
    """One row's ``image_<k>`` cells: the images of each of its turns."""
    out: list[tuple[str, ...]] = []
    for t, name in enumerate(names):
        if name is None:
            if t < n_turns:
                out.append(())
            continue
        pictures = cell_images(values[position[name]], f"{where}, column {name!r}", reader)
        if t < n_turns:
            out.append(pictures)
        elif pictures:
            msg = (
                f"{where}, column {name!r}: an image for a turn whose question {q_names[t]!r} "
                "is empty"
            )
            raise DatasetError(msg)
    return tuple(out)
