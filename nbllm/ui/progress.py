"""A text progress bar (tqdm) driven by executor events, for terminals and plain frontends."""

from __future__ import annotations

import sys
from typing import IO, Any

from nbllm.executor.events import Event, RetryScheduled, RunFinished, RunStarted, TurnFinished
from nbllm.executor.stats import RunStats

__all__ = ["TextProgress"]


class TextProgress:
    """Turns done / total with errors and retries in the postfix; closes when the run ends.

    The figures are read from ``stats``, fed with the same events.
    """

    # Requests in flight are not shown: no need for an event per send.
    event_types = (RunStarted, RetryScheduled, TurnFinished, RunFinished)

    def __init__(self, file: IO[str] | None = None) -> None:
        self.file = file
        self.stats = RunStats()
        self._bar: Any = None
        self._shown = (0, 0)  # (errors, retries) in the postfix

    def __call__(self, event: Event) -> None:
        self.stats.update(event)
        if isinstance(event, TurnFinished):
            if self._bar is not None:
                self._show_counts()
                self._bar.update(1)
        elif isinstance(event, RetryScheduled):
            if self._bar is not None:
                self._show_counts()
        elif isinstance(event, RunStarted):
            from tqdm import tqdm

            self._bar = tqdm(
                total=event.turns,
                unit="turn",
                desc=f"nbllm {event.model}",
                file=self.file or sys.stderr,
                dynamic_ncols=True,
            )
        elif isinstance(event, RunFinished) and self._bar is not None:
            self._bar.close()
            self._bar = None

    def _show_counts(self) -> None:
        """Errors and retries in the postfix, redrawn with the bar when either changed."""
        shown = (self.stats.errors, self.stats.retries)
        if shown != self._shown:
            self._shown = shown
            errors, retries = shown
            self._bar.set_postfix(errors=errors, retries=retries, refresh=False)
