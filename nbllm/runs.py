"""Stored runs: the checkpoints under ``.nbllm/runs/``, listed and removed.

::

    nbllm.runs.list_runs()          # one row per stored run, newest first
    nbllm.runs.remove("3dd51522")   # a run's id, or a unique start of it
    nbllm.runs.resume("3dd51522")   # a batch_api=True run, picked up in the background

``nbllm.runs.list`` is the same function under its first name.

Listing only reads: each checkpoint is opened read-only (and no SQLite side file is
created for it), and a file that cannot be read gets a row with an ``error`` instead of
stopping the listing. A run still in progress shows ``in_use=True`` and cannot be removed.
Checkpoints kept elsewhere (``checkpoint="some/path"``) are not listed.
"""

from __future__ import annotations

import builtins
import shutil
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbllm.errors import CheckpointError
from nbllm.executor.batch_journal import batches_in_flight
from nbllm.executor.checkpoint import CHECKPOINT_FILE, SCHEMA_VERSION
from nbllm.executor.storage import lock_holder, lock_if_free, lock_path, nbllm_dir, open_database

if TYPE_CHECKING:
    import pandas as pd

    from nbllm.jobs import Job

__all__ = ["list_runs", "remove", "resume"]

COLUMNS = (
    "id",
    "created",
    "updated",
    "model",
    "engine",
    "done",
    "total",
    "conversations",
    "batches_in_flight",
    "size_bytes",
    "in_use",
    "path",
    "error",
)


def _runs_dir(root: str | Path | None) -> Path:
    base = Path(root).expanduser() if root is not None else nbllm_dir()
    return base / "runs"


def _run_dirs(runs: Path) -> builtins.list[Path]:
    if not runs.is_dir():
        return []
    return sorted(p for p in runs.iterdir() if p.is_dir())


def _lock_path(folder: Path) -> Path:
    return lock_path(folder / CHECKPOINT_FILE)


def _in_use(folder: Path) -> bool:
    with lock_if_free(_lock_path(folder)) as free:
        return not free


def _size(folder: Path) -> int:
    total = 0
    for entry in folder.iterdir():
        try:
            if entry.is_file():
                total += entry.stat().st_size
        except OSError:  # removed while we looked
            continue
    return total


