"""``%%llm_batch`` and ``%llm_config``: run a conversation template over a table from a cell.

Load with ``%load_ext nbllm``, then::

    %%llm_batch df -m openai/gpt-4o-mini -o answers --concurrency 32
    system: You are a careful financial analyst.
    {context}
    user: {question_0}
    user: {question_1}

``DATA`` (here ``df``) is a name in the notebook: a DataFrame, a list of dicts, or a str /
Path to a ``.jsonl`` / ``.json`` file. The cell body is a conversation template
(``nbllm.template``): an optional ``system:`` block, one ``user:`` block per turn (each
optionally followed by a ``reference:`` block), ``{column}`` placeholders filled from each
row, which becomes one conversation. Without a template
(``%llm_batch DATA ...`` on one line, or a blank body: IPython refuses a ``%%`` cell with
nothing below) ``DATA`` already is a conversation dataset in any shape ``nbllm.run`` reads.
``--id COLUMN`` names the column whose values become ``conversation_id`` (by default a
column named ``id`` or ``conversation_id``, else the row's index label).

Everything else is one call of ``nbllm.run`` (or ``nbllm.submit`` with ``--background``):
the magic binds the ``RunResult`` to ``-o NAME`` (default ``llm_result``) and shows, under
the run's dashboard, its one-line verdict and a preview of the first rows (id, turn,
question, answer, error, latency; text clipped to one line). The full table is
``NAME.df``, every figure ``print(NAME.summary)``. Without ``-m`` (and no session default)
the embedded local model answers, as ``nbllm.run`` without ``model=`` does. With
``--background`` it binds the ``Job`` to ``NAME_job`` at once and the ``RunResult`` to
``NAME`` when the job ends (not if it failed: then ``NAME_job.result()`` raises its error).
``--batch-api`` runs in the background too, as if ``--background`` were given: a provider's
batch may take up to its completion window (24 h), which a blocking cell would hold the
kernel for. An interrupt or a kernel restart does not cancel its batches (running the cell
again re-attaches to them); ``NAME_job.stop()`` or the dashboard's Stop button does.

Where an option's value comes from, first match wins:

1. the magic's own options (``-m``, ``--concurrency``, ...; flags, types and help come from
   ``nbllm.RunConfig``, as do the settings' and variables' parsing and checks);
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
import keyword
import os
import shlex
from typing import Any, NoReturn

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from traitlets import Enum, Float, Integer, TraitError, Unicode, Union, validate

import nbllm
from nbllm.config import RunConfig, parse_run_option, takes_auto, text_type
from nbllm.config_args import add_run_arguments
from nbllm.dataset import did_you_mean
from nbllm.errors import ConfigError, NbllmError
from nbllm.executor.storage import nbllm_dir
from nbllm.jobs import Job
from nbllm.parsing import PARSERS
from nbllm.redact import public_url
from nbllm.results import RunResult
from nbllm.settings import show, source_of
from nbllm.template import ConversationTemplate, with_conversation_ids
from nbllm.ui.preview import ResultPreview

__all__ = ["LlmBatchMagics", "load_ipython_extension", "unload_ipython_extension"]

# The run options a session may set (%llm_config, %config), and those an environment
# variable may set too. The line takes these and --engine, --checkpoint, --no-checkpoint.
SETTINGS = ("model", "api_base", "concurrency", "rpm", "tpm", "max_tokens", "temperature")
ENVIRONMENT = {
    name: f"NBLLM_{name.upper()}" for name in ("model", "api_base", "concurrency", "rpm", "tpm")
}
SESSION = "%llm_config / %config"
# Run options the line takes but a session does not keep (a cap is the run's own).
CAPS = (
    "max_rpm",
    "max_tpm",
    "max_cost_usd",
    "max_tokens_total",
    "cost_per_1k_tokens",
    "batch_api",
    "batch_fallback",
    "max_batches",
    "batch_max_requests",
    "batch_poll_s",
    "router",
    "routing",
    "cooldown_s",
    "allowed_fails",
    "ensemble",
    "replicas",
    "allow_oversubscribe",
    "cluster",
    "ray_address",
    "prefix_cache",
    "prefix_cache_bytes",
)
DEFAULT_OUTPUT = "llm_result"
PREVIEW_ROWS = 5

_UNSET = ("", "none", "default")
_TRAITS: dict[type, Any] = {int: Integer, float: Float, str: Unicode}


# --------------------------------------------------------------------------- settings


def _parse_setting(key: str, text: str, where: str) -> Any:
    """A setting's value from text (``%llm_config`` or an environment variable)."""
    try:
        return parse_run_option(key, text)
    except ConfigError as exc:
        msg = f"{where}: {exc}"
        raise UsageError(msg) from None


