"""Figures of a run, drawn with matplotlib (this module is imported only when a plot is asked
for: ``RunResult.plot()`` imports it then).

The figure is a ``RunFigure``, a ``matplotlib.figure.Figure`` made without pyplot: nothing is
left open in pyplot, and Jupyter shows the returned figure once, as a PNG, whatever the backend
(a fresh kernel has no ``%matplotlib``; ``plot_result`` then registers a PNG formatter for
``RunFigure`` alone, leaving the user's other figures to their backend).

The time panels show only the requests this run sent. Rows read back from the checkpoint
(resumed) or answered from the cache carry no time of this run: they are left out, and a note
under the figure says how many.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from matplotlib.figure import Figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from nbllm.results import RunResult
    from nbllm.types import TurnRecord

__all__ = ["RunFigure", "plot_result"]

# Throughput bins: about this many finished turns a bin, between one and MAX_BINS bins.
TURNS_PER_BIN = 8
MAX_BINS = 60

_OK_COLOUR = "#55a868"
_FAILED_COLOUR = "#c44e52"
_FLIGHT_COLOUR = "#8172b2"
_LIMIT_COLOUR = "#dd8452"
_NOTE_COLOUR = "gray"


class RunFigure(Figure):
    """A run's figure (``plot_result``): a plain ``Figure`` that Jupyter shows as a PNG."""


