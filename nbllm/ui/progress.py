"""A text progress bar (tqdm) driven by executor events, for terminals and plain frontends."""

from __future__ import annotations

import sys
from typing import IO, Any

from nbllm.executor.events import Event, RetryScheduled, RunFinished, RunStarted, TurnFinished

__all__ = ["TextProgress"]


class TextProgress:
    """Turns done / total with errors and retries in the postfix; closes when the run ends."""

    def __init__(self, file: IO[str] | None = None) -> None:
        self.file = file
        self._bar: Any = None
        self._errors = 0
        self._retries = 0

    def __call__(self, event: Event) -> None:
        if isinstance(event, TurnFinished):
            if self._bar is not None:
                if event.record.error is not None:
                    self._errors += 1
                    self._bar.set_postfix(errors=self._errors, retries=self._retries, refresh=False)
                self._bar.update(1)
        elif isinstance(event, RetryScheduled):
            self._retries += 1
            if self._bar is not None:
                self._bar.set_postfix(errors=self._errors, retries=self._retries, refresh=False)
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