def _trait(key: str) -> Any:
    """The session default of option ``key``: unset, with its kind and help from the schema."""
    help_text = RunConfig.model_fields[key].description
    if takes_auto(key):  # a number or "auto" (rpm="auto")
        kinds = [_TRAITS[text_type(key)](), Enum(["auto"])]
        return Union(kinds, default_value=None, allow_none=True, help=help_text).tag(config=True)
    trait = _TRAITS[text_type(key)]
    return trait(None, allow_none=True, help=help_text).tag(config=True)


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
    parser.add_argument("-o", "--output", default=DEFAULT_OUTPUT, metavar="NAME")
    parser.add_argument(
        "--id",
        dest="id_column",
        metavar="COLUMN",
        help="the column whose values name the conversations (default: id or conversation_id)",
    )
    # No argparse choices for --engine: the run refuses an unknown one with the closest name.
    add_run_arguments(parser, (*SETTINGS, "engine", *CAPS), short={"model": "-m"})
    checkpoint = parser.add_mutually_exclusive_group()
    add_run_arguments(checkpoint, ("checkpoint",))
    checkpoint.add_argument("--no-checkpoint", action="store_true", help="keep no checkpoint")
    parser.add_argument(
        "--schema",
        metavar="NAME",
        help="structured answers: a pydantic model class or a JSON schema (dict) in the notebook",
    )
    parser.add_argument(
        "--parse",
        metavar="PARSER",
        help="'number', or the name of a callable in the notebook, to read each answer",
    )
    parser.add_argument(
        "--background",
        action="store_true",
        help="run with nbllm.submit; bind NAME_job now (--batch-api implies it)",
    )
    parser.add_argument("-h", "--help", action="store_true", help="show this help")
    return parser


# --------------------------------------------------------------------------- the magics


