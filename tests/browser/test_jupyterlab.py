"""nbllm in a real JupyterLab, in a real (headless) browser, as a user sees it.

One JupyterLab session (module fixture ``lab``): JupyterLab on 127.0.0.1 (a free port, a
random token, every Jupyter directory and ``NBLLM_DIR`` in a temporary folder, news / update
checks / extension manager off); ``run_notebook.mjs`` opens ``batch.ipynb`` in Debian's
Chromium through playwright-core, runs all its cells from the Run menu, takes pictures of the
first ``%%llm_batch`` cell mid-run (also in a 600 px window) and of the run cells at the end,
saves the notebook with JupyterLab's Save and reports what the page showed, cell by cell. The
saved notebook is then rendered with ``jupyter nbconvert --to html``. The tests read that
report, the saved ``.ipynb`` (each run's ``result.summary``, printed as a
``SUMMARY name {...}`` line, and each cell's timing, which JupyterLab records) and the HTML:

- every cell ran, and the kernel took more work after a blocking run;
- mid-run the dashboard shows a partly filled bar, requests in flight, elapsed time and ETA,
  and fits a 600 px window;
- at the end the dashboard's figures (turns, failed, not run) and verdict are the summary's:
  for a clean run, one where a fifth of the requests fail, and one in the background stopped
  a third of the way (``job.stop()`` returns once the requests in flight have finished);
- a run against a port nothing listens on ends within 5 s with a one-line verdict;
- the stopped run's cell run again reads back what it kept and sends only the rest (the
  notebook asserts that the test server answered each turn once), and ``plot()`` draws an
  image;
- the saved notebook keeps no widget that a reopened notebook could not draw ("Error
  displaying widget"), and rendered by nbconvert shows each run's final state (its verdict).

The pictures are under the test's temporary folder (the paths are printed). With
``NBLLM_UPDATE_DOCS=1`` the mid-run one is also copied to ``docs/dashboard.png``, the
README's picture.

Needs ``/usr/bin/chromium`` (or ``NBLLM_CHROMIUM``), Node.js and ``tests/browser/node_modules``;
``bash tools/test.sh`` sets all of that up. Without them the tests are skipped, or fail when
``CI=true``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
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
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from helpers import visible_text

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
NOTEBOOK = HERE / "batch.ipynb"
DRIVER = HERE / "run_notebook.mjs"
DOCS_PICTURE = REPO / "docs" / "dashboard.png"

START_TIMEOUT_S = 45.0  # JupyterLab answering /api/status
BROWSER_TIMEOUT_S = 120.0  # the page opened, run, saved and read (run_notebook.mjs's deadline)
NBCONVERT_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
UNREACHABLE_WITHIN_S = 5.0
STOP_WITHIN_S = 3.0  # job.stop() with answers that take at most 0.4 s

# The cells, found by how their source starts.
FIRST_RUN = "%%llm_batch records -m nbllm-test --api-base {url} -o result "
NEXT_CELL = 'print("NEXT-CELL-RAN"'
FLAKY_RUN = "flaky_result = nbllm.run("
UNREACHABLE_RUN = "%%llm_batch records -m nbllm-test --api-base {dead_url}"
STOPPED_RUN = "%%llm_batch records -m nbllm-test --api-base {url} -o stopped "
STOP = "time.sleep(1.0)"
RESUMED_RUN = "%%llm_batch records -m nbllm-test --api-base {url} -o resumed "
PLOT = "resumed.plot()"
LAST_CELL = "server.stop()"
WIDGET = "application/vnd.jupyter.widget-view+json"

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
    # Every cell in the DOM, so the page can be read whole; each cell's start and end in
    # its metadata, so the saved notebook says how long a cell ran.
    _write_json(
        settings / "notebook-extension" / "tracker.jupyterlab-settings",
        {"windowingMode": "none", "recordTiming": True},
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


def _start_lab(
    root: Path, env: dict[str, str], token: str, log_path: Path
) -> subprocess.Popen[bytes]:
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
        return subprocess.Popen(
            cmd,
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _drive(
    node: str, options: dict[str, Any], env: dict[str, str], log_path: Path
) -> dict[str, Any]:
    """run_notebook.mjs's report."""
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
            f"run_notebook.mjs ran past {exc.timeout:.0f} s:\n{_log_tail(log_path)}", pytrace=False
        )
    stdout = done.stdout.decode(errors="replace")
    stderr = done.stderr.decode(errors="replace")
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        pytest.fail(
            f"run_notebook.mjs failed (exit {done.returncode}):\n{stdout}\n{stderr}", pytrace=False
        )
    report: dict[str, Any] = json.loads(lines[-1])
    return report


