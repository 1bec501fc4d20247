"""One value of a dataset: the checks every shape shares, and how a message describes it.

Every reader (DataFrames, records, JSONL) validates ids, questions, references and the
optional system / context through these functions, so a bad value reads the same in every
shape's error message.
"""

from __future__ import annotations

import difflib
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from nbllm.errors import DatasetError

__all__ = [
    "SHAPES",
    "check_id",
    "describe",
    "did_you_mean",
    "is_list_like",
    "is_missing",
    "optional_text",
    "question_text",
    "reference_text",
    "scalar",
]

SHAPES = (
    "accepted inputs: a long DataFrame (columns 'conversation_id', 'turn', 'question'; one row "
    "per turn), a wide DataFrame (columns 'question_0', 'question_1', ...; one row per "
    "conversation), a list of dicts {'id': ..., 'turns': [...]}, a list of Conversation "
    "objects, or a path to a .jsonl file"
)


def scalar(value: Any) -> Any:
    """Numpy scalars become Python scalars; everything else is returned unchanged."""
    return value.item() if isinstance(value, np.generic) else value


def is_missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    if isinstance(value, (float, np.floating)):
        return bool(value != value)
    return False


def is_list_like(value: Any) -> bool:
    """A list, tuple, array or Series; not a string, bytes or a mapping."""
    if isinstance(value, (str, bytes, bytearray, Mapping)):
        return False
    return isinstance(value, (Sequence, np.ndarray, pd.Series))


def describe(value: Any) -> str:
    """A short 'what we got' for error messages: ``NaN``, ``int 5``, ``an empty string``."""
    value = scalar(value)
    if value is None:
        return "None"
    if is_missing(value):
        return "NaN"
    if isinstance(value, str):
        if not value:
            return "an empty string"
        return f"a blank string {value!r}" if value.isspace() else f"str {value!r}"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def did_you_mean(name: Any, candidates: Sequence[Any], cutoff: float = 0.6) -> str:
    """`` (did you mean 'x'?)`` for the closest string candidate, or ``''``."""
    if not isinstance(name, str):
        return ""
    by_lower: dict[str, str] = {}
    for c in candidates:
        if isinstance(c, str):
            by_lower.setdefault(c.lower(), c)
    match = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=cutoff)
    return f" (did you mean {by_lower[match[0]]!r}?)" if match else ""


def check_id(value: Any, where: str) -> Hashable:
    value = scalar(value)
    if is_missing(value):
        msg = f"{where}: expected a conversation id, got {describe(value)}"
        raise DatasetError(msg)
    try:
        hash(value)
    except TypeError:
        msg = f"{where}: expected a hashable conversation id, got {describe(value)}"
        raise DatasetError(msg) from None
    return value


def question_text(value: Any, where: str) -> str:
    value = scalar(value)
    if isinstance(value, str) and value and not value.isspace():
        return str(value)
    msg = f"{where}: expected a non-empty string, got {describe(value)}"
    raise DatasetError(msg)


def reference_text(value: Any) -> str | None:
    value = scalar(value)
    if is_missing(value):
        return None
    return value if type(value) is str else str(value)


def optional_text(value: Any, where: str) -> str | None:
    """System / context: a string, or absent (None, NaN or blank)."""
    value = scalar(value)
    if is_missing(value):
        return None
    if not isinstance(value, str):
        msg = f"{where}: expected a string (or nothing), got {describe(value)}"
        raise DatasetError(msg)
    return str(value) if value.strip() else None
