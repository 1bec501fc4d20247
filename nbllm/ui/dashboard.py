"""The notebook dashboard: live bars, figures, errors, GPU gauges and a Stop button for one run.

``Dashboard`` is an executor listener. Each event goes into its ``RunStats``
(``nbllm.executor.stats``) and marks the view stale; a ``RedrawTimer`` redraws the widgets
from a ``Snapshot`` at most ten times a second, at least once a second while the run goes
on, and once more when it ends, so the last state is always the one on show.

Displayed in a notebook, it leaves a static HTML rendering of its final state in place of
the widget when the run ends (``nbllm.ui.static_dashboard``), so a saved notebook shows
how the run ended without a kernel. Frontends without widgets get the same HTML, redrawn.
"""

from __future__ import annotations

import contextlib
import html
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nbllm.errors import ConfigError
from nbllm.executor.events import (
    Alert,
    BatchUpdated,
    BreakerChanged,
    EnginePhase,
    Event,
    LimitChanged,
    RequestSent,
    RetryScheduled,
    RunFinished,
    RunStarted,
    SharedQuota,
    StopRequested,
    TurnFinished,
)
from nbllm.executor.stats import GENERATING, RunStats, Snapshot
from nbllm.ui.gpu import GpuMonitor, GpuSample
from nbllm.ui.redraw import RedrawTimer
from nbllm.ui.snapshot_text import (
    bar_label,
    bar_style,
    batch_confirm_line,
    batch_lines,
    error_lines,
    figure_items,
    phase_text,
    status_line,
    summary_line,
)
from nbllm.ui.static_dashboard import (
    batches_html,
    dashboard_html,
    errors_html,
    figures_html,
    progress_html,
    title_html,
)

__all__ = ["Dashboard", "GpuGauges"]

# Drawn with the next redraw. A batch is polled every batch_poll_s: no hurry either.
_NOTICES = (SharedQuota, LimitChanged, BreakerChanged, Alert, BatchUpdated)

CONFIRM_S = 10.0
"""Seconds a Stop pressed while batches are in flight waits for the press that confirms it."""

log = logging.getLogger("nbllm")

_STOP_TOOLTIP = (
    "Stop: no new request is sent; the requests in flight finish and are kept. "
    "Press again to cancel them."
)
_CONFIRM_TOOLTIP = (
    "Press again to cancel the batches in flight and stop; the answers already returned "
    "are kept. An interrupt or a kernel restart does not cancel them."
)
_CANCEL_TOOLTIP = (
    "Cancel the requests still in flight: their turns are not run (running the same "
    "call again sends them)."
)


def _show(widget: Any, value: str) -> None:
    """Set an HTML widget's content; an empty one takes no room."""
    widget.value = value
    widget.layout.display = None if value else "none"


@dataclass(frozen=True, slots=True)
class GpuGauges:
    """One device's row: utilisation (%) and memory (MiB) bars and a label with the rest."""

    utilization: Any
    memory: Any
    label: Any
    row: Any


class _Warnings:
    """The ``nbllm`` logger's warnings while a run is shown: each message once (with how
    many times it came) among the dashboard's error lines, not as a stream of records under
    the cell. Alerts are left out: their ``Alert`` events show them already.

    One relay on the logger (``_RELAY``) hands the records to the dashboard whose run
    started last and is still shown; with none, records go where they went before."""

    def __init__(self, changed: Callable[[], None]) -> None:
        self._changed = changed
        self._seen: dict[str, int] = {}
        self._seen_lock = threading.Lock()

    def attach(self) -> None:
        _RELAY.show_in(self)

    def detach(self) -> None:
        _RELAY.leave(self)

    def add(self, record: logging.LogRecord) -> None:
        message = " ".join(record.getMessage().split())
        if message.startswith("nbllm alert:"):
            return
        with self._seen_lock:
            self._seen[message] = self._seen.get(message, 0) + 1
        self._changed()

    def lines(self) -> list[str]:
        """The latest three messages, each once."""
        with self._seen_lock:
            seen = list(self._seen.items())
        return [f"warning: {m}" + (f" ({n:,}x)" if n > 1 else "") for m, n in seen[-3:]]


