"""How nbval runs the notebooks here: each in a kernel of its own, with a fresh NBLLM_DIR, its
cells together and in order whatever order the tests run in."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from nbval.plugin import IPyNbCell

# The folder under which each notebook gets its own NBLLM_DIR, made at the first notebook cell.
_NOTEBOOK_DIRS = pytest.StashKey[tempfile.TemporaryDirectory]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    """A notebook's kernel gets a fresh NBLLM_DIR of that notebook's own.

    nbval starts the kernel while it sets up the notebook's first cell, with this process's
    environment; the autouse ``_nbllm_dir`` fixture of ``tests/`` does not reach it (a cell is
    no test function). Without this, the kernel keeps checkpoints and cached answers in
    ``notebooks/.nbllm``, and a second run answers from them instead of sending requests.
    """
    if not isinstance(item, IPyNbCell):
        return (yield)
    stash = item.config.stash
    if _NOTEBOOK_DIRS not in stash:
        stash[_NOTEBOOK_DIRS] = tempfile.TemporaryDirectory(prefix="nbllm-notebooks-")
    notebook = item.parent.nodeid.replace("/", "_")
    folder = Path(stash[_NOTEBOOK_DIRS].name, notebook, ".nbllm")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NBLLM_DIR", str(folder))
        return (yield)


def pytest_unconfigure(config):
    """The notebooks' folders go once every kernel is stopped."""
    folders = config.stash.get(_NOTEBOOK_DIRS, None)
    if folders is not None:
        folders.cleanup()


def pytest_collection_modifyitems(items):
    """Put each notebook's cells back together, in notebook order, where its first one is.

    Tests run in random order (pytest-randomly, before this hook): the seed is in the header,
    ``-p randomly --randomly-seed=N`` repeats an order and ``-p no:randomly`` turns it off.
    It shuffles a notebook's cells like any items, but nbval runs them one after another in
    one kernel, each cell reading what the ones before it left.
    """
    cells: dict[str, list[IPyNbCell]] = {}
    for item in items:
        if isinstance(item, IPyNbCell):
            cells.setdefault(item.parent.nodeid, []).append(item)
    if not cells:
        return
    ordered = []
    for item in items:
        if not isinstance(item, IPyNbCell):
            ordered.append(item)
        elif item.parent.nodeid in cells:
            ordered.extend(sorted(cells.pop(item.parent.nodeid), key=lambda cell: cell.cell_num))
    items[:] = ordered
