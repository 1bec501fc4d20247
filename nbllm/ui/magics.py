"""``%%llm_batch`` and ``%llm_config``: run a conversation template over a table from a cell.

Load with ``%load_ext nbllm``, then::

    %%llm_batch df -m openai/gpt-4o-mini -o answers --concurrency 32
    system: You are a careful financial analyst.
    {context}
    user: {question_0}
    user: {question_1}

``DATA`` (here ``df``) is a name in the notebook: a DataFrame, a list of dicts, or a str /
Path to a ``.jsonl`` / ``.json`` file. The cell body is a conversation template:

- an optional ``system:`` block (it runs until the first ``user:`` line), then
- one ``user:`` block per turn (a block runs until the next marker line), each optionally
  followed by a ``reference:`` block holding that turn's reference answer;
- a marker is a line starting with ``system:``, ``user:`` or ``reference:``;
- ``{column}`` is filled from each row (DataFrame columns or record keys; ``{x:.2f}`` and
  ``{{`` / ``}}`` work as in ``str.format``). A placeholder naming no column is an error
  before any request is sent. A turn whose placeholders are empty (NaN, None, blank) ends
  that row's conversation, as trailing empty questions do in a wide DataFrame; empty values
  in the system block become empty text, in a reference block no reference.

Each row becomes one conversation with id ``id`` / ``conversation_id`` (a column or key of
that name) or else the row's index label (the record's position). Without a template
(``%llm_batch DATA ...`` on one line, or a blank body: IPython refuses a ``%%`` cell with
nothing below) ``DATA`` already is a conversation dataset in any shape ``nbllm.run`` reads.

Everything else is one call of ``nbllm.run`` (or ``nbllm.submit`` with ``--background``):
the magic binds the ``RunResult`` to ``-o NAME`` (default ``llm_result``) and shows its
summary and first rows. Without ``-m`` (and no session default) the embedded local
model answers, as ``nbllm.run`` without ``model=`` does. With ``--background`` it binds
the ``Job`` to ``NAME_job`` at once and the ``RunResult`` to ``NAME`` when the job ends
(not if it failed: then ``NAME_job.result()`` raises its error).

Where an option's value comes from, first match wins:

1. the magic's own options (``-m``, ``--concurrency``, ...);
2. session defaults: ``%llm_config concurrency=8`` or ``%config LlmBatchMagics.concurrency = 8``
   (the same traits; ``%llm_config`` alone lists every value and its source);
3. environment variables ``NBLLM_MODEL``, ``NBLLM_API_BASE``, ``NBLLM_CONCURRENCY``,
   ``NBLLM_RPM``, ``NBLLM_TPM`` (``NBLLM_DIR``, where checkpoints live, is read by nbllm itself);
4. the defaults of ``nbllm.run``.

API keys are never settings: they come from the environment, as with ``nbllm.run``.
Bad options, data or templates raise ``UsageError``, which IPython shows as one line.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import keyword
import math
import os
import re
import shlex
import string
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from traitlets import Float, Integer, TraitError, Unicode, validate

import nbllm
from nbllm import api
from nbllm.config import RunConfig
from nbllm.dataset import read_records
from nbllm.engines import ENGINE_NAMES
from nbllm.errors import ConfigError, NbllmError
from nbllm.executor.checkpoint import nbllm_dir
from nbllm.jobs import Job

__all__ = [
    "ConversationTemplate",
    "LlmBatchMagics",
    "load_ipython_extension",
    "unload_ipython_extension",
]

SETTINGS = ("model", "api_base", "concurrency", "rpm", "tpm", "max_tokens", "temperature")
ENVIRONMENT = {
    "model": "NBLLM_MODEL",
    "api_base": "NBLLM_API_BASE",
    "concurrency": "NBLLM_CONCURRENCY",
    "rpm": "NBLLM_RPM",
    "tpm": "NBLLM_TPM",
}
SESSION = "%llm_config / %config"
DEFAULT_OUTPUT = "llm_result"

_WHOLE = ("concurrency", "max_tokens")
_NUMBER = ("rpm", "tpm", "temperature")
_UNSET = ("", "none", "default")


# --------------------------------------------------------------------------- settings


def _run_default(key: str) -> Any:
    return inspect.signature(api.run).parameters[key].default


def _check_setting(key: str, value: Any) -> None:
    """Refuse a value ``nbllm.run`` would refuse, with its message (a ``ConfigError``)."""
    if key == "model":
        RunConfig(model=value)
    else:
        RunConfig(model="any", **{key: value})


def _parse_setting(key: str, text: str, where: str) -> Any:
    """A setting's value from text (``%llm_config`` or an environment variable)."""
    if key in _WHOLE:
        try:
            value: Any = int(text)
        except ValueError:
            msg = f"{where}: {key} expects a whole number, got {text!r}"
            raise UsageError(msg) from None
    elif key in _NUMBER:
        try:
            value = float(text)
        except ValueError:
            msg = f"{where}: {key} expects a number, got {text!r}"
            raise UsageError(msg) from None
    else:
        value = text
    try:
        _check_setting(key, value)
    except ConfigError as exc:
        msg = f"{where}: {exc}"
        raise UsageError(msg) from None
    return value