class _Relay(logging.Handler):
    """On the ``nbllm`` logger while a dashboard shows a run (see ``_Warnings``)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self._target: weakref.ref[_Warnings] | None = None

    def show_in(self, warnings: _Warnings) -> None:
        self._target = weakref.ref(warnings)
        if self not in log.handlers:
            log.addHandler(self)

    def leave(self, warnings: _Warnings) -> None:
        if self._target is not None and self._target() is warnings:
            self._target = None
            log.removeHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        target = self._target() if self._target is not None else None
        if target is None:  # its dashboard has gone: the record goes where it would have
            log.removeHandler(self)
            if logging.lastResort is not None:
                logging.lastResort.handle(record)
            return
        target.add(record)


_RELAY = _Relay()


class Dashboard:
    """Live view of a run in a notebook; pass it in ``listeners=`` and ``display()`` it.

    ``stop``: called by the Stop button (first press: let the requests in flight finish;
    second press: cancel them); without it there is no button, and the dashboard says how
    to stop a blocking run instead. While a batch API's batches are in flight, a stop
    cancels them, work the provider may have half done: the first press only asks ("Cancel
    N batches?"), and a second within ``CONFIRM_S`` seconds (of ``clock``) stops.
    ``gpu``: False hides the GPU gauges; None or True shows a row per device where there is
    one (nothing where there is none). ``max_updates_per_s``: the most redraws a second.
    ``clock``: monotonic seconds, for the redraw timer and that confirmation. ``stats``: a
    ``RunStats`` that something else feeds (listening before the dashboard), shared by
    every view of the run; by default the dashboard makes one and feeds it the events it
    receives.

    Widgets, for reading their state: ``widget`` (the whole VBox), ``title``, ``phase``,
    ``turns_bar`` / ``turns_label``, ``conversations_bar`` / ``conversations_label``,
    ``figures``, ``batches``, ``errors``, ``status``, ``stop_button``, ``gpu_gauges`` (one
    per device).
    ``widget`` is None where ipywidgets cannot be used; the text and HTML still work.
    """

    event_types = (
        EnginePhase,
        RunStarted,
        RequestSent,
        RetryScheduled,
        TurnFinished,
        StopRequested,
        RunFinished,
        # What the limits and the deployments are doing: shown among the errors.
        SharedQuota,
        LimitChanged,
        BreakerChanged,
        Alert,
        BatchUpdated,  # batch_api=True: the batches in flight, under the figures
    )

    def __init__(
        self,
        stop: Callable[[], None] | None = None,
        *,
        gpu: bool | None = None,
        max_updates_per_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        stats: RunStats | None = None,
    ) -> None:
        if not max_updates_per_s > 0:
            msg = f"max_updates_per_s must be a number > 0, got {max_updates_per_s!r}"
            raise ConfigError(msg)
        self.stats = stats if stats is not None else RunStats()
        self._feeds_stats = stats is None
        self.gpu_monitor = GpuMonitor() if gpu is not False else None
        self.gpu_found = self.gpu_monitor.available() if self.gpu_monitor is not None else False
        self._stop = stop
        self._stops_asked = 0
        self._clock = clock
        # Until when (of ``clock``) a press confirms a stop that cancels batches, and how many.
        self._confirm: tuple[float, int] | None = None
        self._finished = False
        self._closed = False
        self._cancel_at: float | None = None  # Unix time the grace for in-flight ends
        self._display_id: str | None = None
        self._render_lock = threading.Lock()
        self._timer = RedrawTimer(
            lambda: self.render(),  # looked up at each draw, as any caller would
            max_per_s=max_updates_per_s,
            clock=clock,
            name="nbllm-dashboard",
        )
        self.gpu_gauges: list[GpuGauges] = []
        self.warnings = _Warnings(self._timer.changed)
        self.widget: Any = None
        try:
            self._build()
        except Exception:
            log.debug("nbllm: no widgets, the dashboard falls back to HTML", exc_info=True)
            self.widget = None
        self.render()

    # -- listener ------------------------------------------------------------------

    def __call__(self, event: Event) -> None:
        if self._feeds_stats:
            self.stats.update(event)
        kind = type(event)
        if kind is TurnFinished or kind is RequestSent or kind in _NOTICES:  # as little as can be
            self._timer.changed()
            return
        if isinstance(event, EnginePhase) and event.phase == GENERATING:
            if not self._finished:  # a late count must not wake a finished view
                self._timer.changed()
            return
        try:
            self._on_run_event(event)
        except Exception:
            # The event bus drops a listener that raises: leave no thread behind.
            self._stop_updates()
            with contextlib.suppress(Exception):
                self.close()
            raise

    def _on_run_event(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self._finished = self._closed = False
            self._cancel_at = None
            self.warnings.attach()
            if self.gpu_monitor is not None and self.gpu_found:
                self.gpu_monitor.start()
            self.render()
        elif isinstance(event, StopRequested):
            self._cancel_at = event.t + event.grace_s
            self.render()  # the words change at once: the user pressed something
        elif isinstance(event, RunFinished):
            self._finished = True
            self.close()
            return
        self._timer.changed()

    def close(self) -> None:
        """The run is over for this view (also when it failed before its end): stop the
        redraws and the GPU sampling, draw the last state, and where the dashboard was
        displayed, leave its static HTML in place of the widget. Any number of times."""
        self._stop_updates()
        if self._closed:
            return
        self._closed = True
        self.render()
        self._leave_static_html()

    def _stop_updates(self) -> None:
        self.warnings.detach()
        self._timer.stop()
        if self.gpu_monitor is not None:
            self.gpu_monitor.stop()

    # -- display -------------------------------------------------------------------

    def _ipython_display_(self) -> None:
        """Shown by IPython's ``display``: the widget, under an id that lets the end of the
        run put the static rendering in its place."""
        from IPython.display import display

        self._display_id = self._display_id or f"nbllm-dashboard-{uuid.uuid4().hex}"
        display(self._repr_mimebundle_(), raw=True, display_id=self._display_id)

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        snap = self.stats.snapshot()
        bundle: dict[str, Any] = {}
        widget_bundle = getattr(self.widget, "_repr_mimebundle_", None)
        if callable(widget_bundle):
            bundle.update(widget_bundle(**kwargs))
        else:
            bundle["text/html"] = self.html(snap)
        bundle["text/plain"] = summary_line(snap)
        return bundle

    def __str__(self) -> str:
        return summary_line(self.stats.snapshot())

    def html(self, snap: Snapshot | None = None) -> str:
        """The dashboard as static HTML (for ``snap``, or now): what a saved notebook keeps."""
        snap = snap if snap is not None else self.stats.snapshot()
        gpu = self.gpu_monitor.latest() if self.gpu_monitor is not None else []
        return dashboard_html(
            snap,
            status=self._status(snap),
            errors=error_lines(snap) + self.warnings.lines(),
            phase=phase_text(snap),
            gpu=gpu,
            batches=batch_lines(snap, blocking=self._stop is None),
        )

    def _leave_static_html(self) -> None:
        """Put the final HTML where the widget was, then close the widget: a notebook saved
        now, reopened later or exported, shows how the run ended instead of an error."""
        if self._display_id is None:
            return
        self._show_html(self.stats.snapshot())
        if self.widget is not None:
            for widget in self._all_widgets():
                widget.close()

    def _all_widgets(self) -> list[Any]:
        """Every widget model of the dashboard, its layouts and styles included (each is a
        model of its own in the kernel and in a notebook's saved widget state)."""
        found, todo = [], [self.widget]
        while todo:
            widget = todo.pop()
            found.append(widget)
            todo.extend(getattr(widget, "children", ()))
            todo.extend(
                part
                for part in (getattr(widget, "layout", None), getattr(widget, "style", None))
                if part is not None
            )
        return found

    # -- widgets -------------------------------------------------------------------

    def _build(self) -> None:
        import ipywidgets as widgets

        self._widgets = widgets

        # A layout each: rows are hidden one by one (a shared Layout would hide them all).
        def bar_layout() -> Any:
            return widgets.Layout(width="50%", min_width="8em")

        def wide() -> Any:
            return widgets.Layout(width="100%")

        self.title = widgets.HTML()
        self.phase = widgets.HTML(layout=wide())
        self.turns_bar = widgets.IntProgress(min=0, max=0, value=0, layout=bar_layout())
        self.turns_label = widgets.Label()
        self.conversations_bar = widgets.IntProgress(min=0, max=0, value=0, layout=bar_layout())
        self.conversations_label = widgets.Label()
        self.figures = widgets.HTML(layout=wide())
        self.batches = widgets.HTML(layout=wide())
        self.errors = widgets.HTML(layout=wide())
        self.status = widgets.HTML(layout=wide())
        self.gpu_box = widgets.VBox([])
        self.stop_button = None
        self._bar_rows = (
            widgets.HBox([self.turns_bar, self.turns_label]),
            widgets.HBox([self.conversations_bar, self.conversations_label]),
        )
        rows = [
            self.title,
            self.phase,
            *self._bar_rows,
            self.figures,
            self.batches,
            self.errors,
            self.gpu_box,
            self.status,
        ]
        if self._stop is not None:
            self.stop_button = widgets.Button(
                description="Stop", icon="stop", tooltip=_STOP_TOOLTIP
            )
            self.stop_button.on_click(self._on_stop_click)
            rows.append(self.stop_button)
        self.widget = widgets.VBox(rows, layout=widgets.Layout(max_width="100%"))

    def _on_stop_click(self, _button: Any = None) -> None:
        if self._stop is None or self._finished or self._stops_asked >= 2:
            return  # the run is over (a click from code still reaches here), or cancelled
        if self._stops_asked == 0 and self._confirming() is None:
            batches = self.stats.snapshot().batches_in_flight
            if batches:  # a stop cancels them: ask first, a misclick costs hours
                self._confirm = (self._clock() + CONFIRM_S, batches)
                self.render()
                return
        confirmed, self._confirm = self._confirm is not None, None
        self._stops_asked += 1
        self._show_stop_state()
        self._stop()
        if confirmed:
            self.render()  # the question goes at once, not with the stop's event

    def _confirming(self) -> int | None:
        """The batches a press now would cancel, while a first press waits for its second;
        None when none waits (or it waited too long: the next press asks again)."""
        if self._confirm is None:
            return None
        until, batches = self._confirm
        if self._stops_asked or self._finished or self._clock() > until:
            self._confirm = None
            return None
        return batches

    def _show_stop_state(self) -> None:
        """The button says what its next press does."""
        button = self.stop_button
        if button is None:
            return
        batches = self._confirming()
        if batches is not None:
            button.description = f"Cancel {batches:,} batch{'' if batches == 1 else 'es'}?"
            button.button_style = "danger"
            button.tooltip = _CONFIRM_TOOLTIP
        elif self._finished:
            button.disabled = True
            button.description = "stopped" if self._stops_asked else "Stop"
        elif self._stops_asked == 1:
            button.description = "Cancel in-flight"
            button.button_style = "warning"
            button.tooltip = _CANCEL_TOOLTIP
        elif self._stops_asked >= 2:
            button.disabled = True
            button.description = "cancelling…"
        elif button.button_style == "danger":  # the confirmation lapsed: a plain Stop again
            button.description = "Stop"
            button.button_style = ""
            button.tooltip = _STOP_TOOLTIP

    def _status(self, snap: Snapshot) -> str:
        batches = self._confirming()
        if batches is not None:
            return batch_confirm_line(batches)
        if self._closed and not snap.finished:
            return "the run ended before it finished" if snap.started else "the run did not start"
        left = None
        if self._cancel_at is not None:
            left = max(0.0, self._cancel_at - time.time())
        return status_line(snap, background=self._stop is not None, grace_left_s=left)

    def render(self) -> None:
        """Redraw from a fresh snapshot (any thread; the redraw timer calls it)."""
        with self._render_lock:
            snap = self.stats.snapshot()
            if self.widget is not None:
                self._draw(snap)
            elif self._display_id is not None and not self._finished:
                self._show_html(snap)

    def _show_html(self, snap: Snapshot) -> None:
        """Put the HTML for ``snap`` in place of what the dashboard displayed."""
        from IPython.display import update_display

        bundle = {"text/html": self.html(snap), "text/plain": summary_line(snap)}
        update_display(bundle, raw=True, display_id=self._display_id)

    def _draw(self, snap: Snapshot) -> None:
        """Set every widget from ``snap`` (and the GPU monitor's latest samples)."""
        waiting = snap.model is None and snap.phase is None
        self.title.value = title_html(snap) + (" · waiting for the run to start" if waiting else "")
        phase = phase_text(snap)
        _show(self.phase, progress_html(snap.phase_done, snap.phase_total, phase) if phase else "")
        for row in self._bar_rows:  # the turns' bars come once the preparation is over
            row.layout.display = "none" if phase else None
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
            label.value = bar_label(done, total, unit)
        _show(self.figures, figures_html(figure_items(snap)) if snap.started and not phase else "")
        _show(self.batches, batches_html(batch_lines(snap, blocking=self._stop is None)))
        _show(self.errors, errors_html(error_lines(snap) + self.warnings.lines()))
        status = self._status(snap)
        weight = "600" if snap.finished else "normal"
        line = f'<div style="font-weight:{weight};line-height:1.5">{html.escape(status)}</div>'
        _show(self.status, line if status else "")
        if snap.stopping and self._stops_asked == 0:
            self._stops_asked = 1  # stopped from elsewhere (job.stop()): the next press cancels
        self._show_stop_state()
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
                row = widgets.HBox([utilization, memory, label], layout={"flex_flow": "row wrap"})
                self.gpu_gauges.append(GpuGauges(utilization, memory, label, row))
            self.gpu_box.children = [g.row for g in self.gpu_gauges]
        for gauges, sample in zip(self.gpu_gauges, samples, strict=True):
            gauges.utilization.value = min(100.0, sample.utilization_pct or 0.0)
            total = sample.memory_total_mib
            if total:
                gauges.memory.max = total
                gauges.memory.value = min(total, sample.memory_used_mib or 0.0)
            gauges.label.value = sample.describe()
