"""Figures of a run, drawn with matplotlib (imported only when a plot is asked for)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nbllm.results import RunResult

__all__ = ["plot_result"]


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


def plot_result(result: RunResult, gpu_samples: Sequence[Any] | None = None) -> Any:
    """A 2x2 figure: latency by turn, turns in flight, throughput, and GPU use if sampled.

    ``gpu_samples``: ``GpuSample`` objects (``nbllm.ui.gpu``) taken during the run, by
    default the result's own ``gpu_samples``; without any the fourth panel says that no GPU
    was sampled.
    """
    from matplotlib.figure import Figure

    # Here, not at the top: RunResult.plot() imports this module, and the two modules
    # must not import each other when loaded.
    from nbllm.results import request_latency

    fig = Figure(figsize=(11, 7), layout="constrained")
    (ax_latency, ax_flight), (ax_rate, ax_gpu) = fig.subplots(2, 2)
    t0 = result.started_at

    by_turn: dict[int, list[float]] = defaultdict(list)
    for r in result.records:
        latency = request_latency(r)
        if latency is not None:
            by_turn[r.turn].append(latency)
    if by_turn:
        turns = sorted(by_turn)
        ax_latency.hist(
            [by_turn[t] for t in turns],
            bins=20,
            stacked=True,
            label=[f"turn {t}" for t in turns],
        )
        ax_latency.legend(fontsize="small")
    ax_latency.set_title("latency of answered turns, by turn")
    ax_latency.set_xlabel("seconds")
    ax_latency.set_ylabel("turns")

    spans = [
        (r.started_at - t0, r.finished_at - t0)
        for r in result.records
        if r.started_at is not None and r.finished_at is not None and r.attempts
    ]
    end = max((e for _, e in spans), default=result.wall_s) or 1.0
    grid = [end * i / 200 for i in range(201)]
    if spans:
        ax_flight.step(grid, _in_flight(spans, grid), where="post", color="#8172b2")
    ax_flight.set_title("turns in flight (first send to answer)")
    ax_flight.set_xlabel("seconds since start")
    ax_flight.set_ylabel("turns")

    finished = sorted(
        r.finished_at - t0 for r in result.records if r.finished_at is not None and r.attempts
    )
    if finished:
        width = max(0.1, finished[-1] / 60)
        bins = int(finished[-1] // width) + 1
        counts = [0] * bins
        for t in finished:
            counts[min(bins - 1, int(t // width))] += 1
        xs = [(i + 0.5) * width for i in range(bins)]
        ax_rate.plot(xs, [c / width for c in counts], color="#55a868", marker=".")
    ax_rate.set_title("throughput")
    ax_rate.set_xlabel("seconds since start")
    ax_rate.set_ylabel("turns finished / s")

    samples = list(result.gpu_samples if gpu_samples is None else gpu_samples)
    if samples:
        by_device: dict[Any, list[Any]] = defaultdict(list)
        for s in samples:
            by_device[(s.index, s.name)].append(s)
        for (index, name), rows in sorted(by_device.items(), key=lambda kv: kv[0][0]):
            points = [(s.t - t0, s.utilization_pct) for s in rows if s.utilization_pct is not None]
            if points:
                ax_gpu.plot(
                    [x for x, _ in points], [y for _, y in points], label=f"GPU {index} {name}"
                )
        ax_gpu.set_ylim(0, 100)
        ax_gpu.legend(fontsize="small")
    else:
        ax_gpu.text(0.5, 0.5, "no GPU sampled", ha="center", va="center", color="gray")
    ax_gpu.set_title("GPU utilisation")
    ax_gpu.set_xlabel("seconds since start")
    ax_gpu.set_ylabel("%")
    return fig
