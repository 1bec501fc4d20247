"""The notebook dashboard: live bars, figures, GPU gauges and a Stop button for one run.

``Dashboard`` is an executor listener. Each event goes into its ``RunStats``
(``nbllm.executor.stats``); at most ``max_updates_per_s`` times a second (and always at the
start and the end of a run) the widgets are redrawn from a ``Snapshot`` of it, in whichever
thread delivers the events.
Frontends without widgets get a one-line text summary instead.
"""

from __future__ import annotations

import html
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nbllm.executor.events import Event, RetryScheduled, RunFinished, RunStarted, TurnFinished
from nbllm.executor.stats import RunStats, Snapshot
from nbllm.ui.gpu import GpuMonitor, GpuSample

__all__ = [
    "Dashboard",
    "GpuGauges",
    "bar_style",
    "figures_line",
    "format_duration",
    "summary_line",
]

log = logging.getLogger("nbllm")


def format_duration(seconds: float | None) -> str:
    """``"42 s"``, ``"3 min 05 s"``, ``"2 h 07 min"``; ``"-"`` when unknown."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "-"
    total = round(max(0.0, seconds))
    if total < 60:
        return f"{total} s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 100 else f"{value:,.0f}"


def _latency(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _cost(usd: float | None) -> str:
    if usd is None:
        return "-"
    return f"${usd:.4f}" if usd < 10 else f"${usd:,.2f}"


def _errors(n: int) -> str:
    return f"{n:,} error" if n == 1 else f"{n:,} errors"


def _end(snap: Snapshot) -> str:
    word = "stopped after" if snap.interrupted else "done in"
    return f"{word} {format_duration(snap.elapsed_s)}"


def summary_line(snap: Snapshot) -> str:
    """``"nbllm: 120/300 turns, 2 errors, 35.2 req/s, ETA 5 s"``."""
    if not snap.started:
        return "nbllm: waiting for the run to start"
    parts = [f"{snap.turns_done:,}/{snap.turns_total:,} turns", _errors(snap.errors)]
    if snap.finished:
        parts.append(_end(snap))
    else:
        parts += [f"{_rate(snap.requests_per_s)} req/s", f"ETA {format_duration(snap.eta_s)}"]
    return "nbllm: " + ", ".join(parts)


def figures_line(snap: Snapshot) -> str:
    """Every figure of the snapshot but the bars', on one line."""
    parts = [
        f"in flight {snap.in_flight:,}",
        f"{_rate(snap.requests_per_s)} req/s",
        f"{_rate(snap.tokens_per_s)} tok/s",
        f"latency p50 {_latency(snap.latency_p50)}, p95 {_latency(snap.latency_p95)}",
        f"retries {snap.retries:,}",
        _errors(snap.errors),
        f"cached {snap.cached:,}",
        f"resumed {snap.resumed:,}",
        f"cost {_cost(snap.cost_usd)}",
        _end(snap) if snap.finished else f"ETA {format_duration(snap.eta_s)}",
    ]
    return " · ".join(parts)


def bar_style(snap: Snapshot) -> str:
    """Red from the first error row to the end; orange when stopped early; green when done."""
    if snap.errors:
        return "danger"
    if snap.interrupted:
        return "warning"
    if snap.finished:
        return "success"
    return ""


def _gpu_text(sample: GpuSample) -> str:
    def number(value: float | None, unit: str) -> str:
        return "-" if value is None else f"{value:,.0f} {unit}"

    memory = "-"
    if sample.memory_used_mib is not None and sample.memory_total_mib is not None:
        memory = f"{sample.memory_used_mib:,.0f} / {sample.memory_total_mib:,.0f} MiB"
    return " · ".join(
        [
            f"GPU {sample.index} {sample.name}",
            number(sample.utilization_pct, "%"),
            memory,
            number(sample.temperature_c, "°C"),
            number(sample.power_w, "W"),
        ]
    )


