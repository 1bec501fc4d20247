"""A text progress bar (tqdm) driven by executor events, for terminals and plain frontends."""

from __future__ import annotations

import sys
import time
from typing import IO, Any

from nbllm.executor.events import (
    EnginePhase,
    Event,
    RetryScheduled,
    RunFinished,
    RunStarted,
    StopRequested,
    TurnFinished,
)
from nbllm.executor.stats import RunStats
from nbllm.ui.snapshot_text import phase_name

__all__ = ["TextProgress"]


class TextProgress:
    """Turns done / total with failures and retries in the postfix; closes when the run ends.

    A local engine's preparation (``EnginePhase``) gets a bar of its own first. The figures
    are read from ``stats``: by default one made here and fed with the events received; a
    ``RunStats`` passed in is fed by its maker (listening before this bar).
    """

    # Requests in flight are not shown: no need for an event per send.
    event_types = (
        EnginePhase,
        RunStarted,
        RetryScheduled,
        TurnFinished,
        StopRequested,
        RunFinished,
    )

    def __init__(self, file: IO[str] | None = None, *, stats: RunStats | None = None) -> None:
        self.file = file
        self.stats = stats if stats is not None else RunStats()
        self._feeds_stats = stats is None
        self._bar: Any = None
        self._phase_bar: Any = None
        self._phase: str | None = None
        self._shown: tuple[int, ...] = (0, 0, 0)  # (failed, not run, retries) in the postfix
        self._counted_at = float("-inf")

    def __call__(self, event: Event) -> None:
        if self._feeds_stats:
            self.stats.update(event)
        if isinstance(event, TurnFinished):
            if self._bar is not None:
                self._show_counts()
                self._bar.update(1)
        elif isinstance(event, RetryScheduled):
            if self._bar is not None:
                self._show_counts()
        elif isinstance(event, EnginePhase):
            self._show_phase(event)
        elif isinstance(event, RunStarted):
            from tqdm import tqdm

            self._close_phase()
            self._bar = tqdm(
                total=event.turns,
                unit="turn",
                desc=f"nbllm {event.model}",
                file=self.file or sys.stderr,
                dynamic_ncols=True,
            )
        elif isinstance(event, StopRequested):
            if self._bar is not None:
                self._bar.set_description_str(f"stopping ({event.in_flight} in flight)")
        elif isinstance(event, RunFinished):
            self._close_phase()
            if self._bar is not None:
                self._show_counts(final=True)
                self._bar.close()
                self._bar = None

    def _show_phase(self, event: EnginePhase) -> None:
        from tqdm import tqdm

        if event.phase != self._phase:
            self._close_phase()
            self._phase = event.phase
            self._phase_bar = tqdm(
                total=event.total,
                desc=phase_name(event.phase),
                file=self.file or sys.stderr,
                dynamic_ncols=True,
            )
        bar = self._phase_bar
        if event.total is not None and bar.total != event.total:
            bar.total = event.total
        if event.done is not None:
            bar.update(event.done - bar.n)

    def _close_phase(self) -> None:
        if self._phase_bar is not None:
            self._phase_bar.close()
        self._phase_bar = None
        self._phase = None

    def _show_counts(self, *, final: bool = False) -> None:
        """Failures and retries in the postfix, redrawn with the bar when one changed.

        A snapshot costs more than an event: counted at most ten times a second (as tqdm
        redraws), and exactly at the end.
        """
        now = time.monotonic()
        if now - self._counted_at < 0.1 and not final:
            return
        self._counted_at = now
        snap = self.stats.snapshot()
        shown = (snap.failed, snap.not_run, snap.retries)
        if shown != self._shown:
            self._shown = shown
            failed, not_run, retries = shown
            postfix = {"failed": failed, "retries": retries}
            if not_run:
                postfix["not_run"] = not_run
            self._bar.set_postfix(postfix, refresh=False)