# --------------------------------------------------------------------------- the template


_MARKER = re.compile(r"(system|user|reference):[ \t]?(.*)")
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
            msg = f"%%llm_batch: {where}: {exc} (write {{{{ and }}}} for literal braces)"
            raise UsageError(msg) from None
        for _, name, spec, conversion in parts:
            if name is not None and not name.strip():
                msg = f"%%llm_batch: {where}: an empty placeholder {{}}; name a column: {{column}}"
                raise UsageError(msg)
            if conversion is not None and conversion not in _CONVERSIONS:
                msg = f"%%llm_batch: {where}: unknown conversion !{conversion} (use !r, !s or !a)"
                raise UsageError(msg)
            if spec and "{" in spec:
                msg = f"%%llm_batch: {where}: a placeholder inside a format spec is not supported"
                raise UsageError(msg)
        return cls(parts)

    @property
    def fields(self) -> list[str]:
        return [name for _, name, _, _ in self.parts if name is not None]

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
                msg = f"%%llm_batch: {where}, placeholder {{{name}:{spec}}}: {exc}"
                raise UsageError(msg) from None
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

    @classmethod
    def parse(cls, body: str) -> ConversationTemplate | None:
        if not body.strip():
            return None
        system: list[str] | None = None
        turns: list[tuple[list[str], list[str] | None]] = []
        current: list[str] | None = None
        for number, line in enumerate(body.splitlines(), start=1):
            match = _MARKER.fullmatch(line)
            if match is None:
                if current is not None:
                    current.append(line)
                elif line.strip():
                    msg = (
                        f"%%llm_batch: template line {number}: {line.strip()!r} comes before the "
                        "first 'system:' or 'user:' line"
                    )
                    raise UsageError(msg)
                continue
            kind, text = match.groups()
            if kind == "system":
                if system is not None or turns:
                    msg = (
                        f"%%llm_batch: template line {number}: one 'system:' block is allowed, "
                        "before the first 'user:' line"
                    )
                    raise UsageError(msg)
                system = current = [text]
            elif kind == "user":
                current = [text]
                turns.append((current, None))
            else:
                if not turns or turns[-1][1] is not None:
                    msg = (
                        f"%%llm_batch: template line {number}: a 'reference:' block must follow "
                        "a 'user:' block (one per turn)"
                    )
                    raise UsageError(msg)
                current = [text]
                turns[-1] = (turns[-1][0], current)
        if not turns:
            msg = "%%llm_batch: the template has no 'user:' line (one per turn)"
            raise UsageError(msg)
        parsed: list[tuple[_Text, _Text | None]] = []
        for k, (question, reference) in enumerate(turns):
            text = "\n".join(question).strip()
            if not text:
                msg = f"%%llm_batch: template turn {k} ('user:' block {k + 1}) is empty"
                raise UsageError(msg)
            where = f"template turn {k}"
            ref = None if reference is None else _Text.parse("\n".join(reference), where)
            parsed.append((_Text.parse(text, where), ref))
        system_text = None if system is None else _Text.parse("\n".join(system), "system block")
        return cls(system_text, tuple(parsed))

    @property
    def fields(self) -> list[str]:
        """Every placeholder name, in order of first use."""
        texts = [self.system] if self.system is not None else []
        for question, reference in self.turns:
            texts += [question] if reference is None else [question, reference]
        return list(dict.fromkeys(name for text in texts for name in text.fields))

    def records(self, data: Any) -> list[dict[str, Any]]:
        """One ``{"id", "turns", "system", "references"}`` record per row of ``data``."""
        columns, rows = _rows(data)
        missing = [name for name in self.fields if name not in columns]
        if missing:
            listed = ", ".join(f"{{{name}}}" + _did_you_mean(name, columns) for name in missing)
            msg = f"%%llm_batch: the template uses {listed}, but DATA has no such column; " + (
                f"its columns are {columns}"
            )
            raise UsageError(msg)
        with_references = any(reference is not None for _, reference in self.turns)
        records = []
        for label, cid, row in rows:
            turns: list[str] = []
            references: list[str | None] = []
            for question, reference in self.turns:
                text = question.render(row, f"{label}, turn {len(turns)}")
                if text is None:
                    break  # an empty turn ends this conversation
                turns.append(text)
                rendered = None if reference is None else reference.render(row, label)
                references.append(rendered or None)
            if not turns:
                fields = ", ".join(f"{{{f}}}" for f in self.turns[0][0].fields)
                msg = (
                    f"%%llm_batch: {label}: the first turn is empty ({fields} has no value), so "
                    "this conversation has nothing to ask; drop such rows first"
                )
                raise UsageError(msg)
            record: dict[str, Any] = {"id": cid, "turns": turns}
            if self.system is not None:
                # An empty value in the system block is just absent text.
                filled = {k: "" if _is_empty(v) else v for k, v in row.items()}
                record["system"] = self.system.render(filled, f"{label}, system block") or None
            if with_references:
                record["references"] = references
            records.append(record)
        return records


