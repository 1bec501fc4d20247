"""The test server's structured answers: JSON that follows the request's ``response_format``.

A request with ``response_format`` (OpenAI's ``json_schema`` form, or ``json_object``) is
answered with a JSON object built from the schema: each property filled by its type
(``string``: the server's usual answer text, ``integer``: the turn, ``number``: the turn
plus a half, ``boolean``: true, ``array``: empty, an ``enum``: its first value, an object:
filled the same way). ``JsonAnswers(bad_first=N)`` answers the first N such requests with
JSON that does not parse, so that a client's repair path can be tested.

A structured answer may be asked for again: a request that ends with an earlier answer of
this server and then a user's message (the client showing the model what was wrong) gets an
answer that later turns may carry in that earlier answer's place (``repaired``), since that
is what the client keeps as the conversation's history.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["JsonAnswers"]


class JsonAnswers:
    """Structured answers for one server (see the module)."""

    def __init__(self, bad_first: int = 0) -> None:
        self.bad_left = bad_first
        self._repaired: dict[str, set[str]] = {}  # prefix key -> answers that replaced its

    def repaired(self, prefix: str, content: Any) -> bool:
        """Whether ``content`` answered a re-ask of the request whose messages hash to
        ``prefix`` (so a history may hold it there)."""
        return isinstance(content, str) and content in self._repaired.get(prefix, ())

    def answer(
        self,
        response_format: Any,
        text: str,
        turn: int,
        messages: Sequence[Mapping[str, Any]] = (),
        prefixes: Mapping[int, str] | None = None,
    ) -> str:
        """The answer to a request that asked for ``response_format``; ``messages`` and
        their ``prefixes`` (the server's keys of each assistant message's history) tell a
        re-ask."""
        made = self._made(response_format, text, turn)
        n = len(messages)
        if prefixes and n >= 3 and messages[-2].get("role") == "assistant" and n - 2 in prefixes:
            self._repaired.setdefault(prefixes[n - 2], set()).add(made)
        return made

    def _made(self, response_format: Any, text: str, turn: int) -> str:
        schema: Any = {}
        if isinstance(response_format, Mapping) and response_format.get("type") == "json_schema":
            inner = response_format.get("json_schema")
            schema = inner.get("schema", {}) if isinstance(inner, Mapping) else {}
        value = _fill(schema, text, turn, schema) if schema else {"answer": text}
        if self.bad_left > 0:
            self.bad_left -= 1
            return json.dumps(value)[:-1]  # the closing brace cut off: not JSON
        return json.dumps(value, ensure_ascii=False)


def _fill(schema: Any, text: str, turn: int, root: Any) -> Any:
    if not isinstance(schema, Mapping):
        return text
    if "$ref" in schema:  # pydantic's nested models: "#/$defs/Name"
        target: Any = root
        for part in str(schema["$ref"]).lstrip("#/").split("/"):
            target = target.get(part, {}) if isinstance(target, Mapping) else {}
        return _fill(target, text, turn, root)
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return _fill(schema[key][0], text, turn, root)
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "object":
        properties = schema.get("properties", {})
        return {name: _fill(sub, text, turn, root) for name, sub in properties.items()}
    return {
        "string": text,
        "integer": turn,
        "number": turn + 0.5,
        "boolean": True,
        "array": [],
        "null": None,
    }.get(str(kind), text)