def _in_flight(spans: Sequence[tuple[float, float]], grid: Sequence[float]) -> list[int]:
    """How many (start, end) spans cover each time of ``grid`` (a sweep over sorted ends)."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    out, level, i = [], 0, 0
    for t in grid:
        while i < len(events) and events[i][0] <= t:
            level += events[i][1]
            i += 1
        out.append(level)
    return out


def _throughput_bins(finished: Sequence[float], end: float) -> list[float]:
    """Bin edges over ``[0, end]`` sized to the run: about ``TURNS_PER_BIN`` finished turns a
    bin, so a short run draws a readable line instead of a sawtooth of near-empty bins."""
    bins = max(1, min(MAX_BINS, len(finished) // TURNS_PER_BIN))
    return [end * i / bins for i in range(bins + 1)]


def _span(record: TurnRecord, t0: float) -> tuple[float, float] | None:
    """The (first send, answer) seconds since ``t0`` of a request this run sent; None for a
    row with no time of this run (resumed, cached, never sent)."""
    start, end = record.started_at, record.finished_at
    if record.resumed or record.cached or not record.attempts:
        return None
    if start is None or end is None or start < t0:
        return None
    return start - t0, end - t0


def _left_out_note(left_out: Sequence[TurnRecord]) -> str | None:
    """One line naming the rows the time panels leave out, or None when there are none."""
    resumed = sum(r.resumed for r in left_out)
    cached = sum(r.cached and not r.resumed for r in left_out)
    not_run = sum(r.not_run and not r.resumed and not r.cached for r in left_out)
    # What is left sent nothing either: a failure before any attempt, a later turn skipped.
    unsent = len(left_out) - resumed - cached - not_run
    parts = [
        f"{count:,} {what}"
        for count, what in (
            (resumed, "resumed"),
            (cached, "cached"),
            (not_run, "not run"),
            (unsent, "never sent"),
        )
        if count
    ]
    if not parts:
        return None
    rows = "row" if len(left_out) == 1 else "rows"
    return f"not in the time panels (no request in this run): {', '.join(parts)} {rows}"


def _empty(ax: Axes, text: str) -> None:
    """A panel with nothing to draw says why, with no scale that would mean nothing."""
    ax.text(0.5, 0.5, text, ha="center", va="center", color=_NOTE_COLOUR, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _whole_numbers(ax: Axes) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _draw_latency(ax: Axes, records: Sequence[TurnRecord]) -> None:
    from nbllm.results import request_latency

    by_turn: dict[int, list[float]] = defaultdict(list)
    for r in records:
        latency = request_latency(r)
        if latency is not None:
            by_turn[r.turn].append(latency)
    if by_turn:
        turns = sorted(by_turn)
        ax.hist(
            [by_turn[t] for t in turns],
            bins=20,
            stacked=True,
            label=[f"turn {t}" for t in turns],
        )
        ax.legend(fontsize="small")
        _whole_numbers(ax)
    else:
        _empty(ax, "no turn was answered in this run")
    ax.set_title("latency of answered turns, by turn")
    ax.set_xlabel("seconds")
    ax.set_ylabel("turns")


def _draw_in_flight(ax: Axes, spans: Sequence[tuple[float, float]], end: float) -> None:
    if spans:
        grid = [end * i / 200 for i in range(201)]
        ax.step(grid, _in_flight(spans, grid), where="post", color=_FLIGHT_COLOUR)
        ax.set_ylim(bottom=0)
        _whole_numbers(ax)
    else:
        _empty(ax, "no request was sent in this run")
    ax.set_title("turns in flight (first send to answer)")
    ax.set_ylabel("turns")


def _draw_throughput(
    ax: Axes, ok: Sequence[float], failed: Sequence[float], end: float, wall_s: float
) -> None:
    if ok or failed:
        edges = _throughput_bins([*ok, *failed], end)
        width = edges[1] - edges[0]
        for times, colour, label in ((ok, _OK_COLOUR, "ok"), (failed, _FAILED_COLOUR, "failed")):
            if not times:
                continue
            counts = [0] * (len(edges) - 1)
            for t in times:
                counts[min(len(counts) - 1, max(0, int(t / width)))] += 1
            rate = len(times) / wall_s if wall_s > 0 else 0.0
            ax.stairs(
                [c / width for c in counts],
                edges,
                baseline=None,
                color=colour,
                linewidth=1.5,
                label=f"{label} (mean {rate:,.3g}/s)",
            )
        ax.set_ylim(bottom=0)
        ax.legend(fontsize="small")
    else:
        _empty(ax, "no request was sent in this run")
    ax.set_title("throughput")
    ax.set_ylabel("turns finished / s")


def _draw_limit(
    ax: Axes,
    history: Sequence[tuple[float, str, float]],
    kind: str,
    label: str,
    t0: float,
    end: float,
) -> None:
    """An "auto" limit over the run, as a dashed step line beside what it bounds."""
    points = [(max(0.0, t - t0), value) for t, k, value in history if k == kind]
    if not points:
        return
    xs = [x for x, _ in points] + [end]
    ys = [y for _, y in points] + [points[-1][1]]
    ax.step(xs, ys, where="post", color=_LIMIT_COLOUR, linestyle="--", linewidth=1, label=label)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize="small")


def _draw_gpu(ax: Axes, samples: Sequence[Any], t0: float) -> None:
    by_device: dict[tuple[int, str], list[Any]] = defaultdict(list)
    for s in samples:
        by_device[(s.index, s.name)].append(s)
    for (index, name), rows in sorted(by_device.items(), key=lambda kv: kv[0][0]):
        points = [(s.t - t0, s.utilization_pct) for s in rows if s.utilization_pct is not None]
        if points:
            ax.plot([x for x, _ in points], [y for _, y in points], label=f"GPU {index} {name}")
    ax.set_ylim(0, 100)
    ax.legend(fontsize="small")
    ax.set_title("GPU utilisation")
    ax.set_ylabel("%")


def _show_as_png_in_ipython() -> None:
    """Make IPython render a Figure as a PNG, once, when no backend has said how.

    ipykernel's inline backend registers this formatter only once pyplot is imported; a
    figure made without pyplot in a fresh kernel would show as ``<Figure size ...>`` text.
    A formatter someone already registered (``%matplotlib inline``, retina) is kept.
    """
    if "IPython" not in sys.modules:
        return  # a script: the caller saves or shows the figure itself
    from IPython import get_ipython

    shell = get_ipython()
    if shell is None:
        return
    from IPython.core.pylabtools import print_figure

    png = shell.display_formatter.formatters["image/png"]
    if png.for_type(RunFigure) is None:  # none for it, nor for Figure (%matplotlib inline)
        png.for_type(RunFigure, partial(print_figure, fmt="png", bbox_inches="tight"))


def plot_result(result: RunResult, gpu_samples: Sequence[Any] | None = None) -> RunFigure:
    """Latency by turn, then turns in flight, throughput and (when sampled) GPU use over time.

    ``gpu_samples``: ``GpuSample`` objects (``nbllm.ui.gpu``) taken during the run, by default
    the result's own ``gpu_samples``; without any there is no GPU panel. The time panels share
    one axis, seconds since the run started, and show only the requests this run sent.
    """
    t0 = result.started_at
    records = result.records
    row_spans = [(r, _span(r, t0)) for r in records]
    timed = [(r, span) for r, span in row_spans if span is not None]
    spans = [span for _, span in timed]
    ok = [end for r, (_, end) in timed if r.ok]
    failed = [end for r, (_, end) in timed if not r.ok]
    end = max([result.wall_s, *(e for _, e in spans)]) or 1.0
    samples = [
        s
        for s in (result.gpu_samples if gpu_samples is None else gpu_samples)
        if s.utilization_pct is not None
    ]

    time_panels = 3 if samples else 2
    fig = RunFigure(figsize=(11, 2.4 * time_panels + 0.4), layout="constrained")
    grid = fig.add_gridspec(time_panels, 2, width_ratios=(2, 3))
    ax_latency = fig.add_subplot(grid[:, 0])
    ax_flight = fig.add_subplot(grid[0, 1])
    ax_rate = fig.add_subplot(grid[1, 1], sharex=ax_flight)

    _draw_latency(ax_latency, records)
    _draw_in_flight(ax_flight, spans, end)
    _draw_throughput(ax_rate, ok, failed, end, result.wall_s)
    _draw_limit(ax_flight, result.limit_history, "concurrency", "concurrency limit", t0, end)
    _draw_limit(ax_rate, result.limit_history, "requests/s", "rpm limit (requests/s)", t0, end)
    time_axes = [ax_flight, ax_rate]
    if samples:
        ax_gpu = fig.add_subplot(grid[2, 1], sharex=ax_flight)
        _draw_gpu(ax_gpu, samples, t0)
        time_axes.append(ax_gpu)
    if spans:
        ax_flight.set_xlim(0, end)
    for ax in time_axes[:-1]:
        ax.tick_params(labelbottom=False)
    time_axes[-1].set_xlabel("seconds since the run started")

    note = _left_out_note([r for r, span in row_spans if span is None])
    if note is not None:
        fig.supxlabel(note, color=_NOTE_COLOUR, fontsize="small")
    _show_as_png_in_ipython()
    return fig
