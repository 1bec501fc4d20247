"""Turn the data people have into validated :class:`~nbllm.types.Conversation` objects.

``load_conversations(data, system=None)`` accepts five shapes and checks everything
before a single request is sent. Every :class:`~nbllm.errors.DatasetError` names *where*
(row label, record position or file line, and the column or key) and *what* was expected.

1. **Long DataFrame** -- one row per turn. Required columns ``conversation_id``, ``turn``,
   ``question``; optional ``system``, ``context``, ``reference``, ``image`` (that turn's
   images). Turns are integers running ``0..n-1`` or ``1..n`` per conversation (any row
   order); ``system`` / ``context`` must be the same on every row of a conversation (or empty
   on some rows). Conversations come out in order
   of first appearance::

       conversation_id  turn  question             reference
       "c1"             0     "What is 2+2?"       "4"
       "c1"             1     "And times 3?"       "12"
       "c2"             0     "Capital of France?" "Paris"

2. **Wide DataFrame** -- one row per conversation, columns ``question_0, question_1, ...``
   (or ``question_1, ...``) and optionally ``answer_<k>`` (reference answers), ``id`` or
   ``conversation_id`` (default: the row's index label), ``system``, ``context``, ``image_<k>``
   (turn k's images). A row may stop
   early: trailing empty questions end that conversation (ConvFinQA style)::

       id    question_0        question_1       answer_0  answer_1
       "a"   "Revenue 2019?"   "And in 2020?"   "10"      "12"
       "b"   "Net income?"     NaN              "3"       NaN

3. **A list of dicts** -- ``{"id": "a", "turns": ["q1", "q2"], "references": ["r1", None],
   "system": "...", "context": "...", "meta": {...}, "images": [[...], [...]], "messages":
   [...], "turn_params": [{...}, ...]}``; only ``id`` and ``turns`` are required. ``images``
   holds one list per turn, or the first turn's images alone; ``messages`` (role and content)
   open every turn's request, a leading system message being the system prompt;
   ``turn_params`` holds one dict of sampling parameters (or None) per turn.

4. **A path** (``str`` or ``os.PathLike``) to a ``.jsonl`` file (or ``.json``) holding one
   such record per line; blank lines are skipped::

       {"id": "a", "turns": ["Hi", "What did I just say?"]}
       {"id": "b", "turns": ["Name a prime."], "references": ["2"]}

5. **A list of** :class:`~nbllm.types.Conversation` -- checked the same way.

``system=`` is a default system prompt, stored only on conversations that have none.
Anything else raises ``DatasetError`` listing the accepted shapes.

The readers live beside this entry point: ``cells`` (one value: checks and how a message
describes it), ``extras`` (images, opening messages, per-turn parameters), ``frames`` (long
and wide DataFrames) and ``records`` (dicts, ``Conversation`` objects and JSONL files). An
image is a path, an http(s) URL or bytes (``nbllm.images``); a file is read once per call.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pandas as pd

from nbllm.dataset.cells import SHAPES, describe, did_you_mean
from nbllm.dataset.frames import from_dataframe
from nbllm.dataset.records import from_items, from_path, read_records
from nbllm.errors import ConfigError, DatasetError
from nbllm.types import Conversation

__all__ = ["did_you_mean", "load_conversations", "read_records"]


def load_conversations(data: Any, *, system: str | None = None) -> list[Conversation]:
    """Validate ``data`` and return its conversations, in input order.

    ``data`` is a long or wide DataFrame, a sequence of dicts or ``Conversation`` objects,
    or a path to a ``.jsonl`` file (see the module docstring). ``system`` is a default system
    prompt, stored only on conversations that have none of their own.

    Raises ``DatasetError`` naming the row / record / line and column / key of the first
    problem found.
    """
    if system is not None and not isinstance(system, str):
        msg = f"system= expects a string or None, got {describe(system)}"
        raise ConfigError(msg)
    if isinstance(data, pd.DataFrame):
        conversations, hints = from_dataframe(data)
        for hint in hints:
            warnings.warn(hint, UserWarning, stacklevel=2)
    elif isinstance(data, (str, os.PathLike)):
        conversations = from_path(data)
    elif isinstance(data, Mapping):
        msg = (
            "got a single mapping; pass a list of records such as "
            f"[{{'id': ..., 'turns': [...]}}] ({SHAPES})"
        )
        raise DatasetError(msg)
    elif isinstance(data, (Sequence, Iterator)) and not isinstance(data, (bytes, bytearray)):
        items = list(data)
        if not items:
            msg = "empty dataset: no records"
            raise DatasetError(msg)
        conversations = from_items([(f"record {i}", item) for i, item in enumerate(items)], "")
    else:
        msg = f"cannot read conversations from {describe(data)}; {SHAPES}"
        raise DatasetError(msg)
    if system:
        conversations = [
            c if c.system else dataclasses.replace(c, system=system) for c in conversations
        ]
    return conversations
