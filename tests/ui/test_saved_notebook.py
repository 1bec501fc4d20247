"""A notebook saved after its runs shows how each ended, without the kernel that ran it.

Executed in a fresh kernel (nbclient, which keeps what a saved notebook keeps: every output,
display updates applied, widget state in the metadata), then exported by nbconvert as HTML:
each run's dashboard is left as static HTML saying how the run ended (the verdict), whether it
ran blocking (the magic, ``nbllm.run``), in the background (``nbllm.submit``), failed in part,
or could not reach its server; no output is a widget that only a live kernel could draw.
"""

from __future__ import annotations

import socket

import pytest
from helpers import visible_text

from nbllm.testing import TestServer

nbclient = pytest.importorskip("nbclient")
nbconvert = pytest.importorskip("nbconvert")
nbformat = pytest.importorskip("nbformat")

WIDGET = "application/vnd.jupyter.widget-view+json"


def _dead_url() -> str:
    """An API base on a port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def test_a_saved_notebook_shows_each_runs_final_state_in_nbconvert_html(tmp_path):
    cell = nbformat.v4.new_code_cell
    dead = _dead_url()
    with TestServer(latency=0.01) as server, TestServer(faults={"server_error": 0.5}) as flaky:
        options = f"model='nbllm-test', api_base={server.url!r}, checkpoint=False"
        nb = nbformat.v4.new_notebook()
        nb.cells = [
            cell(
                "%load_ext nbllm\n"
                "import nbllm\n"
                "data = [{'id': i, 'turns': [f'hello {i}', 'and?']} for i in range(6)]"
            ),
            cell(f"%llm_batch data -m nbllm-test --api-base {server.url} --no-checkpoint -o magic"),
            cell(
                f"flaky = nbllm.run(data, model='nbllm-test', api_base={flaky.url!r}, "
                "retries=0, checkpoint=False, cache=False)"
            ),
            cell(f"job = nbllm.submit(data, cache=False, {options})"),
            cell("background = job.result(timeout=30)"),
            cell(
                "unsent = [{'id': i, 'turns': [f'anyone there {i}?']} for i in range(6)]\n"
                f"%llm_batch unsent -m nbllm-test --api-base {dead} --no-checkpoint -o dead"
            ),
            cell(
                "for name in ('magic', 'flaky', 'background', 'dead'):\n"
                "    print(name, '=', globals()[name].summary.verdict)"
            ),
        ]
        client = nbclient.NotebookClient(
            nb, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        )
        client.execute()

    verdicts = dict(
        line.split(" = ", 1) for line in nb.cells[-1].outputs[0]["text"].splitlines() if line
    )
    assert verdicts["magic"].startswith("12/12 turns ok"), verdicts
    assert verdicts["background"].startswith("12/12 turns ok"), verdicts
    assert "failed" in verdicts["flaky"], verdicts
    assert verdicts["dead"].startswith(f"cannot reach {dead}: "), verdicts

    # No widget left to draw: reopened without the kernel, JupyterLab would show "Error
    # displaying widget" there, and nbconvert its "VBox(...)" text.
    for executed in nb.cells:
        for output in executed.outputs:
            assert WIDGET not in output.get("data", {}), (executed.source, output)
    # Each run's own cell, exported alone, says how the run ended.
    for name, run_cell in (("magic", 1), ("flaky", 2), ("background", 3), ("dead", 5)):
        only = nbformat.v4.new_notebook(cells=[nb.cells[run_cell]])
        html, _ = nbconvert.HTMLExporter().from_notebook_node(only)
        assert verdicts[name] in visible_text(html), (name, nb.cells[run_cell].outputs)
