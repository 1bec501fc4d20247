"""nbllm in a real JupyterLab, in a real (headless) browser.

The test starts JupyterLab on 127.0.0.1 (a free port, a random token, every Jupyter directory in
``tmp_path``, news / update checks / extension manager off), then ``run_notebook.mjs`` opens
``batch.ipynb`` in Debian's Chromium through playwright-core, runs all cells from the Run menu
and reports what the page shows. It passes when the batch cell's ipywidgets progress bar
(``.widget-hprogress``) reached 100 %, no widget is stuck at "Loading widget...", and the cell
right after the batch cell printed its marker, so the kernel is still healthy after the blocking
run (no cell left at ``[*]``).

Needs ``/usr/bin/chromium`` (or ``NBLLM_CHROMIUM``), Node.js and ``tests/browser/node_modules``;
``bash tools/test.sh`` sets all of that up. Without them the test is skipped, or fails when
``CI=true``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
NOTEBOOK = HERE / "batch.ipynb"
DRIVER = HERE / "run_notebook.mjs"
MARKER = "NEXT-CELL-RAN 42"

START_TIMEOUT_S = 45.0  # JupyterLab answering /api/status
BROWSER_TIMEOUT_S = 60.0  # the page opened, run, and read (run_notebook.mjs's own deadline)
STOP_TIMEOUT_S = 10.0

SETUP_HINT = "run `bash tools/test.sh` (it installs Debian's chromium and the node_modules here)"


def _unavailable(reason: str) -> None:
    message = f"{reason}; {SETUP_HINT}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _chromium() -> str:
    path = os.environ.get("NBLLM_CHROMIUM", "/usr/bin/chromium")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        _unavailable(f"no Chromium at {path}")
    return path


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        _unavailable("Node.js (`node`) is not on PATH")
    assert node is not None
    if not (HERE / "node_modules" / "playwright-core" / "package.json").is_file():
        _unavailable("tests/browser/node_modules has no playwright-core")
    return node


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def _jupyter_env(tmp_path: Path) -> dict[str, str]:
    """The environment of JupyterLab and its kernel: nothing of the user's is read or written."""
    dirs = {
        "HOME": tmp_path / "home",
        "JUPYTER_CONFIG_DIR": tmp_path / "jupyter-config",
        "JUPYTER_DATA_DIR": tmp_path / "jupyter-data",
        "JUPYTER_RUNTIME_DIR": tmp_path / "jupyter-runtime",
        "IPYTHONDIR": tmp_path / "ipython",
        "JUPYTERLAB_SETTINGS_DIR": tmp_path / "lab-settings",
        "JUPYTERLAB_WORKSPACES_DIR": tmp_path / "lab-workspaces",
    }
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update({name: str(path) for name, path in dirs.items()})
    env["JUPYTER_PLATFORM_DIRS"] = "1"
    env["NBLLM_DIR"] = str(tmp_path / ".nbllm")
    # The kernel ("python3") is this interpreter, with nbllm importable.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    for name in ("JUPYTER_TOKEN", "JUPYTER_PORT", "JUPYTER_PATH", "JUPYTER_CONFIG_PATH"):
        env.pop(name, None)

    settings = dirs["JUPYTERLAB_SETTINGS_DIR"] / "@jupyterlab"
    # No news and no update check (both would fetch from the internet), no toast asking.
    _write_json(
        settings / "apputils-extension" / "notification.jupyterlab-settings",
        {"fetchNews": "false", "checkForUpdates": False},
    )
    # Every cell in the DOM, so the page can be read whole.
    _write_json(
        settings / "notebook-extension" / "tracker.jupyterlab-settings",
        {"windowingMode": "none"},
    )
    _write_json(
        dirs["JUPYTER_CONFIG_DIR"] / "labconfig" / "page_config.json",
        {
            "disabledExtensions": {
                "@jupyterlab/apputils-extension:announcements": True,
                "@jupyterlab/extensionmanager-extension": True,
            }
        },
    )
    return env


def _log_tail(log_path: Path, chars: int = 4000) -> str:
    try:
        return log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def _wait_until_up(proc: subprocess.Popen[bytes], runtime_dir: Path, log_path: Path) -> str:
    """The server's base URL once ``/api/status`` answers.

    The port is read back from the server's own info file (``jpserver-<pid>.json``), in case the
    one asked for was taken in the meantime and the server moved on to another.
    """
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(
                f"JupyterLab exited with status {proc.returncode}:\n{_log_tail(log_path)}",
                pytrace=False,
            )
        for info_file in runtime_dir.glob("jpserver-*.json"):
            try:
                info = json.loads(info_file.read_text(encoding="utf-8"))
                base = f"http://127.0.0.1:{int(info['port'])}"
                url = f"{base}/api/status?token={info['token']}"
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return base
            except (ValueError, KeyError, urllib.error.URLError, OSError):
                pass
        if time.monotonic() > deadline:
            pytest.fail(
                f"JupyterLab did not answer within {START_TIMEOUT_S:.0f} s:\n{_log_tail(log_path)}",
                pytrace=False,
            )
        time.sleep(0.25)


