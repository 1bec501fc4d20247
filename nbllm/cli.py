"""The ``nbllm`` command: run a file of conversations from a terminal.

::

    nbllm run conversations.jsonl --model openai/gpt-4o-mini --rpm 500 --out results.csv
    nbllm runs                  # the stored runs (checkpoints)
    nbllm runs rm 3dd51522      # remove one
    nbllm serve --engine torch --port 8000   # a local model behind the OpenAI API

Thin on purpose: parse the arguments, read the file, call ``nbllm.run``, print the
summary, write ``--out``. Anything the command does, ``nbllm.run`` / ``nbllm.runs`` do.

Exit codes: 0 every turn succeeded, 1 some turns failed, 2 bad input or option
(nothing was sent), 130 interrupted (``--out`` still holds what finished).
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import signal
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nbllm
from nbllm.config_args import add_run_arguments
from nbllm.errors import ConfigError, DatasetError, NbllmError
from nbllm.executor.stats import one_line
from nbllm.executor.storage import nbllm_dir
from nbllm.serve import add_parser as add_serve_parser
from nbllm.types import SKIPPED, TurnRecord

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["main"]

_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_OUT_SUFFIXES = (".csv", ".jsonl", ".parquet")
# The options of nbllm.run that are flags of the same name (--api-base for api_base);
# --checkpoint/--no-checkpoint, --fresh, --no-cache and --no-progress are the others.
_RUN_OPTIONS = (
    "model",
    "api_base",
    "api_key",
    "concurrency",
    "rpm",
    "tpm",
    "max_rpm",
    "max_tpm",
    "timeout",
    "retries",
    "system",
    "max_tokens",
    "temperature",
    "engine",
    "stop_grace_s",
    "redis_url",
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
    "metrics_port",
    "metrics_host",
    "replicas",
    "allow_oversubscribe",
    "cluster",
    "ray_address",
    "prefix_cache",
    "prefix_cache_bytes",
)


def _require_pyarrow(what: str) -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        msg = f"{what} needs pyarrow, which is not installed (pip install pyarrow)"
        raise ConfigError(msg) from None


def _read_csv(path: Path) -> pd.DataFrame:
    import pandas as pd

    # Text stays text ("007", "12" as a reference answer); only the turn numbers are numbers.
    df = pd.read_csv(path, dtype=str)
    if "turn" in df.columns:
        # On failure load_conversations names the row that holds the bad turn number.
        with contextlib.suppress(ValueError, TypeError):
            df["turn"] = pd.to_numeric(df["turn"])
    return df


def _read_data(path: Path) -> Any:
    """What ``nbllm.run`` takes for this file: the path itself, or a DataFrame."""
    suffix = path.suffix.lower()
    if suffix not in _DATA_SUFFIXES:
        msg = f"{str(path)!r}: expected a .jsonl, .json, .csv or .parquet file, got {suffix!r}"
        raise DatasetError(msg)
    if not path.is_file():
        msg = f"no such file: {str(path)!r}"
        raise DatasetError(msg)
    if suffix in (".jsonl", ".json"):
        return path
    if suffix == ".parquet":
        _require_pyarrow("reading a .parquet file")
    import pandas as pd

    try:
        return _read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
    except (OSError, ValueError) as exc:  # unreadable, not CSV / Parquet, not UTF-8
        msg = f"cannot read {str(path)!r}: {exc}"
        raise DatasetError(msg) from exc


def _check_out(path: Path) -> None:
    """Refuse an output we could not write, before any request is sent."""
    suffix = path.suffix.lower()
    if suffix not in _OUT_SUFFIXES:
        msg = f"--out {str(path)!r}: expected a .csv, .jsonl or .parquet file, got {suffix!r}"
        raise ConfigError(msg)
    if suffix == ".parquet":
        _require_pyarrow("--out with .parquet")
    parent = path.parent
    if not parent.is_dir():
        msg = f"--out {str(path)!r}: the folder {str(parent)!r} does not exist"
        raise ConfigError(msg)


def _write_out(df: pd.DataFrame, path: Path) -> None:
    suffix = path.suffix.lower()
    if suffix != ".jsonl" and "parsed" in df:  # a table cell holds the parsed value as JSON
        import pandas as pd

        texts = [pd.NA if v is pd.NA else json.dumps(v, ensure_ascii=False) for v in df["parsed"]]
        df = df.assign(parsed=pd.array(texts, dtype="string"))
    if suffix == ".csv":
        df.to_csv(path, index=False)
    elif suffix == ".jsonl":
        # One JSON object per turn; missing values become null, times ISO 8601 strings.
        text = df.to_json(orient="records", lines=True, force_ascii=False, date_format="iso")
        if text and not text.endswith("\n"):
            text += "\n"
        path.write_text(text, encoding="utf-8")
    else:
        df.to_parquet(path, index=False)


@contextlib.contextmanager
def _no_ctrl_c() -> Iterator[None]:
    """Ctrl-C is ignored inside (in the main thread; elsewhere signals never arrive)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _first_line(text: str, where: str) -> str:
    key = (text.splitlines() or [""])[0].strip()
    if not key:
        msg = f"{where} holds no key: expected the API key on its first line"
        raise ConfigError(msg)
    return key