@magics_class
class LlmBatchMagics(Magics):
    """``%%llm_batch`` and ``%llm_config``. The traits are the session defaults."""

    model = _trait("model")
    api_base = _trait("api_base")
    concurrency = _trait("concurrency")
    rpm = _trait("rpm")
    tpm = _trait("tpm")
    max_tokens = _trait("max_tokens")
    temperature = _trait("temperature")

    @validate(*SETTINGS)
    def _validate_setting(self, proposal: Any) -> Any:
        value = proposal["value"]
        if value is not None:
            try:
                RunConfig(**{proposal["trait"].name: value})
            except ConfigError as exc:
                raise TraitError(str(exc)) from None
        return value

    @classmethod
    def class_get_trait_help(cls, trait: Any, inst: Any = None, helptext: str | None = None) -> str:
        """What ``%config LlmBatchMagics`` shows of a setting: a URL's password never."""
        text = super().class_get_trait_help(trait, inst, helptext)
        value = getattr(inst, trait.name or "", None) if inst is not None else None
        if isinstance(value, str) and public_url(value) != value:
            text = text.replace(repr(value), repr(public_url(value)))
        return text

    # -- settings ------------------------------------------------------------------

    def setting(self, key: str) -> tuple[Any, str]:
        """The session default for ``key`` and where it came from."""
        value = getattr(self, key)
        if value is not None:
            return value, SESSION
        try:  # $NBLLM_<KEY>, then the project's and the user's nbllm.toml (nbllm.settings)
            return source_of(key)
        except ConfigError as exc:
            raise UsageError(str(exc)) from None

    def run_options(self, args: argparse.Namespace) -> dict[str, Any]:
        """The keyword arguments for ``nbllm.run`` / ``nbllm.submit`` from the parsed line."""
        options: dict[str, Any] = {
            key: getattr(args, key) for key in CAPS if getattr(args, key) is not None
        }
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
        if args.schema is not None:
            options["response_format"] = self._lookup(args.schema, "--schema")
        if args.parse is not None:
            named = args.parse in PARSERS
            options["parse"] = args.parse if named else self._lookup(args.parse, "--parse")
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
            shown = "-" if value is None else str(value)
            if key == "api_base":
                shown = public_url(shown)  # $NBLLM_API_BASE may hold user:password@
            rows.append((key, shown, source))
        root = nbllm_dir()
        source = "$NBLLM_DIR" if os.environ.get("NBLLM_DIR") else "default"
        rows.append(("checkpoint dir", str(root.absolute() / "runs"), source))
        width = max(len(r[0]) for r in rows)
        value_width = max(len(r[1]) for r in rows)
        lines = ["nbllm session defaults (%%llm_batch options override them):"]
        lines += [f"  {k:<{width}}  {v:<{value_width}}  {s}" for k, v, s in rows]
        try:  # every other option, where it comes from (nbllm config prints the same)
            others = [line for line in show().splitlines() if line.split()[0] not in SETTINGS]
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
        lines += ["the other run options (the call's keywords override them):"]
        lines += [f"  {line}" for line in others]
        return "\n".join(lines)

    # -- %%llm_batch ---------------------------------------------------------------

    @line_cell_magic
    def llm_batch(self, line: str, cell: str | None = None) -> None:
        """Run a conversation template over DATA with ``nbllm.run``; see ``nbllm.ui.magics``.

        ::

            %%llm_batch DATA [-m MODEL] [-o NAME] [--id COLUMN] [--concurrency N] [--rpm N]
                        [--tpm N] [--max-tokens N] [--temperature T] [--engine auto|openai|...]
                        [--api-base URL] [--checkpoint PATH | --no-checkpoint] [--background]
            system: You are a careful financial analyst.
            {context}
            user: {question_0}
            user: {question_1}

        Binds the RunResult to NAME (default ``llm_result``) and shows its verdict and first
        rows. ``--id COLUMN``: the column that names each conversation. ``--background``
        binds the Job to ``NAME_job`` and the result to NAME when the job ends;
        ``--batch-api`` implies it (a batch may take up to 24 h). Session defaults:
        ``%llm_config``.
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
        try:
            template = ConversationTemplate.parse(cell or "")
            if template is not None:
                data = template.records(data, args.id_column)
            elif args.id_column is not None:
                data = with_conversation_ids(data, args.id_column)
        except NbllmError as exc:
            msg = f"%%llm_batch: {exc}"
            raise UsageError(msg) from exc
        namespace = self._namespace()
        # A batch may take its whole completion window (24 h): never block the kernel on it.
        # The line's --batch-api, else $NBLLM_BATCH_API's or nbllm.toml's (nbllm.settings).
        batch_api = args.batch_api
        if batch_api is None:
            try:
                batch_api = source_of("batch_api")[0]
            except ConfigError as exc:
                msg = f"nbllm: {exc}"
                raise UsageError(msg) from None
        background = args.background or batch_api is True
        try:
            if background:
                job = nbllm.submit(data, **options)
            else:
                result = nbllm.run(data, **options)
        except NbllmError as exc:
            msg = f"nbllm: {exc}"
            raise UsageError(msg) from exc

        if background:
            namespace[f"{name}_job"] = job
            _announce(job, name, namespace)
            return
        namespace[name] = result
        # In a kernel the run's dashboard ends with the verdict; a terminal shows it here.
        _show(result, name, verdict=getattr(self.shell, "kernel", None) is None)

    def _namespace(self) -> dict[str, Any]:
        if self.shell is None:  # a Magics made without a shell, outside IPython
            msg = "%%llm_batch runs in IPython: load it with %load_ext nbllm"
            raise UsageError(msg)
        return self.shell.user_ns

    def _lookup(self, name: str, option: str = "DATA") -> Any:
        namespace = self._namespace()
        if name not in namespace:
            hint = did_you_mean(name, [k for k in namespace if not k.startswith("_")])
            what = (
                "of a DataFrame, a list of records or a path"
                if option == "DATA"
                else "of a pydantic model class or a JSON schema dict"
                if option == "--schema"
                else "of a callable, or 'number'"
            )
            msg = (
                f"%%llm_batch: {option} {name!r} is not defined in the notebook{hint}; pass "
                f"the name {what}"
            )
            raise UsageError(msg)
        return namespace[name]


# --------------------------------------------------------------------------- what a cell shows


def _show(result: RunResult, name: str, *, verdict: bool = True) -> None:
    """The verdict (unless the dashboard ends with it), then the first rows, then one line on
    where the rest is."""
    from IPython.display import display

    df = result.df
    shown = min(PREVIEW_ROWS, len(df))
    where = [f"{shown} of {len(df):,} rows of {name}.df", f"print({name}.summary) for every figure"]
    with_error = int(df["error"].notna().sum())
    if with_error and not df["error"].head(shown).notna().any():
        where.append(f"{name}.df[{name}.df.error.notna()] for the {with_error:,} with an error")
    where.append(f"{name}.plot() for charts")
    if verdict:
        print(result.verdict)
    display(ResultPreview.of(df, rows=PREVIEW_ROWS, note=" · ".join(where)))


def _announce(job: Job, name: str, namespace: dict[str, Any]) -> None:
    """A line that says where the job and its result are, rewritten when the job ends."""
    from IPython.display import Pretty, display

    handle = display(
        Pretty(
            f"nbllm job {job.id} started in the background ({job.turns_total:,} turns): "
            f"{name}_job is the job ({name}_job.stop() stops it); {name} will hold the result "
            "when it ends"
        ),
        display_id=True,
    )

    def bind(job: Job) -> None:
        if job.status == "failed":
            line = f"nbllm job {job.id} failed: {name}_job.result() raises its error"
        else:
            result = job.result()
            namespace[name] = result
            line = f"nbllm job {job.id} {job.status}: {result.verdict}; {name} holds the result"
        if handle is not None:
            handle.update(Pretty(line))

    job.add_done_callback(bind)


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
