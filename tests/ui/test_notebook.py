"""nbllm in a fresh Jupyter kernel (nbclient): ``result.plot()`` is one PNG with no
``%matplotlib``, after a run and after a fully resumed run of the same call; the magic shows
the verdict once and a preview of the first rows."""

from __future__ import annotations

import pytest

from nbllm.testing import TestServer

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")


def _texts(output: dict) -> list[str]:
    """Every text an output shows: a stream's text, a display's text/plain and text/html."""
    if output["output_type"] == "stream":
        return [output["text"]]
    data = output.get("data", {})
    return [data.get("text/plain", ""), data.get("text/html", "")]


def test_plot_shows_one_png_in_a_fresh_kernel_also_after_a_resumed_run(tmp_path):
    cell = nbformat.v4.new_code_cell
    with TestServer() as server:
        run = (
            f"nbllm.run(data, model='nbllm-test', api_base={server.url!r}, "
            "checkpoint='answers', concurrency=4)"
        )
        nb = nbformat.v4.new_notebook()
        nb.cells = [
            cell(
                "import nbllm\n"
                "data = [{'id': i, 'turns': [f'hello {i}', 'and?']} for i in range(6)]\n"
                f"res = {run}\n"
                "assert res.summary.turns_ok == 12, res"
            ),
            cell("res.plot()"),
            cell(f"again = {run}\nassert again.df['resumed'].all(), again.df"),
            cell("again.plot()"),
            cell(
                "%load_ext nbllm\n"
                f"%llm_batch data -m nbllm-test --api-base {server.url} --checkpoint answers "
                "--concurrency 4 -o magic"
            ),
        ]
        client = nbclient.NotebookClient(
            nb, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        )
        client.execute()
        assert len(server.requests) == 12  # the re-run sent nothing

    for plot in (nb.cells[1], nb.cells[3]):
        (output,) = plot.outputs
        assert output["output_type"] == "execute_result"
        assert output["data"]["image/png"]
    verdict = "12/12 turns ok"
    magic = nb.cells[4].outputs
    assert sum(any(verdict in text for text in _texts(output)) for output in magic) == 1
    (preview,) = [o for o in magic if "nbllm-preview" in o.get("data", {}).get("text/html", "")]
    assert "12 rows of magic.df" in preview["data"]["text/html"]

    for executed in nb.cells:
        for output in executed.outputs:
            if "image/png" not in output.get("data", {}):
                assert not any("<Figure" in text for text in _texts(output)), output