def _api_key(args: argparse.Namespace) -> str | None:
    """The key from ``--api-key-file PATH``, ``--api-key -`` (stdin) or ``--api-key KEY``."""
    if args.api_key_file is not None:
        path = Path(args.api_key_file).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            msg = f"--api-key-file: cannot read {str(path)!r} ({reason})"
            raise ConfigError(msg) from None
        return _first_line(text, f"--api-key-file {str(path)!r}")
    if args.api_key == "-":
        if sys.stdin is None:
            msg = "--api-key -: no standard input to read the key from"
            raise ConfigError(msg)
        if sys.stdin.isatty():  # typed: not echoed to the screen
            return _first_line(getpass.getpass("API key: "), "--api-key - (the terminal)")
        return _first_line(sys.stdin.readline(), "--api-key - (standard input)")
    key: str | None = args.api_key
    return key


def _run(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else None
    if out is not None:
        _check_out(out)
    api_key = _api_key(args)
    data = _read_data(Path(args.data))
    # Options left out on the command line keep nbllm.run's own defaults.
    given = {name: getattr(args, name) for name in (*_RUN_OPTIONS, "checkpoint")}
    given["api_key"] = api_key
    options = {name: value for name, value in given.items() if value is not None}
    if args.no_checkpoint:
        options["checkpoint"] = False
    if args.no_cache:
        options["cache"] = False
    if args.fresh:
        options["resume"] = False
    if args.no_progress:
        options["progress"] = False  # else a bar on a terminal, none into a file or a pipe
    return _report(nbllm.run(data, **options), out, routed=args.router is not None)


def _report(result: nbllm.RunResult, out: Path | None, *, routed: bool = False) -> int:
    """Print a finished run's summary (and write ``--out``); the command's exit code."""
    print(result.summary)
    summary = result.summary
    if routed:  # where each deployment's requests went, and how they fared
        print(summary.deployments.to_string(index=False))
    if summary.ensemble_figures:  # how often each model's answer was kept, and how fast
        print(summary.ensemble.to_string(index=False))
    if summary.resumed or summary.cached:
        print(
            f"nbllm: {summary.resumed} of {summary.turns} turns resumed from the checkpoint, "
            f"{summary.cached} answered from the cache (no request sent for them)",
            file=sys.stderr,
        )
    if out is not None:
        try:
            with _no_ctrl_c():  # a late second Ctrl-C must not cut the file short
                _write_out(result.df, out)
        except (OSError, ValueError, TypeError) as exc:  # no disk space, mixed-type column, ...
            msg = f"cannot write {str(out)!r}: {exc}"
            raise ConfigError(msg) from exc
        print(f"nbllm: wrote {len(result.df)} rows to {out}", file=sys.stderr)
    if result.interrupted:
        print(
            f"nbllm: interrupted: {summary.turns_ok} of {summary.turns} turns finished",
            file=sys.stderr,
        )
        return 130
    if result.stop_reason is not None:  # it gave up by itself: the turns left never ran
        print(f"nbllm: {summary.verdict}", file=sys.stderr)
        return 1
    if summary.turns_failed:
        print(
            f"nbllm: {summary.turns_failed} of {summary.turns} turns failed "
            f"(see the 'error' column){_most_common_error(result.records)}",
            file=sys.stderr,
        )
        return 1
    return 0


def _most_common_error(records: Iterable[TurnRecord]) -> str:
    """``; most common: <one such error> (<count> turns)``, counting the errors of the turns that
    failed by themselves (not those skipped after them) by kind, the text before the first
    ":"; the error is shown on one line with anything like a key redacted."""
    kinds: Counter[str] = Counter()
    example: dict[str, str] = {}
    for record in records:
        error = record.error
        if error is None or record.not_run or error.startswith(SKIPPED):
            continue
        kind = error.partition(":")[0]
        kinds[kind] += 1
        example.setdefault(kind, error)
    if not kinds:
        return ""
    kind, count = kinds.most_common(1)[0]
    text = one_line(example[kind])
    if len(text) > 200:
        text = text[:197] + "..."
    return f"; most common: {text} ({count} turn{'s' if count > 1 else ''})"


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError  # pragma: no cover - the loop always returns


def _runs(args: argparse.Namespace) -> int:
    import pandas as pd

    df = nbllm.runs.list_runs(args.root)
    if df.empty:
        where = Path(args.root) if args.root else nbllm_dir()
        print(f"no stored runs under {where / 'runs'}")
        return 0
    header = ("ID", "CREATED (UTC)", "MODEL", "DONE/TOTAL", "BATCHES OUT", "SIZE", "IN USE")
    table = [header]
    notes = []
    for run in df.itertuples(index=False):
        if run.error is not None:
            notes.append(f"{run.id}: {run.error}")
        created = "-" if pd.isna(run.created) else run.created.strftime("%Y-%m-%d %H:%M:%S")
        done = "-" if run.error is not None else f"{run.done}/{run.total}"
        table.append(
            (
                run.id,
                created,
                run.model or "-",
                done,
                "-" if pd.isna(run.batches_in_flight) else str(run.batches_in_flight),
                _size(run.size_bytes),
                "yes" if run.in_use else "no",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
    for note in notes:
        print(f"unreadable: {note}")
    return 0


def _runs_resume(args: argparse.Namespace) -> int:
    job = nbllm.runs.resume(args.id, args.root)
    print(f"nbllm: resuming run {args.id} ({job.turns_total:,} turns)", file=sys.stderr)
    return _report(job.result(), None)


def _runs_rm(args: argparse.Namespace) -> int:
    removed = nbllm.runs.remove(args.id, args.root)
    print(f"removed run {removed.name} ({removed})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbllm",
        description="Run datasets of multi-turn LLM conversations in parallel.",
    )
    parser.add_argument("--version", action="version", version=f"nbllm {nbllm.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser(
        "run",
        help="run a file of conversations and print the summary",
        description=(
            "Run every conversation in DATA and print the run's summary. The API key comes "
            "from the environment (NBLLM_API_KEY for a server at --api-base; the provider's "
            "usual variable, such as OPENAI_API_KEY, otherwise), --api-key-file, or "
            "--api-key."
        ),
        epilog="exit codes: 0 all turns ok, 1 some turns failed, 2 bad input, 130 interrupted",
    )
    run.add_argument(
        "data", metavar="DATA", help="a .jsonl/.json, .csv (long or wide) or .parquet file"
    )
    # No argparse choices for --engine: nbllm.run refuses an unknown one with the closest name.
    add_run_arguments(run, [name for name in _RUN_OPTIONS if name != "api_key"])
    keys = run.add_mutually_exclusive_group()
    keys.add_argument(
        "--api-key",
        metavar="KEY",
        help=(
            "the key for --api-base or the provider; '-' reads it from standard input (one "
            "line). WARNING: a key written here is visible to every user of this machine "
            "(ps) for the whole run; prefer the environment or --api-key-file. nbllm never "
            "prints nor stores it (default: from the environment)"
        ),
    )
    keys.add_argument(
        "--api-key-file",
        metavar="PATH",
        help="read the key from the first line of PATH (keep the file private: chmod 600)",
    )
    run.add_argument(
        "--out", metavar="FILE", help="write one row per turn to .csv, .jsonl or .parquet"
    )
    run.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (default: a bar on stderr when it is a terminal)",
    )
    stored = run.add_mutually_exclusive_group()
    add_run_arguments(stored, ("checkpoint",))
    stored.add_argument(
        "--no-checkpoint", action="store_true", help="keep no checkpoint; nothing to resume"
    )
    run.add_argument(
        "--fresh", action="store_true", help="start over: discard the checkpoint's finished turns"
    )
    run.add_argument("--no-cache", action="store_true", help="send every request (no cache)")
    run.set_defaults(handler=_run)

    root_help = "the folder that holds runs/ (default: $NBLLM_DIR or .nbllm)"
    runs = commands.add_parser(
        "runs",
        help="list the stored runs (checkpoints)",
        description=(
            "List the stored runs (checkpoints), newest first; 'runs rm ID' removes one, "
            "'runs resume ID' picks up a batch run."
        ),
    )
    runs.add_argument("--root", metavar="DIR", help=root_help)
    runs.set_defaults(handler=_runs)
    actions = runs.add_subparsers(dest="action", metavar="ACTION")
    rm = actions.add_parser(
        "rm",
        help="remove a stored run",
        description="Remove a stored run's folder. Refused while the run is in progress.",
    )
    rm.add_argument("id", metavar="ID", help="the run's id, or a start of it naming one run")
    # SUPPRESS: "runs --root DIR rm ID" keeps the --root given before "rm".
    rm.add_argument("--root", metavar="DIR", default=argparse.SUPPRESS, help=root_help)
    rm.set_defaults(handler=_runs_rm)
    again = actions.add_parser(
        "resume",
        help="pick up a stored batch_api run and wait for it to finish",
        description=(
            "Pick up a stored --batch-api run by its id: its batches in flight are followed "
            "again (never created again) and the rest of its turns are asked. The key comes "
            "from the environment. Ctrl-C leaves its batches running at the provider."
        ),
    )
    again.add_argument("id", metavar="ID", help="the run's id, or a start of it naming one run")
    again.add_argument("--root", metavar="DIR", default=argparse.SUPPRESS, help=root_help)
    again.set_defaults(handler=_runs_resume)
    config = commands.add_parser(
        "config",
        help="show every run option's value and where it comes from",
        description=(
            "Show every run option's value below the command line and where it comes from: "
            "an NBLLM_<OPTION> variable, the project's nbllm.toml (or [tool.nbllm] in "
            "pyproject.toml), the user's nbllm.toml, or the default. A key is never shown."
        ),
    )
    config.set_defaults(handler=_config)
    add_serve_parser(commands)
    return parser


def _config(args: argparse.Namespace) -> int:
    from nbllm.settings import show

    print(show())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nbllm`` console script; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else 0
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except NbllmError as exc:
        print(f"nbllm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nbllm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
