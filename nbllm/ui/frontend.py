"""Which live progress a run shows: the dashboard in a notebook, tqdm in a terminal, or none.

The public faces (``nbllm.run``, ``nbllm.submit``) ask here, lazily, so that a plain
``import nbllm`` never loads IPython or ipywidgets.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from nbllm.executor.events import Event
from nbllm.executor.stats import RunStats
from nbllm.results import RunResult

__all__ = ["progress_listener", "with_gpu_samples"]


def _in_notebook() -> bool:
    """Whether this code runs in a Jupyter kernel (where widgets can be shown)."""
    if "IPython" not in sys.modules:
        return False
    from IPython import get_ipython

    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def progress_listener(
    progress: bool | None,
    *,
    stop: Callable[[], None] | None = None,
    stats: RunStats | None = None,
) -> Callable[[Event], None] | None:
    """The live progress for ``progress=``: the dashboard in a notebook, tqdm in a terminal.

    Call it in the thread that runs the cell, so the dashboard lands in that cell's output,
    and before the engine is made, so a local engine's preparation shows in it too.
    ``None`` means: in a notebook or a terminal, not when output goes to a file or a pipe;
    ``True`` there writes plain lines instead of a bar (``TextProgress(frames=False)``).
    ``stop`` gives the dashboard a Stop button (only useful where the kernel is free to
    handle the click, i.e. for a run in the background); it is called once per press (the
    first lets the requests in flight finish, the second cancels them).
    ``stats``: the run's ``RunStats`` when something else already feeds it (a job, listening
    before the view), so that every view of the run reads one; by default the view makes
    the run's ``RunStats`` and feeds it. The view has it as ``.stats`` either way.
    """
    if progress is False:
        return None
    if _in_notebook():
        try:
            from nbllm.ui.dashboard import Dashboard
        except ImportError:  # ipywidgets missing: text it is
            pass
        else:
            from IPython.display import display

            dashboard = Dashboard(stop=stop, stats=stats)
            display(dashboard)
            return dashboard
    terminal = sys.stderr.isatty()
    if progress is None and not terminal:
        return None
    from nbllm.ui.progress import TextProgress

    # Asked for where stderr is a file or a pipe: lines, never a bar's carriage returns.
    # A run with a stop callable is in the background: no note that the call blocks.
    return TextProgress(stats=stats, frames=terminal, blocking=stop is None)


def with_gpu_samples(result: RunResult, progress: Any) -> RunResult:
    """Hand the GPU readings the dashboard took during the run to the result's plots."""
    monitor = getattr(progress, "gpu_monitor", None)
    if monitor is not None:
        result.gpu_samples = [s for device in monitor.history() for s in device]
    return result
