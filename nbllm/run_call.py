"""A batch run's call, kept in its checkpoint so that ``nbllm.runs.resume(id)`` can pick
the run up in another kernel, the next morning, without the notebook that started it.

A run with ``batch_api=True`` writes its conversations and its plain options (numbers,
text, flags, and lists and dicts of them, so ``score="numeric"``, ``parse="number"`` and
``alerts={...}`` too; URLs without a password: ``config.shown_option``) into its
checkpoint's meta as JSON. Never its key, nor a callable or a class (``listeners=``,
``on_alert=``, a ``parse=`` or ``score=`` function, ``response_format=`` as a pydantic
model), nor ``params`` holding a credential: ``resume`` takes those again as keywords.
Data that cannot be written as JSON (images given as bytes, conversation ids that are
not text or numbers) leaves the call unkept, and ``resume`` says so.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from nbllm.config import RunConfig, shown_option
from nbllm.errors import CheckpointError
from nbllm.types import Conversation

__all__ = ["call_of", "call_text"]

#: Never kept, whatever its value: the key (code and classes are not plain, so not kept).
_NEVER = frozenset({"api_key"})
_PLAIN = (str, int, float, bool, type(None))


def _plain(value: Any) -> bool:
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def call_text(config: RunConfig, conversations: Sequence[Conversation]) -> str | None:
    """The call as JSON text, or None when its data cannot be kept as JSON."""
    options: dict[str, Any] = {}
    for name in RunConfig.model_fields:
        value = getattr(config, name)
        if name in _NEVER or not _plain(value):
            continue
        shown = shown_option(name, value)
        if shown != value and name in ("params", "router"):
            continue  # a credential among them: given again to resume
        options[name] = shown
    if not all(isinstance(c.id, (str, int)) and not isinstance(c.id, bool) for c in conversations):
        return None
    data = [dataclasses.asdict(c) for c in conversations]
    if not _plain(data):
        return None
    return json.dumps({"conversations": data, "options": options}, ensure_ascii=False)


def call_of(text: str | None, where: str) -> tuple[list[Conversation], dict[str, Any]]:
    """The conversations and options of a kept call; ``CheckpointError`` when none is."""
    if text is None:
        msg = (
            f"{where} keeps no call to resume: only batch_api=True runs keep theirs, and "
            "only when their data can be written as JSON; run the same call again instead"
        )
        raise CheckpointError(msg)
    call = json.loads(text)
    conversations = []
    for item in call["conversations"]:
        item["questions"] = tuple(item["questions"])
        item["references"] = tuple(item["references"])
        item["images"] = tuple(tuple(turn) for turn in item["images"])
        item["messages"] = tuple(item["messages"])
        item["turn_params"] = tuple(item["turn_params"])
        conversations.append(Conversation(**item))
    return conversations, dict(call["options"])