def _did_you_mean(name: str, candidates: Sequence[str], form: str = "{{{}}}") -> str:
    match = difflib.get_close_matches(name, candidates, n=1)
    return f" (did you mean {form.format(match[0])}?)" if match else ""


def _rows(data: Any) -> tuple[list[str], Iterator[tuple[str, Any, dict[str, Any]]]]:
    """Column names and ``(label for messages, conversation id, {column: value})`` per row."""
    import pandas as pd

    if isinstance(data, (str, os.PathLike)):
        data = _read_records(Path(data))
    if isinstance(data, pd.DataFrame):
        frame = data
        columns = [str(c) for c in frame.columns]
        id_column = next((c for c in ("id", "conversation_id") if c in columns), None)

        def frame_rows() -> Iterator[tuple[str, Any, dict[str, Any]]]:
            values = frame.itertuples(index=False, name=None)
            for label, row_values in zip(frame.index, values, strict=True):
                row = dict(zip(columns, row_values, strict=True))
                cid = label if id_column is None else row[id_column]
                yield f"row {label!r}", cid, row

        return columns, frame_rows()
    if isinstance(data, Sequence) and data and not isinstance(data, (str, bytes)):
        for i, item in enumerate(data):
            if not isinstance(item, Mapping):
                msg = (
                    f"%%llm_batch: a template fills its placeholders from dicts, but record {i} "
                    f"is a {type(item).__name__}"
                )
                raise UsageError(msg)
        records = [{str(k): v for k, v in r.items()} for r in data]
        columns = list(dict.fromkeys(k for r in records for k in r))

        def record_rows() -> Iterator[tuple[str, Any, dict[str, Any]]]:
            for i, row in enumerate(records):
                cid = row.get("id", row.get("conversation_id", i))
                yield f"record {i}", cid, row

        return columns, record_rows()
    msg = (
        "%%llm_batch: a template needs DATA to be a DataFrame, a non-empty list of dicts or a "
        f"path to a .jsonl / .json file, got {type(data).__name__}"
    )
    raise UsageError(msg)


def _read_records(path: Path) -> list[Any]:
    """The records of a .jsonl (one object a line) or .json (a list of objects) file."""
    try:
        return [record for _, record in read_records(path)]
    except NbllmError as exc:
        msg = f"nbllm: {exc}"
        raise UsageError(msg) from exc


# --------------------------------------------------------------------------- the line


class _LineParser(argparse.ArgumentParser):
    """argparse that raises ``UsageError`` (one line) instead of printing and exiting."""

    def error(self, message: str) -> NoReturn:
        msg = f"{self.prog}: {message} (see {self.prog} -h)"
        raise UsageError(msg)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise UsageError(message or f"{self.prog}: exit {status}")