@dataclass(frozen=True, slots=True)
class GpuGauges:
    """One device's row: utilisation (%) and memory (MiB) bars and a label with the rest."""

    utilization: Any
    memory: Any
    label: Any
    row: Any


class Dashboard:
    """Live view of a run in a notebook; pass it in ``listeners=`` and ``display()`` it.

    ``stop``: called (once) by the Stop button; without it there is no button.
    ``gpu``: False hides the GPU gauges; None or True shows them, or "no GPU found".
    ``clock``: monotonic seconds, for the redraw throttle (tests pass a fake one).
    ``stats``: the ``RunStats`` that the events go into and the widgets are drawn from.

    Widgets, for reading their state: ``widget`` (the whole VBox), ``title``,
    ``turns_bar`` / ``turns_label``, ``conversations_bar`` / ``conversations_label``,
    ``figures``, ``stop_button``, ``gpu_gauges`` (one per device), ``gpu_label``.
    ``widget`` is None where ipywidgets cannot be used; the text summary still works.
    """

    # Requests in flight also come with each TurnFinished: no need for an event per send.
    event_types = (RunStarted, RetryScheduled, TurnFinished, RunFinished)

    def __init__(
        self,
        stop: Callable[[], None] | None = None,
        *,
        gpu: bool | None = None,
        max_updates_per_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not max_updates_per_s > 0:
            msg = f"max_updates_per_s must be positive, got {max_updates_per_s!r}"
            raise ValueError(msg)
        self.stats = RunStats()
        self.gpu_monitor = GpuMonitor() if gpu is not False else None
        self.gpu_found = self.gpu_monitor.available() if self.gpu_monitor is not None else False
        self._stop = stop
        self._stop_requested = False
        self._min_interval_s = 1.0 / max_updates_per_s
        self._clock = clock
        self._render_lock = threading.Lock()
        self._last_render = float("-inf")
        self.gpu_gauges: list[GpuGauges] = []
        self.widget: Any = None
        try:
            self._build()
        except Exception:
            log.debug("nbllm: no widgets, the dashboard falls back to text", exc_info=True)
            self.widget = None
        self.render()

    # -- listener ------------------------------------------------------------------

    def __call__(self, event: Event) -> None:
        try:
            self.stats.update(event)
            if isinstance(event, RunStarted):
                if self.gpu_monitor is not None and self.gpu_found:
                    self.gpu_monitor.start()
                self.render()
            elif isinstance(event, RunFinished):
                self.close()
                self.render()
            elif self._clock() - self._last_render >= self._min_interval_s:
                self.render()
        except Exception:
            self.close()  # the event bus drops a listener that raises: leave no thread behind
            raise

    def close(self) -> None:
        """Stop sampling the GPU; the widgets keep showing the last state."""
        if self.gpu_monitor is not None:
            self.gpu_monitor.stop()

    # -- display -------------------------------------------------------------------

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        text = summary_line(self.stats.snapshot())
        bundle: dict[str, Any] = {}
        widget_bundle = getattr(self.widget, "_repr_mimebundle_", None)
        if callable(widget_bundle):
            bundle.update(widget_bundle(**kwargs))
        bundle["text/plain"] = text
        return bundle

    def __str__(self) -> str:
        return summary_line(self.stats.snapshot())

    # -- widgets -------------------------------------------------------------------

    def _build(self) -> None:
        import ipywidgets as widgets

        self._widgets = widgets
        bar_layout = widgets.Layout(width="50%")
        self.title = widgets.HTML()
        self.turns_bar = widgets.IntProgress(min=0, max=0, value=0, layout=bar_layout)
        self.turns_label = widgets.Label()
        self.conversations_bar = widgets.IntProgress(min=0, max=0, value=0, layout=bar_layout)
        self.conversations_label = widgets.Label()
        self.figures = widgets.Label()
        self.gpu_label = None
        if self.gpu_monitor is not None and not self.gpu_found:
            self.gpu_label = widgets.Label("no GPU found", style={"text_color": "gray"})
        self.gpu_box = widgets.VBox([self.gpu_label] if self.gpu_label is not None else [])
        self.stop_button = None
        rows = [
            self.title,
            widgets.HBox([self.turns_bar, self.turns_label]),
            widgets.HBox([self.conversations_bar, self.conversations_label]),
            self.figures,
            self.gpu_box,
        ]
        if self._stop is not None:
            self.stop_button = widgets.Button(
                description="Stop",
                icon="stop",
                tooltip="Start no new turn; the requests in flight finish",
            )
            self.stop_button.on_click(self._on_stop_click)
            rows.append(self.stop_button)
        else:
            # A blocking cell keeps the kernel from handling button clicks until it ends,
            # so a blocking run offers the kernel's interrupt instead of a dead button.
            rows.append(
                widgets.Label(
                    "Interrupt the kernel (■) to stop; finished turns are kept.",
                    style={"text_color": "gray"},
                )
            )
        self.widget = widgets.VBox(rows)

    def _on_stop_click(self, _button: Any = None) -> None:
        if self._stop_requested or self._stop is None:
            return
        if self.stop_button is not None and self.stop_button.disabled:
            return  # the run is over; a click from code still reaches here
        self._stop_requested = True
        if self.stop_button is not None:
            self.stop_button.disabled = True
            self.stop_button.description = "stopping…"
        self._stop()

    def render(self) -> None:
        """Redraw every widget from a fresh snapshot (the throttle's clock restarts)."""
        with self._render_lock:
            self._last_render = self._clock()
            if self.widget is not None:
                self._draw(self.stats.snapshot())

    def _draw(self, snap: Snapshot) -> None:
        """Set every widget from ``snap`` (and the GPU monitor's latest samples)."""
        if snap.model is None:
            self.title.value = "<b>nbllm</b> · waiting for the run to start"
        else:
            self.title.value = (
                f"<b>nbllm</b> · {html.escape(snap.model)} · {html.escape(snap.engine or '')}"
            )
        style = bar_style(snap)
        for bar, label, done, total, unit in (
            (self.turns_bar, self.turns_label, snap.turns_done, snap.turns_total, "turns"),
            (
                self.conversations_bar,
                self.conversations_label,
                snap.conversations_done,
                snap.conversations_total,
                "conversations",
            ),
        ):
            bar.max = total  # before the value, which is clamped to it
            bar.value = min(done, total)
            bar.bar_style = style
            label.value = f"{done:,} / {total:,} {unit}"
        self.figures.value = figures_line(snap)
        if snap.finished and self.stop_button is not None:
            self.stop_button.disabled = True
            if self._stop_requested:
                self.stop_button.description = "stopped"
        if self.gpu_monitor is not None and self.gpu_found:
            self._render_gpu(self.gpu_monitor.latest())

    def _render_gpu(self, samples: list[GpuSample]) -> None:
        widgets = self._widgets
        if len(samples) != len(self.gpu_gauges):
            self.gpu_gauges = []
            for _ in samples:
                utilization = widgets.FloatProgress(min=0.0, max=100.0, description="util")
                memory = widgets.FloatProgress(min=0.0, max=1.0, description="memory")
                label = widgets.Label()
                row = widgets.HBox([utilization, memory, label])
                self.gpu_gauges.append(GpuGauges(utilization, memory, label, row))
            self.gpu_box.children = [g.row for g in self.gpu_gauges]
        for gauges, sample in zip(self.gpu_gauges, samples, strict=True):
            gauges.utilization.value = min(100.0, sample.utilization_pct or 0.0)
            total = sample.memory_total_mib
            if total:
                gauges.memory.max = total
                gauges.memory.value = min(total, sample.memory_used_mib or 0.0)
            gauges.label.value = _gpu_text(sample)