def _nbconvert(notebook: Path, out_dir: Path, env: dict[str, str]) -> str:
    """The notebook rendered by ``jupyter nbconvert --to html``, or why it could not be."""
    cmd = [sys.executable, "-m", "jupyter", "nbconvert", "--to", "html"]
    cmd += ["--output-dir", str(out_dir), str(notebook)]
    try:
        done = subprocess.run(
            cmd, env=env, capture_output=True, timeout=NBCONVERT_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        return f"(nbconvert ran past {NBCONVERT_TIMEOUT_S:.0f} s)"
    html_path = out_dir / f"{notebook.stem}.html"
    if done.returncode != 0 or not html_path.is_file():
        return f"(nbconvert failed, exit {done.returncode}: {done.stderr.decode()[-2000:]})"
    return html_path.read_text(encoding="utf-8")


@dataclass(frozen=True)
class LabRun:
    """What one JupyterLab session left: the page report, the saved notebook, its HTML."""

    report: dict[str, Any]
    saved: dict[str, Any]
    html: str
    tmp: Path
    log_path: Path

    @property
    def page(self) -> dict[str, Any]:
        page: dict[str, Any] = self.report.get("page") or {}
        return page

    def why(self) -> str:
        """The page report, the pictures and the server log: what a failure message needs."""
        report = {k: v for k, v in self.report.items() if k != "page"}
        cells = [
            {
                "source": c["source"][:80],
                "prompt": c["prompt"],
                "outputs": [{**o, "text": o["text"][:400]} for o in c["outputs"]],
            }
            for c in self.page.get("code_cells", [])
        ]
        return (
            f"\nreport: {json.dumps(report, indent=1)}\ncells: {json.dumps(cells, indent=1)}\n"
            f"pictures: {self.tmp}\nJupyterLab log (tail):\n{_log_tail(self.log_path)}"
        )

    def page_cell(self, prefix: str, page: dict[str, Any] | None = None) -> dict[str, Any]:
        """The code cell on the page (by default the one that ran the notebook) whose source
        starts with ``prefix``."""
        for cell in (page or self.page).get("code_cells", []):
            if cell["source"].startswith(prefix):
                found: dict[str, Any] = cell
                return found
        pytest.fail(f"no cell starting with {prefix!r} on the page{self.why()}", pytrace=False)

    def saved_cell(self, prefix: str) -> dict[str, Any]:
        """The code cell of the saved notebook whose source starts with ``prefix``."""
        for cell in self.saved.get("cells", []):
            if cell["cell_type"] == "code" and "".join(cell["source"]).startswith(prefix):
                found: dict[str, Any] = cell
                return found
        pytest.fail(f"no cell starting with {prefix!r} in the saved notebook", pytrace=False)

    def summary(self, name: str) -> dict[str, Any]:
        """The figures the notebook printed for run ``name`` (``SUMMARY name {...}``)."""
        for cell in self.saved.get("cells", []):
            for output in cell.get("outputs", []):
                for line in "".join(output.get("text", "")).splitlines():
                    if line.startswith(f"SUMMARY {name} "):
                        figures: dict[str, Any] = json.loads(line.split(" ", 2)[2])
                        return figures
        pytest.fail(f"the saved notebook has no SUMMARY line for {name}{self.why()}", pytrace=False)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabRun]:
    """batch.ipynb run in JupyterLab in Chromium, saved, and rendered by nbconvert."""
    chromium = _chromium()
    node = _node()
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        _unavailable("JupyterLab is not installed (pip install -e '.[test]')")

    tmp = tmp_path_factory.mktemp("jupyterlab")
    env = _jupyter_env(tmp)
    root = tmp / "lab-root"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    token = secrets.token_hex(24)
    base = ""
    log_path = tmp / "jupyterlab.log"
    proc = _start_lab(root, env, token, log_path)
    try:
        base = _wait_until_up(proc, Path(env["JUPYTER_RUNTIME_DIR"]), log_path)
        workspace = f"nbllm-{uuid.uuid4().hex[:12]}"
        options = {
            "url": f"{base}/lab/workspaces/{workspace}/tree/{NOTEBOOK.name}?token={token}&reset",
            "screenshot": str(tmp / "page-end.png"),
            "midrun_screenshot": str(tmp / "dashboard-midrun.png"),
            "narrow_screenshot": str(tmp / "dashboard-600px.png"),
            "end_screenshots": [
                [FIRST_RUN, str(tmp / "dashboard-end.png")],
                [FLAKY_RUN, str(tmp / "flaky-end.png")],
                [UNREACHABLE_RUN, str(tmp / "unreachable-end.png")],
                [STOPPED_RUN, str(tmp / "stopped-end.png")],
                [PLOT, str(tmp / "plot.png")],
            ],
            "reopen_url": (
                f"{base}/lab/workspaces/{workspace}-again/tree/{NOTEBOOK.name}?token={token}&reset"
            ),
            "reopened_screenshot": str(tmp / "reopened.png"),
            "cells": len(json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]),
            "timeout_s": BROWSER_TIMEOUT_S,
            "chromium": chromium,
        }
        report = _drive(node, options, env, log_path)
    finally:
        _stop(proc, base, token)

    (tmp / "page-report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    saved_path = root / NOTEBOOK.name
    saved = json.loads(saved_path.read_text(encoding="utf-8"))
    html = _nbconvert(saved_path, tmp / "html", env)
    print(f"\npictures and logs: {tmp}")
    print(f"browser timings (s): {report.get('timings')}")
    yield LabRun(report=report, saved=saved, html=html, tmp=tmp, log_path=log_path)


# --------------------------------------------------------------------------- reading figures


def _figure(text: str, pattern: str) -> int | None:
    """The number ``pattern`` captures in ``text``, in whichever of its groups matched
    (``1,234`` reads as 1234), or None."""
    found = re.search(pattern, text)
    if found is None:
        return None
    number = next(g for g in found.groups() if g is not None)
    return int(number.replace(",", ""))


def _dashboard_text(cell: dict[str, Any], *, leave_out: str = "") -> str:
    """The text of a cell's dashboard (its first output: the dashboard is shown before the
    run starts), without ``leave_out`` (the verdict, whose own figures are checked whole)."""
    text = str(cell["outputs"][0]["text"]) if cell["outputs"] else ""
    return text.replace(leave_out, " ") if leave_out else text


def _cell_text(cell: dict[str, Any]) -> str:
    return " ".join(str(o["text"]) for o in cell["outputs"])


def _turns(text: str) -> tuple[int, int] | None:
    """The turns bar's ``N / M turns``."""
    found = re.search(r"([\d,]+)\s*/\s*([\d,]+) turns", text)
    if found is None:
        return None
    return int(found.group(1).replace(",", "")), int(found.group(2).replace(",", ""))


def _cell_seconds(cell: dict[str, Any]) -> float:
    """How long a saved cell ran, from the timing JupyterLab records in its metadata."""
    timing = cell.get("metadata", {}).get("execution", {})

    def at(key: str) -> datetime:
        return datetime.fromisoformat(timing[key].replace("Z", "+00:00"))

    return (at("shell.execute_reply") - at("iopub.execute_input")).total_seconds()


def _html_cells(html: str) -> dict[str, str]:
    """nbconvert's HTML cut into its cells, by cell id (``id="cell-id=..."``)."""
    marks = list(re.finditer(r'id="cell-id=([^"]+)"', html))
    return {
        m.group(1): html[m.start() : marks[i + 1].start() if i + 1 < len(marks) else len(html)]
        for i, m in enumerate(marks)
    }


# --------------------------------------------------------------------------- the tests


def test_every_cell_runs_and_the_kernel_stays_healthy(lab: LabRun) -> None:
    page, why = lab.page, lab.why()
    assert page, f"run_notebook.mjs could not read the page: {lab.report.get('error')}{why}"
    cells = page["code_cells"]
    errors = [
        o for c in cells for o in c["outputs"] if o["mime"] == "application/vnd.jupyter.error"
    ]
    assert not errors, f"a cell raised: {errors}{why}"
    assert lab.report["ok"], f"the notebook did not finish in the browser{why}"
    assert page["busy_cells"] == 0, f"cells still queued or running{why}"
    assert all(re.fullmatch(r"\[\d+\]:", c["prompt"]) for c in cells), f"a cell did not run{why}"
    assert not page["loading_widget"], f'a widget is stuck at "Loading widget..."{why}'
    assert not page["widget_errors"], f'the page shows "Error displaying widget"{why}'
    # The cell right after the blocking run ran: the kernel took more work after it.
    sources = [c["source"] for c in cells]
    first_run = next(i for i, s in enumerate(sources) if s.startswith(FIRST_RUN))
    assert sources[first_run + 1].startswith(NEXT_CELL), why
    assert "NEXT-CELL-RAN 42" in _cell_text(cells[first_run + 1]), why
    assert "ALL-CELLS-RAN" in _cell_text(lab.page_cell(LAST_CELL)), why
    assert not lab.report["external_requests"], f"the page reached outside 127.0.0.1{why}"


def test_dashboard_mid_run(lab: LabRun) -> None:
    """Mid-run: a bar partly filled, requests in flight, elapsed time and ETA, no verdict
    yet. The picture is kept (with NBLLM_UPDATE_DOCS=1 it becomes the README's)."""
    midrun, why = lab.report.get("midrun"), lab.why()
    assert midrun, f"the first run was never seen with its bar between 1/3 and full{why}"
    picture = Path(midrun["screenshot"])
    assert picture.is_file(), why
    print(f"\nmid-run picture: {picture}")
    assert 0 < midrun["share"] < 1, why
    cell = midrun["after"]
    assert cell["prompt"] == "[*]:", f"the run had ended by the time of the picture{why}"
    text = _dashboard_text(cell)
    summary = lab.summary("result")
    turns = _turns(text)
    assert turns, f"no 'N / M turns' on the dashboard: {text!r}{why}"
    assert 0 < turns[0] < turns[1] == summary["turns"], text
    # A request counts as in flight from the moment it is sent (8 at a time here).
    in_flight = _figure(text, r"([\d,]+) in flight|in flight ([\d,]+)")
    assert in_flight, f"mid-run the dashboard shows no request in flight: {text!r}"
    assert "elapsed" in text, f"no elapsed time: {text!r}"
    assert "ETA" in text, f"no ETA: {text!r}"
    # How to stop it, while it runs (and only then: see the end's test).
    assert "to stop" in text, f"no word on stopping: {text!r}"
    assert summary["verdict"] not in _cell_text(cell), f"a verdict before the end: {text!r}"
    if os.environ.get("NBLLM_UPDATE_DOCS") == "1":
        DOCS_PICTURE.parent.mkdir(exist_ok=True)
        shutil.copyfile(picture, DOCS_PICTURE)
        print(f"copied to {DOCS_PICTURE}")


def test_dashboard_fits_a_600_px_window(lab: LabRun) -> None:
    """In a 600 px window the figures wrap: no output of the batch cell is cut off."""
    narrow, why = lab.report.get("narrow"), lab.why()
    assert narrow, f"the 600 px check did not run{why}"
    print(f"\n600 px picture: {narrow['screenshot']}")
    assert narrow["overflow_px"], why
    assert narrow["overflow_px"][0] == 0, (
        f"the dashboard is {narrow['overflow_px'][0]} px wider than a 600 px window's cell: "
        f"{_dashboard_text(narrow['cell'])!r}"
    )


@pytest.mark.parametrize(
    ("prefix", "name"),
    [(FIRST_RUN, "result"), (FLAKY_RUN, "flaky_result"), (STOPPED_RUN, "stopped")],
)
def test_dashboard_at_the_end_shows_the_summary(lab: LabRun, prefix: str, name: str) -> None:
    """The last state drawn is the summary's: its verdict, its turns, failed and not run;
    no hint about stopping or running is left behind. The runs: a clean one, one where a
    fifth of the requests fail, and one in the background stopped a third of the way."""
    summary, cell, why = lab.summary(name), lab.page_cell(prefix), lab.why()
    verdict = summary["verdict"]
    assert verdict in _cell_text(cell), f"the verdict {verdict!r} is not in the cell's output{why}"
    text = _dashboard_text(cell, leave_out=verdict)
    turns = _turns(text)
    assert turns, f"no 'N / M turns' on the dashboard: {text!r}{why}"
    # The bar counts the turns that ran, whether they were answered or failed.
    ran = summary["turns"] - summary["turns_not_run"]
    assert turns == (ran, summary["turns"]), f"{turns} for {summary}: {text!r}"
    for label, key in (("failed", "turns_failed"), ("not run", "turns_not_run")):
        shown = _figure(text, rf"([\d,]+) {label}\b|{label}:? ([\d,]+)")
        if shown is not None or summary[key]:
            assert shown == summary[key], (
                f"the dashboard shows {shown} {label}, the summary {summary[key]}: {text!r}"
            )
    assert "to stop" not in text, f"a stale hint about stopping: {text!r}"
    assert "running in the background" not in _cell_text(cell), _cell_text(cell)
    if name == "stopped":
        assert summary["interrupted"], summary
        assert summary["turns_not_run"] > 0, summary
        assert summary["turns_ok"] > 0, f"no answer kept: {summary}"
    if name == "flaky_result":
        # A fifth of the requests fail and none is retried: the errors are in sight.
        assert summary["turns_failed"] > 0, summary
        assert "ServerError" in text, f"no error kind on the dashboard: {text!r}"


def test_unreachable_server_ends_at_once_with_one_line(lab: LabRun) -> None:
    summary, why = lab.summary("unreachable"), lab.why()
    verdict = summary["verdict"]
    assert re.match(r"cannot reach http://127\.0\.0\.1:\d+/v1: ", verdict), verdict
    assert "\n" not in verdict, verdict
    assert summary["turns_ok"] == 0, summary
    assert summary["turns_failed"] + summary["turns_not_run"] == summary["turns"], summary
    assert verdict in _cell_text(lab.page_cell(UNREACHABLE_RUN)), why
    seconds = _cell_seconds(lab.saved_cell(UNREACHABLE_RUN))
    assert seconds <= UNREACHABLE_WITHIN_S, f"the run took {seconds:.1f} s to give up{why}"


def test_stop_returns_once_the_requests_in_flight_finish(lab: LabRun) -> None:
    """``job.stop()`` lets the requests in flight finish (answers take at most 0.4 s here)
    and returns the result: the cell's second of sleep plus little more."""
    seconds = _cell_seconds(lab.saved_cell(STOP))
    assert seconds <= 1.0 + STOP_WITHIN_S, f"sleep(1.0) and stop() took {seconds:.1f} s"


def test_resumed_run_plots_an_image(lab: LabRun) -> None:
    """The stopped run's cell again: what it kept is read back, the rest is sent, and
    ``plot()`` draws both."""
    summary, why = lab.summary("resumed"), lab.why()
    assert summary["resumed"] == lab.summary("stopped")["turns_ok"], summary
    assert summary["turns_ok"] == summary["turns"], summary
    assert any(o["images"] for o in lab.page_cell(PLOT)["outputs"]), f"plot() drew nothing{why}"
    saved = lab.saved_cell(PLOT)
    assert any("image/png" in o.get("data", {}) for o in saved["outputs"]), saved["outputs"]


RUNS = (
    (FIRST_RUN, "result"),
    (FLAKY_RUN, "flaky_result"),
    (UNREACHABLE_RUN, "unreachable"),
    (STOPPED_RUN, "stopped"),
    (RESUMED_RUN, "resumed"),
)


def test_reopened_notebook_shows_the_final_state(lab: LabRun) -> None:
    """Saved, its kernel shut down, opened again in a new window: each run's cell shows how
    it ended, and no widget says it cannot be displayed."""
    reopened, why = lab.report.get("reopened"), lab.why()
    assert reopened, f"the notebook was not opened again{why}"
    print(f"\nreopened: {reopened['screenshot']}")
    assert not reopened["widget_errors"], (
        f'the reopened notebook shows "Error displaying widget"{why}'
    )
    assert not reopened["loading_widget"], f'a widget is stuck at "Loading widget..."{why}'
    for prefix, name in RUNS:
        verdict = lab.summary(name)["verdict"]
        shown = _cell_text(lab.page_cell(prefix, reopened))
        assert verdict in shown, f"{name}: {verdict!r} is not shown when reopened: {shown!r}"


def test_saved_notebook_shows_the_final_state_in_nbconvert_html(lab: LabRun) -> None:
    """Reopened or exported, a saved notebook shows each run's final state (its verdict, in
    the run's own cell), not a widget that can no longer be drawn."""
    html = lab.html
    assert html.startswith("<"), html
    # A widget view whose model the notebook did not save: JupyterLab would show "Error
    # displaying widget" there when the notebook is reopened (nbconvert shows its text).
    saved_state = lab.saved.get("metadata", {}).get("widgets", {})
    models = saved_state.get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    views = [
        output["data"][WIDGET]["model_id"]
        for cell in lab.saved["cells"]
        for output in cell.get("outputs", [])
        if WIDGET in output.get("data", {})
    ]
    assert all(view in models for view in views), f"widget views with no saved model: {views}"
    cells = _html_cells(html)
    for prefix, name in RUNS:
        cell_id = lab.saved_cell(prefix)["id"]
        assert cell_id in cells, f"cell {cell_id} is not in the HTML"
        verdict = lab.summary(name)["verdict"]
        shown = visible_text(cells[cell_id])
        assert verdict in shown, f"{name}: {verdict!r} is not shown in the HTML: {shown[:2000]!r}"