def _read(path: Path) -> dict[str, Any]:
    """The stored figures of one checkpoint file; raises CheckpointError if unusable."""
    if not path.is_file():
        msg = f"no {CHECKPOINT_FILE} in this folder"
        raise CheckpointError(msg)
    conn = open_database(
        path, kind="checkpoint", schema="", version=SCHEMA_VERSION, readonly=True, verify=False
    )
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        done = conn.execute("SELECT COUNT(*) FROM turns").fetchone()[0]
        batches = batches_in_flight(conn)
    except sqlite3.Error as exc:
        msg = f"{path}: not a readable nbllm checkpoint (SQLite says: {exc})"
        raise CheckpointError(msg) from exc
    finally:
        conn.close()
    return {"meta": meta, "done": done, "batches": batches}


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _integer(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _row(folder: Path) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row["id"] = folder.name
    row["path"] = str(folder)
    row["size_bytes"] = _size(folder)
    try:
        row["in_use"] = _in_use(folder)  # a lock file that is a symlink is refused
        found = _read(folder / CHECKPOINT_FILE)
    except CheckpointError as exc:
        row["error"] = str(exc)
        return row
    meta = found["meta"]
    row.update(
        created=_number(meta.get("created_at")),
        updated=_number(meta.get("updated_at")),
        model=meta.get("model"),
        engine=meta.get("engine"),
        done=found["done"],
        total=_integer(meta.get("turns")),
        conversations=_integer(meta.get("conversations")),
        batches_in_flight=found["batches"],
    )
    return row


def list_runs(root: str | Path | None = None) -> pd.DataFrame:
    """One row per stored run under ``<root>/runs/`` (``root``: ``$NBLLM_DIR`` or ``.nbllm``).

    Columns: ``id`` (the folder's name, for ``remove``), ``created`` / ``updated`` (UTC),
    ``model``, ``engine``, ``done`` (finished turns), ``total`` (turns), ``conversations``,
    ``batches_in_flight`` (batches of a provider's batch API, ``batch_api=True``, created
    and not yet collected: the provider may still be working on them, and running the same
    call again re-attaches to them; 0 for a run without any),
    ``size_bytes`` (the folder's files), ``in_use`` (a live run holds its lock), ``path``
    and ``error`` (why a run's file could not be read; its figures are then missing).
    Newest first. Nothing is written, not even to a damaged file.
    """
    import pandas as pd

    rows = [_row(folder) for folder in _run_dirs(_runs_dir(root))]
    frame = pd.DataFrame(rows, columns=builtins.list(COLUMNS))
    for column in ("created", "updated"):
        frame[column] = pd.to_datetime(frame[column].astype("float64"), unit="s", utc=True)
    for column in ("done", "total", "conversations", "batches_in_flight"):
        frame[column] = frame[column].astype("Int64")
    frame["size_bytes"] = frame["size_bytes"].astype("int64")
    frame["in_use"] = frame["in_use"].astype("bool")
    for column in ("id", "model", "engine", "path", "error"):
        frame[column] = frame[column].astype("object")
        frame[column] = frame[column].where(frame[column].notna(), None)
    frame = frame.sort_values(
        ["created", "id"], ascending=[False, True], na_position="last", kind="stable"
    )
    return frame.reset_index(drop=True)


# The first name of ``list_runs``, kept for code written against it. It hides the
# builtin in this module, whose code therefore says ``builtins.list``.
list = list_runs


def _find(run_id: str, runs: Path) -> Path:
    if not isinstance(run_id, str) or run_id in ("", ".", "..") or "/" in run_id or "\\" in run_id:
        msg = f"{run_id!r} is not a run id (see nbllm.runs.list_runs() or `nbllm runs`)"
        raise CheckpointError(msg)
    folders = _run_dirs(runs)
    names = [p.name for p in folders]
    if run_id in names:
        return runs / run_id
    matches = [name for name in names if name.startswith(run_id)]
    if len(matches) == 1:
        return runs / matches[0]
    if matches:
        msg = f"{run_id!r} matches {len(matches)} runs: {', '.join(matches)}; give more of the id"
        raise CheckpointError(msg)
    stored = ", ".join(names) if names else "none"
    msg = f"no stored run {run_id!r} under {runs} (stored runs: {stored})"
    raise CheckpointError(msg)


def remove(run_id: str, root: str | Path | None = None) -> Path:
    """Delete a stored run's folder (its checkpoint); returns the folder that was removed.

    ``run_id`` is an id from ``list_runs()`` or a start of one that names a single run. A run
    that is in progress (its lock is held) is refused, as are unknown and ambiguous ids
    and a run folder that is a symlink (deleting through it would empty its target):
    all with ``CheckpointError``, and nothing is deleted.
    """
    runs = _runs_dir(root)
    folder = _find(run_id, runs)
    if folder.is_symlink():
        msg = (
            f"{folder} is a symlink, not a run folder nbllm made; nbllm removes neither it nor "
            "its target. Remove the link yourself if it is not wanted"
        )
        raise CheckpointError(msg)
    with lock_if_free(_lock_path(folder)) as free:
        if not free:
            msg = (
                f"run {folder.name} is in use by a live run ({lock_holder(_lock_path(folder))}); "
                "wait for it to finish or stop it, then remove it"
            )
            raise CheckpointError(msg)
        # The lock is held while the run's files go, so no run can start on them meanwhile.
        lock = _lock_path(folder)
        for entry in folder.iterdir():
            if entry == lock:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    shutil.rmtree(folder)
    return folder


def resume(run_id: str, root: str | Path | None = None, **options: Any) -> Job:
    """Pick up a stored ``batch_api=True`` run in the background; returns its ``Job``.

    The run's conversations and plain options come from its checkpoint (``nbllm.run_call``);
    ``options`` are given again over them: the key (``api_key=``, else the environment's,
    as for any run), what was code or a class (a ``parse=`` or ``score=`` function,
    ``response_format=`` as a pydantic model, ``listeners=``, ``on_alert=``), or ``progress=``.
    Batches still in flight are followed again, never created again; answers that came
    back meanwhile are collected. A run whose call was not kept is a ``CheckpointError``.
    """
    from nbllm.jobs import submit
    from nbllm.run_call import call_of

    folder = _find(run_id, _runs_dir(root))
    path = folder / CHECKPOINT_FILE
    meta = _read(path)["meta"]
    conversations, kept = call_of(meta.get("call"), f"run {folder.name}")
    kept.update(options)
    kept["checkpoint"] = path
    params = kept.pop("params", {})  # sampling parameters go as keywords of their own
    return submit(conversations, **kept, **params)