def _line_parser() -> _LineParser:
    parser = _LineParser(
        prog="%%llm_batch",
        add_help=False,
        allow_abbrev=False,
        description="Run a conversation template over DATA with nbllm.run; see %%llm_batch?",
    )
    parser.add_argument("data", nargs="?", metavar="DATA", help="a name in the notebook")
    parser.add_argument("-m", "--model", help="model name (litellm string or served name)")
    parser.add_argument("-o", "--output", default=DEFAULT_OUTPUT, metavar="NAME")
    parser.add_argument("--concurrency", type=int, metavar="N", help="requests in flight")
    parser.add_argument("--rpm", type=float, metavar="N", help="requests per minute")
    parser.add_argument("--tpm", type=float, metavar="N", help="tokens per minute")
    parser.add_argument("--max-tokens", type=int, metavar="N")
    parser.add_argument("--temperature", type=float, metavar="T")
    parser.add_argument("--engine", choices=ENGINE_NAMES, help="default: auto")
    parser.add_argument("--api-base", metavar="URL", help="an OpenAI-compatible server")
    checkpoint = parser.add_mutually_exclusive_group()
    checkpoint.add_argument("--checkpoint", metavar="PATH", help="default: under $NBLLM_DIR")
    checkpoint.add_argument("--no-checkpoint", action="store_true")
    parser.add_argument(
        "--background", action="store_true", help="run with nbllm.submit; bind NAME_job now"
    )
    parser.add_argument("-h", "--help", action="store_true", help="show this help")
    return parser


# --------------------------------------------------------------------------- the magics


