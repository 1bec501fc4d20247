"""One configuration: the call, the environment and the files, resolved by one function.

Where each option of a run comes from, highest first::

    call arguments          nbllm.run(..., rpm=500); a keyword left at its default counts
                            as not given
    the magic's options     %%llm_batch --rpm 500  (the magic passes them as call arguments)
    %llm_config             the session's settings (passed the same way)
    environment             NBLLM_<OPTION>, such as NBLLM_RPM=500 (not for api_key: keys come
                            from the provider's own variables, see nbllm.engines.keys)
    project file            nbllm.toml in the working folder or its parents, or the
                            [tool.nbllm] table of a pyproject.toml there (nbllm.toml first)
    user file               $NBLLM_CONFIG, else $XDG_CONFIG_HOME/nbllm/nbllm.toml
                            (~/.config/nbllm/nbllm.toml)
    defaults                the schema's (nbllm.RunConfig)

A file holds the same options as ``nbllm.run``, by the same names and rules (``rpm = 500``,
``router = [...]`` or ``router = "config.yaml"``, an ``[alerts]`` table), and a ``[models]``
table of defaults per model: ``[models."openai/gpt-4o-mini"]`` with ``max_tokens = 512``
applies when that model is the run's, over the file's own top-level values. A key is never
written in a file: ``api_key = "os.environ/OPENAI_API_KEY"`` names the variable that holds
it. A file is read when a run starts; an unknown option (with the closest name), a value the
schema refuses, a TOML syntax error or a file that cannot be read is a ``ConfigError``
naming the file, the line and the option. ``show()`` (``nbllm config`` in a terminal,
``%llm_config`` in a notebook) lists every option's value and where it came from, a key
never.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nbllm.alert_rules import alert_rules
from nbllm.config import RunConfig, leaf_types, parse_run_option
from nbllm.dataset.cells import did_you_mean
from nbllm.errors import ConfigError

__all__ = ["ENV_PREFIX", "Layer", "file_layers", "layers", "resolve_call", "show", "source_of"]

ENV_PREFIX = "NBLLM_"
PROJECT_FILE = "nbllm.toml"
_SECRET_REF = "os.environ/"
# Options a file or a variable cannot give: callables and objects, or a key.
_NOT_IN_FILES = ("listeners", "on_alert", "parse", "response_format", "score", "api_key")
_NOT_IN_ENVIRONMENT = (*_NOT_IN_FILES, "params", "fallbacks", "alerts")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class Layer:
    """Options from one source: ``values`` by option, ``where`` each came from (a
    variable's name, or ``file:line``), and per-model defaults (a file's ``[models]``)."""

    source: str
    values: dict[str, Any] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)


# --------------------------------------------------------------------------- the files


def project_file(start: Path | None = None) -> tuple[Path, str | None] | None:
    """The project's file, searched from ``start`` (the working folder) up: ``nbllm.toml``,
    or a ``pyproject.toml`` with a ``[tool.nbllm]`` table (then the table's name)."""
    folder = (start or Path.cwd()).resolve()
    for here in (folder, *folder.parents):
        candidate = here / PROJECT_FILE
        if candidate.is_file():
            return candidate, None
        pyproject = here / "pyproject.toml"
        if pyproject.is_file() and re.search(r"(?m)^\s*\[tool\.nbllm[\].]", _text(pyproject)):
            return pyproject, "tool.nbllm"
    return None


def user_file() -> Path | None:
    """``$NBLLM_CONFIG`` (which must exist), else the user's ``nbllm/nbllm.toml`` if any."""
    named = os.environ.get("NBLLM_CONFIG", "").strip()
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            msg = f"$NBLLM_CONFIG names {named!r}, which is not a file"
            raise ConfigError(msg)
        return path
    base = os.environ.get("XDG_CONFIG_HOME", "").strip() or str(Path.home() / ".config")
    path = Path(base) / "nbllm" / PROJECT_FILE
    return path if path.is_file() else None


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        msg = f"{path}: cannot read this nbllm configuration file: {exc}"
        raise ConfigError(msg) from None


def _toml(text: str, path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = f"{path}: not valid TOML: {exc}"
        raise ConfigError(msg) from None


def _line_of(text: str, key: str, table: str | None) -> int | None:
    """The line (from 1) where ``key`` is set in ``table`` (None: the top level)."""
    lines = text.splitlines()
    start = 0
    if table is not None:
        name = re.escape(table).replace(r"\.", r"\s*\.\s*")
        header = re.compile(rf"^\s*\[\s*{name}\s*\]")
        start = next((i + 1 for i, line in enumerate(lines) if header.match(line)), 0)
    quoted = re.escape(key)
    pattern = re.compile(rf"""^\s*(?:(?:{quoted}|"{quoted}"|'{quoted}')\s*=|\[\s*{quoted}\s*\])""")
    for i in range(start, len(lines)):
        if pattern.match(lines[i]):
            return i + 1
        if lines[i].lstrip().startswith("[") and table is not None and i > start:
            break  # the next table: the key is not in this one
    return None


def read_file(path: Path, table: str | None = None) -> Layer:
    """The options of one file (``table``: the dotted table that holds them), each checked."""
    text = _text(path)
    data: Any = _toml(text, path)
    for part in (table or "").split(".") if table else ():
        data = data.get(part, {})
    if not isinstance(data, dict):
        msg = f"{path}: [{table}] must be a table of nbllm options"
        raise ConfigError(msg)
    layer = Layer(str(path))
    for key, value in data.items():
        line = _line_of(text, key, table)
        where = f"{path}:{line}" if line else str(path)
        if key == "models":
            _read_models(layer, value, where, text, table, path)
            continue
        if key == "alerts" and isinstance(value, dict):  # each rule on its own line
            for rule, threshold in value.items():
                line = _line_of(text, rule, f"{table + '.' if table else ''}alerts")
                _checked("alerts", {rule: threshold}, f"{path}:{line}" if line else where)
        layer.values[key] = _checked(key, value, where)
        layer.where[key] = where
    return layer


def _read_models(
    layer: Layer, value: Any, where: str, text: str, table: str | None, path: Path
) -> None:
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        msg = f'{where}: models: expected a table per model, as [models."openai/gpt-4o-mini"]'
        raise ConfigError(msg)
    for model, options in value.items():
        checked = {}
        for key, option in options.items():
            line = _line_of(text, key, f'{table + "." if table else ""}models."{model}"')
            at = f"{path}:{line}" if line else where
            checked[key] = _checked(key, option, at)
        layer.models[model] = checked


def _checked(key: str, value: Any, where: str) -> Any:
    """``value`` of option ``key`` from a file, as the schema takes it; else ConfigError."""
    fields = RunConfig.model_fields
    if key not in fields:
        hint = did_you_mean(key, list(fields))
        msg = f"{where}: {key!r} is not an nbllm option{hint}"
        raise ConfigError(msg)
    if key == "api_key":
        if isinstance(value, str) and value.startswith(_SECRET_REF):
            variable = value[len(_SECRET_REF) :]
            secret = os.environ.get(variable)
            if not secret:
                msg = f"{where}: api_key names ${variable}, which is not set"
                raise ConfigError(msg)
            return secret
        msg = (
            f"{where}: api_key: a key is never written in a file; name the variable that "
            f'holds it: api_key = "{_SECRET_REF}OPENAI_API_KEY"'
        )
        raise ConfigError(msg)
    if key in _NOT_IN_FILES:
        msg = f"{where}: {key} takes a Python object; give it in the call, not in a file"
        raise ConfigError(msg)
    try:
        RunConfig(**{key: value})
        if key == "alerts":
            alert_rules(value)
    except ConfigError as exc:
        msg = f"{where}: {exc}"
        raise ConfigError(msg) from None
    return value


def file_layers(start: Path | None = None) -> list[Layer]:
    """The project file's options, then the user file's (each read and checked now)."""
    out = []
    found = project_file(start)
    if found is not None:
        out.append(read_file(*found))
    user = user_file()
    if user is not None and (found is None or user.resolve() != found[0].resolve()):
        out.append(read_file(user))
    return out


# --------------------------------------------------------------------------- the environment


def _takes_text(name: str) -> bool:
    """Whether option ``name`` can be written as text (a number, a word, a path)."""
    leaves = leaf_types(RunConfig.model_fields[name].annotation)
    return any(leaf in (str, int, float, bool) or isinstance(leaf, str) for leaf in leaves)


def environment_layer(environ: Mapping[str, str] | None = None) -> Layer:
    """The options set by ``NBLLM_<OPTION>`` variables (an empty one counts as unset)."""
    environ = os.environ if environ is None else environ
    layer = Layer("environment")
    for name in RunConfig.model_fields:
        if name in _NOT_IN_ENVIRONMENT:
            continue
        variable = ENV_PREFIX + name.upper()
        text = environ.get(variable, "").strip()
        if not text or not _takes_text(name):
            continue
        layer.values[name] = _from_text(name, text, variable)
        layer.where[name] = f"${variable}"
    return layer


def _from_text(name: str, text: str, variable: str) -> Any:
    default = RunConfig.model_fields[name].default
    boolean = isinstance(default, bool) or name in ("progress", "worker")
    if boolean and text.lower() in (*_TRUE, *_FALSE):
        return text.lower() in _TRUE
    if name in ("checkpoint", "cache") and text.lower() in (*_TRUE, *_FALSE):
        return text.lower() in _TRUE
    try:
        return parse_run_option(name, text)
    except ConfigError as exc:
        msg = f"${variable}: {exc}"
        raise ConfigError(msg) from None


# --------------------------------------------------------------------------- resolving


def layers(start: Path | None = None) -> list[Layer]:
    """The sources below the call, highest first: the environment, the project file, the
    user file."""
    return [environment_layer(), *file_layers(start)]


def _given(call: Mapping[str, Any]) -> set[str]:
    """The options a call gave: those not at the schema's default."""
    fields = RunConfig.model_fields
    return {name for name in fields if name in call and call[name] != fields[name].default}


def resolve_call(call: Mapping[str, Any]) -> RunConfig:
    """The ``RunConfig`` of a call of ``run`` / ``arun`` / ``submit`` (its ``locals()`` on
    entry), with every option the call left at its default taken from the environment or
    the files where they set it (see the module)."""
    options = {name: call[name] for name in RunConfig.model_fields}
    given = _given(call)
    found = layers()
    for name, value, _ in _merged(found, given, options.get("model")):
        options[name] = value
    return RunConfig(**options)


def _merged(found: Sequence[Layer], given: set[str], model: Any) -> list[tuple[str, Any, str]]:
    """(option, value, where) for every option the call did not give, from the highest
    layer that sets it; a file's defaults for the run's model over its own top level."""
    out: dict[str, tuple[Any, str]] = {}
    for layer in reversed(found):  # lowest first: higher ones overwrite
        for name, value in layer.values.items():
            out[name] = (value, layer.where[name])
    chosen = model if model is not None else out.get("model", (None, ""))[0]
    if isinstance(chosen, str):
        for layer in reversed(found):
            for name, value in layer.models.get(chosen, {}).items():
                out[name] = (value, f"{layer.source} [models.{chosen!r}]")
    return [(name, value, where) for name, (value, where) in out.items() if name not in given]


def source_of(name: str, start: Path | None = None) -> tuple[Any, str]:
    """Option ``name``'s value below the call and where it comes from ("default" if no
    layer sets it)."""
    for layer in layers(start):
        if name in layer.values:
            return layer.values[name], layer.where[name]
    return RunConfig.model_fields[name].default, "default"


def show(start: Path | None = None) -> str:
    """Every option's value below the call (environment, files, defaults) and where it
    comes from; a key shows as set or not, never itself."""
    found = layers(start)
    rows = []
    for name in RunConfig.model_fields:
        if name in ("listeners", "on_alert"):
            continue
        value, where = RunConfig.model_fields[name].default, "default"
        for layer in found:
            if name in layer.values:
                value, where = layer.values[name], layer.where[name]
                break
        shown = ("set" if value else "-") if name == "api_key" else repr(value)
        if name in ("router", "params") and value:
            from nbllm.redact import hidden

            shown = repr(hidden({name: value})[name])
        rows.append((name, shown, where))
    width = max(len(r[0]) for r in rows)
    value_width = min(max(len(r[1]) for r in rows), 40)
    return "\n".join(f"{n:<{width}}  {v:<{value_width}}  {w}" for n, v, w in rows)
