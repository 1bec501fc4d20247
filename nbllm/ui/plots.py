"""Figures of a run, drawn with matplotlib (imported only when a plot is asked for)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nbllm.results import RunResult

__all__ = ["plot_result"]


def plot_result(result: RunResult) -> Any:
    """Latency histogram of answered turns, and turns finished per second over the run."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    ax_latency, ax_rate = fig.subplots(1, 2)
    latencies = [r.latency_s for r in result.records if r.ok and r.latency_s is not None]
    if latencies:
        ax_latency.hist(latencies, bins=min(40, max(5, len(latencies) // 5)), color="#4c72b0")
        s = result.summary
        for value, label in ((s.latency_p50, "p50"), (s.latency_p95, "p95")):
            if value is not None:
                ax_latency.axvline(value, color="#c44e52", linestyle="--", linewidth=1)
                ax_latency.annotate(label, (value, 0), xytext=(2, 2), textcoords="offset points")
    ax_latency.set_title("latency of answered turns")
    ax_latency.set_xlabel("seconds")
    ax_latency.set_ylabel("turns")

    finished = sorted(
        r.finished_at - result.started_at for r in result.records if r.finished_at is not None
    )
    if finished:
        width = max(1.0, finished[-1] / 60)
        bins = int(finished[-1] // width) + 1
        counts = [0] * bins
        for t in finished:
            counts[min(bins - 1, int(t // width))] += 1
        xs = [(i + 0.5) * width for i in range(bins)]
        ax_rate.plot(xs, [c / width for c in counts], color="#55a868", marker=".")
    ax_rate.set_title("throughput")
    ax_rate.set_xlabel("seconds since start")
    ax_rate.set_ylabel("turns finished / s")
    return fig