@magics_class
class LlmBatchMagics(Magics):
    """``%%llm_batch`` and ``%llm_config``. The traits are the session defaults."""

    model = Unicode(None, allow_none=True, help="Model when -m is not given.").tag(config=True)
    api_base = Unicode(None, allow_none=True, help="Server URL when --api-base is not given.").tag(
        config=True
    )
    concurrency = Integer(None, allow_none=True, help="Requests in flight.").tag(config=True)
    rpm = Float(None, allow_none=True, help="Requests per minute.").tag(config=True)
    tpm = Float(None, allow_none=True, help="Tokens per minute.").tag(config=True)
    max_tokens = Integer(None, allow_none=True, help="Answer length cap.").tag(config=True)
    temperature = Float(None, allow_none=True, help="Sampling temperature.").tag(config=True)

    @validate(*SETTINGS)
    def _validate_setting(self, proposal: Any) -> Any:
        value = proposal["value"]
        if value is not None:
            try:
                _check_setting(proposal["trait"].name, value)
            except ConfigError as exc:
                raise TraitError(str(exc)) from None
        return value

    # -- settings ------------------------------------------------------------------

    def setting(self, key: str) -> tuple[Any, str]:
        """The session default for ``key`` and where it came from."""
        value = getattr(self, key)
        if value is not None:
            return value, SESSION
        variable = ENVIRONMENT.get(key)
        text = os.environ.get(variable, "").strip() if variable else ""
        if variable and text:
            return _parse_setting(key, text, f"${variable}"), f"${variable}"
        return _run_default(key), "default"

    def run_options(self, args: argparse.Namespace) -> dict[str, Any]:
        """The keyword arguments for ``nbllm.run`` / ``nbllm.submit`` from the parsed line."""
        options: dict[str, Any] = {}
        for key in SETTINGS:
            given = getattr(args, key)
            if given is not None:
                options[key] = given
            else:
                value, source = self.setting(key)
                if source != "default":
                    options[key] = value
        if args.engine is not None:
            options["engine"] = args.engine
        if args.no_checkpoint:
            options["checkpoint"] = False
        elif args.checkpoint is not None:
            options["checkpoint"] = args.checkpoint
        options["progress"] = None  # automatic: the dashboard in a notebook
        return options

    # -- %llm_config ---------------------------------------------------------------

    @line_magic
    def llm_config(self, line: str) -> None:
        """Show or set the session defaults of ``%%llm_batch``.

        ``%llm_config`` lists each setting, its value and where that came from;
        ``%llm_config model=openai/gpt-4o-mini concurrency=32`` sets some (``key=`` or
        ``key=none`` unsets one). Keys: model, api_base, concurrency, rpm, tpm, max_tokens,
        temperature. The same values are ``%config LlmBatchMagics.<key> = ...``.
        """
        try:
            tokens = shlex.split(line)
        except ValueError as exc:
            msg = f"%llm_config: {exc}"
            raise UsageError(msg) from None
        if not tokens:
            print(self._settings_table())
            return
        updates: dict[str, Any] = {}
        allowed = ", ".join(SETTINGS)
        for token in tokens:
            key, sep, text = token.partition("=")
            key = key.strip().replace("-", "_")
            if not sep:
                msg = f"%llm_config: expected key=value, got {token!r}; keys: {allowed}"
                raise UsageError(msg)
            if key == "api_key":
                msg = (
                    "%llm_config: api_key is not a setting: keys come from the environment "
                    "(OPENAI_API_KEY, NBLLM_API_KEY, or the provider's usual variable)"
                )
                raise UsageError(msg)
            if key not in SETTINGS:
                msg = f"%llm_config: unknown key {key!r}; allowed keys: {allowed}"
                raise UsageError(msg)
            text = text.strip()
            unset = text.lower() in _UNSET
            updates[key] = None if unset else _parse_setting(key, text, "%llm_config")
        for key, value in updates.items():
            setattr(self, key, value)

    def _settings_table(self) -> str:
        rows: list[tuple[str, str, str]] = []
        for key in SETTINGS:
            value, source = self.setting(key)
            rows.append((key, "-" if value is None else str(value), source))
        root = nbllm_dir()
        source = "$NBLLM_DIR" if os.environ.get("NBLLM_DIR") else "default"
        rows.append(("checkpoint dir", str(root.absolute() / "runs"), source))
        width = max(len(r[0]) for r in rows)
        value_width = max(len(r[1]) for r in rows)
        lines = ["nbllm session defaults (%%llm_batch options override them):"]
        lines += [f"  {k:<{width}}  {v:<{value_width}}  {s}" for k, v, s in rows]
        return "\n".join(lines)

    # -- %%llm_batch ---------------------------------------------------------------

    @line_cell_magic
    def llm_batch(self, line: str, cell: str | None = None) -> None:
        """Run a conversation template over DATA with ``nbllm.run``; see ``nbllm.ui.magics``.

        ::

            %%llm_batch DATA [-m MODEL] [-o NAME] [--concurrency N] [--rpm N] [--tpm N]
                        [--max-tokens N] [--temperature T] [--engine auto|litellm|openai|...]
                        [--api-base URL] [--checkpoint PATH | --no-checkpoint] [--background]
            system: You are a careful financial analyst.
            {context}
            user: {question_0}
            user: {question_1}

        Binds the RunResult to NAME (default ``llm_result``) and shows its summary and
        first rows. ``--background`` binds the Job to ``NAME_job`` and the result to NAME
        when the job ends. Session defaults: ``%llm_config``.
        """
        parser = _line_parser()
        try:
            tokens = shlex.split(line)
        except ValueError as exc:
            msg = f"%%llm_batch: {exc}"
            raise UsageError(msg) from None
        args = parser.parse_args(tokens)
        if args.help:
            print(parser.format_help())
            return
        if args.data is None:
            parser.error("DATA is required: the name of a DataFrame, records or a path")
        name = args.output
        if not name.isidentifier() or keyword.iskeyword(name):
            parser.error(f"-o expects a Python name, got {name!r}")
        options = self.run_options(args)
        data = self._lookup(args.data)
        template = ConversationTemplate.parse(cell or "")
        if template is not None:
            data = template.records(data)
        assert self.shell is not None
        namespace = self.shell.user_ns
        try:
            if args.background:
                job = nbllm.submit(data, **options)
            else:
                result = nbllm.run(data, **options)
        except NbllmError as exc:
            msg = f"nbllm: {exc}"
            raise UsageError(msg) from exc

        from IPython.display import display

        if args.background:
            namespace[f"{name}_job"] = job

            def bind(job: Job) -> None:
                if job.status != "failed":
                    namespace[name] = job.result()

            job.add_done_callback(bind)
            print(
                f"nbllm job {job.id} is running in the background ({job.turns_total} turns): "
                f"{name}_job is the job ({name}_job.stop() stops it); {name} will hold the "
                "result when it ends"
            )
            return
        namespace[name] = result
        display(result.summary)
        display(result.df.head())

    def _lookup(self, name: str) -> Any:
        assert self.shell is not None
        namespace = self.shell.user_ns
        if name not in namespace:
            hint = _did_you_mean(name, [k for k in namespace if not k.startswith("_")], "{!r}")
            msg = (
                f"%%llm_batch: DATA {name!r} is not defined in the notebook{hint}; pass the name "
                "of a DataFrame, a list of records or a path"
            )
            raise UsageError(msg)
        return namespace[name]


# --------------------------------------------------------------------------- the extension


def load_ipython_extension(shell: Any) -> None:
    """Register the magics (``%load_ext nbllm`` calls this)."""
    shell.register_magics(LlmBatchMagics)


def unload_ipython_extension(shell: Any) -> None:
    """Remove the magics and their session defaults (``%unload_ext nbllm``)."""
    manager = shell.magics_manager
    instance = manager.registry.pop(LlmBatchMagics.__name__, None)
    if instance is None:
        return
    for kind, table in instance.magics.items():
        for magic_name in table:
            registered = manager.magics[kind].get(magic_name)
            if getattr(registered, "__self__", None) is instance:
                del manager.magics[kind][magic_name]
    if instance in shell.configurables:
        shell.configurables.remove(instance)
