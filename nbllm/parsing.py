"""Structured answers: what ``response_format=`` and ``parse=`` make of an answer.

``make_parser(response_format, parse)`` checks both options (a ``ConfigError`` naming the
option, before any request) and gives a ``Parser``, or None when neither is given:

- ``response_format``: a pydantic model class, a JSON schema (a dict), OpenAI's
  ``{"type": "json_schema", "json_schema": {"name": ..., "schema": ...}}`` or its JSON mode
  ``{"type": "json_object"}``. ``Parser.wire`` is what the engine is sent (OpenAI's
  ``json_schema`` form, which OpenAI-compatible servers and litellm take); an answer must be
  a JSON object that validates (pydantic for a model class, ``jsonschema`` for a schema),
  and its value is that object as a dict. A JSON object is found in the answer even inside
  a Markdown code fence or after a sentence, as models write them.
- ``parse``: a callable ``answer -> value``, or ``"number"`` (the number a prose answer
  gives: ``"$1,234.5"``, ``"(12.3)"``, ``"14 %"``; ``nbllm.scoring.parse_number``). An
  exception it raises is a parse failure. With both options, ``parse`` reads the validated
  dict.

``Parser.parse(answer)`` gives the value or raises ``ParseFailed``, whose message names the
field that failed. ``Parser.repair(answer, error)`` is the message that asks the model
again: it shows the model its previous answer's error (the previous answer itself goes
before it, as the assistant's message). Neither becomes part of the conversation's history.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from nbllm.errors import ConfigError

__all__ = ["PARSERS", "ParseFailed", "Parser", "make_parser", "parsed_frame"]

#: The parsers ``parse=`` takes by name.
PARSERS = ("number",)

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


class ParseFailed(ValueError):
    """An answer that is not what ``response_format`` / ``parse`` asked for; the message
    says what, naming the field."""


@dataclass(frozen=True, repr=False)
class Parser:
    """Reads answers into values (see the module)."""

    name: str
    model: type[BaseModel] | None = None
    schema: Mapping[str, Any] | None = None
    json_mode: bool = False
    fn: Callable[[Any], Any] | None = None

    def __repr__(self) -> str:
        return f"Parser({self.name})"

    @property
    def wants_json(self) -> bool:
        return self.model is not None or self.schema is not None or self.json_mode

    @property
    def wire(self) -> dict[str, Any] | None:
        """The ``response_format`` an engine is sent, or None (``parse=`` alone)."""
        if self.json_mode and self.schema is None:
            return {"type": "json_object"}
        if self.schema is None:
            return None
        return {"type": "json_schema", "json_schema": {"name": self.name, "schema": self.schema}}

    def parse(self, answer: str) -> Any:
        value: Any = answer
        if self.wants_json:
            value = self._json(answer)
        if self.fn is not None:
            try:
                value = self.fn(value)
            except Exception as exc:
                msg = f"{_callable_name(self.fn)} could not read the answer: {exc}"
                raise ParseFailed(msg) from exc
        return value

    def _json(self, answer: str) -> Any:
        data = _json_object(answer)
        if self.model is not None:
            try:
                return self.model.model_validate(data).model_dump(mode="json")
            except ValidationError as exc:
                raise ParseFailed(_pydantic_error(exc)) from None
        if self.schema is not None:
            import jsonschema

            error = jsonschema.exceptions.best_match(
                jsonschema.validators.validator_for(self.schema)(self.schema).iter_errors(data)
            )
            if error is not None:
                where = "/".join(str(p) for p in error.absolute_path) or "(the object)"
                msg = f"field {where}: {error.message}"
                raise ParseFailed(msg)
        return data

    def repair(self, error: str) -> str:
        """The user message that asks again after an answer failed with ``error``."""
        if self.schema is not None:
            what = "a single JSON object that follows this JSON schema:\n" + json.dumps(
                self.schema, ensure_ascii=False
            )
        elif self.wants_json:
            what = "a single JSON object"
        else:
            what = "an answer in the form asked for"
        return (
            f"Your previous answer could not be used: {error}\nAnswer the previous question "
            f"again, with {what}, and nothing else."
        )


def _callable_name(fn: Callable[..., Any]) -> str:
    return f"parse={getattr(fn, '__name__', type(fn).__name__)}"


def _json_object(answer: str) -> Any:
    """The JSON value an answer holds: all of it, a fenced block, or its outermost braces."""
    candidates = [answer.strip()]
    candidates += [m.group(1).strip() for m in _FENCE.finditer(answer)]
    start, end = answer.find("{"), answer.rfind("}")
    if 0 <= start < end:
        candidates.append(answer[start : end + 1])
    error = "no JSON object in the answer"
    for text in candidates:
        try:
            value = json.loads(text)
        except ValueError as exc:
            error = f"not valid JSON ({exc})"
            continue
        if isinstance(value, dict):
            return value
        error = f"expected a JSON object, got {type(value).__name__}"
    raise ParseFailed(error)


def _pydantic_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(the object)"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"field {where}: {first['msg']}{more}"


def make_parser(response_format: Any = None, parse: Any = None) -> Parser | None:
    """The ``Parser`` of these options, checked; None when neither is given."""
    if response_format is None and parse is None:
        return None
    fn = _parse_fn(parse)
    if response_format is None:
        name = parse if isinstance(parse, str) else _callable_name(parse).removeprefix("parse=")
        return Parser(name=str(name), fn=fn)
    if isinstance(response_format, type) and issubclass(response_format, BaseModel):
        schema = response_format.model_json_schema()
        return Parser(name=response_format.__name__, model=response_format, schema=schema, fn=fn)
    if isinstance(response_format, Mapping):
        kind = response_format.get("type")
        if kind == "json_object":
            return Parser(name="json_object", json_mode=True, fn=fn)
        if kind == "json_schema":
            inner = response_format.get("json_schema")
            if not isinstance(inner, Mapping) or not isinstance(inner.get("schema"), Mapping):
                msg = (
                    "response_format= of type 'json_schema' needs json_schema={'name': ..., "
                    "'schema': {...}}"
                )
                raise ConfigError(msg)
            name = str(inner.get("name") or "answer")
            return Parser(name=name, schema=_checked_schema(inner["schema"]), fn=fn)
        return Parser(name="answer", schema=_checked_schema(response_format), fn=fn)
    msg = (
        "response_format= expected a pydantic model class or a JSON schema (a dict), got "
        f"{type(response_format).__name__}"
    )
    raise ConfigError(msg)


def _checked_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "the schema"
        msg = f"response_format= is not a valid JSON schema: {where}: {exc.message}"
        raise ConfigError(msg) from None
    if schema.get("type", "object") != "object":
        msg = f"response_format= must describe a JSON object, got type {schema.get('type')!r}"
        raise ConfigError(msg)
    return dict(schema)


def _parse_fn(parse: Any) -> Callable[[Any], Any] | None:
    if parse is None:
        return None
    if isinstance(parse, str):
        if parse == "number":
            from nbllm.scoring import parse_number

            return parse_number
        from nbllm.dataset.cells import did_you_mean

        known = ", ".join(map(repr, PARSERS))
        msg = f"parse= expected a callable or one of {known}, got {parse!r}"
        raise ConfigError(msg + did_you_mean(parse, PARSERS))
    if callable(parse):
        return parse
    msg = f"parse= expected a callable or one of {', '.join(map(repr, PARSERS))}, got {parse!r}"
    raise ConfigError(msg)


def parsed_frame(df: Any) -> Any:
    """``RunResult.parsed_df``: ``df``'s keys, then its ``parsed`` objects' fields as
    columns (missing where a turn has no parsed answer)."""
    import pandas as pd

    keys = df[["conversation_id", "turn", "model"]].reset_index(drop=True)
    values = [None if v is pd.NA else v for v in df["parsed"]]
    if values and all(v is None or isinstance(v, dict) for v in values):
        fields = pd.json_normalize([v or {} for v in values]).convert_dtypes()
        return pd.concat([keys, fields], axis=1)
    return keys.assign(parsed=pd.Series([pd.NA if v is None else v for v in values]))