def _stop(proc: subprocess.Popen[bytes], base: str, token: str) -> None:
    """Shut JupyterLab down with its kernels: the REST shutdown, then SIGTERM, then SIGKILL."""
    if proc.poll() is None and base:
        try:
            req = urllib.request.Request(f"{base}/api/shutdown?token={token}", method="POST")
            with urllib.request.urlopen(req, timeout=5):
                pass
        except (urllib.error.URLError, OSError):
            pass
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
        return
    except subprocess.TimeoutExpired:
        pass
    proc.terminate()
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
        return
    except subprocess.TimeoutExpired:
        pass
    # Its own process group (start_new_session=True): whatever it started and left behind.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=STOP_TIMEOUT_S)


def _describe(report: dict[str, object], screenshot: Path, log_path: Path) -> str:
    return (
        f"page report:\n{json.dumps(report, indent=1)}\n"
        f"screenshot: {screenshot}\nJupyterLab log (tail):\n{_log_tail(log_path)}"
    )


def test_batch_notebook_runs_in_jupyterlab(tmp_path: Path) -> None:
    chromium = _chromium()
    node = _node()
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        _unavailable("JupyterLab is not installed (pip install -e '.[test]')")

    env = _jupyter_env(tmp_path)
    root = tmp_path / "lab-root"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    token = secrets.token_hex(24)
    base = ""
    log_path = tmp_path / "jupyterlab.log"
    screenshot = tmp_path / "jupyterlab-batch.png"

    cmd = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        "--no-browser",
        "--allow-root",
        "--ip=127.0.0.1",
        f"--port={_free_port()}",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        base = _wait_until_up(proc, Path(env["JUPYTER_RUNTIME_DIR"]), log_path)
        workspace = f"nbllm-{uuid.uuid4().hex[:12]}"
        options = {
            "url": f"{base}/lab/workspaces/{workspace}/tree/{NOTEBOOK.name}?token={token}&reset",
            "screenshot": str(screenshot),
            "marker": MARKER,
            "cells": 6,
            "timeout_s": BROWSER_TIMEOUT_S,
            "chromium": chromium,
        }
        try:
            done = subprocess.run(
                [node, str(DRIVER), json.dumps(options)],
                cwd=HERE,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=BROWSER_TIMEOUT_S + 30,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            pytest.fail(
                f"run_notebook.mjs ran past {exc.timeout:.0f} s:\n{_log_tail(log_path)}",
                pytrace=False,
            )
        stdout = done.stdout.decode(errors="replace")
        stderr = done.stderr.decode(errors="replace")
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            pytest.fail(
                f"run_notebook.mjs failed (exit {done.returncode}):\n{stdout}\n{stderr}",
                pytrace=False,
            )
        report = json.loads(lines[-1])
    finally:
        _stop(proc, base, token)

    print(f"\nscreenshot: {screenshot}")
    print(f"browser timings (s): {report.get('timings')}")
    why = _describe(report, screenshot, log_path)
    page = report.get("page") or {}

    assert page, f"run_notebook.mjs could not read the page: {report.get('error')}\n{why}"
    assert page["cells"] == 6, why
    # The widget rendered (ipywidgets' manager is live in this JupyterLab) and was filled.
    assert page["progress"], f"no .widget-hprogress on the page\n{why}"
    assert not page["loading_widget"], f'a widget is stuck at "Loading widget..."\n{why}'
    assert any(page["progress_done"]), f"no progress bar reached 100 %\n{why}"
    # The cell right after the batch cell ran: the kernel took more work after the blocking run.
    assert page["batch_cell"] >= 0, why
    assert page["marker_found"], (
        f"{MARKER!r} is not on the page; cell prompts: {page['prompts']} "
        f"(a cell stuck at [*] means the kernel is wedged)\n{why}"
    )
    assert page["marker_cell"] == page["batch_cell"] + 1, why
    # Every code cell ran to the end, without an error.
    assert page["busy_cells"] == 0, f"cells still queued or running: {page['prompts']}\n{why}"
    assert all(p.strip("[]: ").isdigit() for p in page["prompts"]), why
    assert not page["errors"], why
    assert report["ok"], f"the notebook did not finish in the browser: {report.get('error')}\n{why}"
    assert not report["external_requests"], f"the page reached outside 127.0.0.1\n{why}"
    assert screenshot.is_file(), why
