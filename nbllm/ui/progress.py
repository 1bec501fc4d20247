"""Text progress driven by executor events: a tqdm bar on a terminal, plain lines elsewhere.

A bar redraws itself with carriage returns, which a log file or a pipe keeps as garbage;
where stderr is not a terminal, ``TextProgress(frames=False)`` writes whole lines instead.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO, Any

from nbllm.executor.events import (
    BatchUpdated,
    EnginePhase,
    Event,
    RetryScheduled,
    RunFinished,
    RunStarted,
    StopRequested,
    TurnFinished,
)
from nbllm.executor.stats import GENERATING, RunStats, batch_figures
from nbllm.ui.snapshot_text import (
    batch_line,
    blocking_batch_note,
    generated_text,
    phase_name,
    truncated_text,
)

__all__ = ["TextProgress"]


class TextProgress:
    """Turns done / total with failures and retries in the postfix; closes when the run ends.

    A local engine's preparation (``EnginePhase``) gets a bar of its own first; its
    "generating" count during the run and the answers ``max_tokens`` cut short join the
    postfix (``tokens``, ``cut``) once there are any, and so do a batch API's batches in
    flight (``batches``); each batch gets a line when it appears and when its status
    changes (not at every poll), and the first one a note on what a blocking run through a
    batch API means. The figures
    are read from ``stats``: by default one made here and fed with the events received; a
    ``RunStats`` passed in is fed by its maker (listening before this bar).

    ``frames=False`` (for a file or a pipe) draws no bar: one line when each preparation
    phase begins, one when the run starts, one when a stop is asked, one every
    ``line_every_s`` seconds while turns finish (turns done, failed, retries, answers cut
    short, tokens generated), the batches' lines, and the
    verdict at the end; ``clock`` (seconds) paces those lines.
    """

    # Requests in flight are not shown: no need for an event per send.
    event_types = (
        EnginePhase,
        RunStarted,
        RetryScheduled,
        TurnFinished,
        StopRequested,
        RunFinished,
        BatchUpdated,
    )

    def __init__(
        self,
        file: IO[str] | None = None,
        *,
        stats: RunStats | None = None,
        frames: bool = True,
        line_every_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        blocking: bool = True,
    ) -> None:
        self.file = file
        self.blocking = blocking  # a call that waits for the run: batches get a note on that
        self.stats = stats if stats is not None else RunStats()
        self.frames = frames
        self.line_every_s = line_every_s
        self._clock = clock
        self._line_at = 0.0
        self._feeds_stats = stats is None
        self._bar: Any = None
        self._phase_bar: Any = None
        self._phase: str | None = None
        # (failed, not run, retries, cut short, tokens generated, batches) in the postfix
        self._shown: tuple[int, ...] = (0, 0, 0, 0, 0, 0)
        self._batch_status: dict[str, str] = {}  # each batch's status, as last written
        self._counted_at = float("-inf")

    def __call__(self, event: Event) -> None:
        if self._feeds_stats:
            self.stats.update(event)
        if isinstance(event, BatchUpdated):
            self._batch_changed(event)
            return
        if not self.frames:
            self._write_line(event)
            return
        if isinstance(event, TurnFinished):
            if self._bar is not None:
                self._show_counts()
                self._bar.update(1)
        elif isinstance(event, RetryScheduled):
            if self._bar is not None:
                self._show_counts()
        elif isinstance(event, EnginePhase):
            if event.phase != GENERATING:
                self._show_phase(event)
            elif self._bar is not None:  # the run goes on: a figure, not a bar of its own
                # No turn may finish for a while (a slow CPU generation): redraw now.
                self._show_counts(refresh=True)
        elif isinstance(event, RunStarted):
            from tqdm import tqdm

            self._batch_status.clear()
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

    def _show_counts(self, *, final: bool = False, refresh: bool = False) -> None:
        """Failures and retries in the postfix, redrawn with the bar when one changed.

        A snapshot costs more than an event: counted at most ten times a second (as tqdm
        redraws), and exactly at the end.
        """
        now = time.monotonic()
        if now - self._counted_at < 0.1 and not final:
            return
        self._counted_at = now
        snap = self.stats.snapshot()
        shown = (
            snap.failed,
            snap.not_run,
            snap.retries,
            snap.truncated,
            snap.generated_tokens or 0,
            snap.batches_in_flight,
        )
        if shown != self._shown:
            self._shown = shown
            failed, not_run, retries, truncated, generated, batches = shown
            postfix = {"failed": failed, "retries": retries}
            if not_run:
                postfix["not_run"] = not_run
            if truncated:
                postfix["cut"] = truncated
            if generated:
                postfix["tokens"] = generated
            if batches:
                postfix["batches"] = batches
            self._bar.set_postfix(postfix, refresh=refresh)

    def _batch_changed(self, event: BatchUpdated) -> None:
        """A line when a batch appears or its status changes: a poll that changed nothing
        (every ``batch_poll_s``, for hours) says nothing."""
        before = self._batch_status.get(event.batch_id)
        if before == event.status:
            return
        first = not self._batch_status and self.blocking
        lines = [blocking_batch_note(self.stats.snapshot())] if first else []
        self._batch_status[event.batch_id] = event.status
        lines.append(batch_line(batch_figures(event, event.t)))
        for line in lines:
            if self._bar is not None:
                from tqdm import tqdm

                tqdm.write(f"nbllm: {line}", file=self.file or sys.stderr)
            else:
                self._print(line)
        if self._bar is not None:  # rare (a status change): counted at once, as at the end
            self._show_counts(final=True, refresh=True)

    # -- lines, for a file or a pipe ------------------------------------------------------

    def _print(self, text: str) -> None:
        print(f"nbllm: {text}", file=self.file or sys.stderr, flush=True)

    def _write_line(self, event: Event) -> None:
        if isinstance(event, EnginePhase):
            if event.phase != self._phase and event.phase != GENERATING:
                self._phase = event.phase
                detail = " ".join(event.detail.split())
                self._print(f"{phase_name(event.phase)}" + (f": {detail}" if detail else "…"))
        elif isinstance(event, RunStarted):
            self._batch_status.clear()
            self._phase = None
            self._line_at = self._clock()
            resumed = f", {event.resumed:,} resumed from the checkpoint" if event.resumed else ""
            self._print(
                f"started: {event.turns:,} turns in {event.conversations:,} conversations, "
                f"model {event.model}, engine {event.engine}{resumed}"
            )
        elif isinstance(event, TurnFinished):
            now = self._clock()
            if now - self._line_at >= self.line_every_s:
                self._line_at = now
                snap = self.stats.snapshot()
                line = (
                    f"{snap.turns_done:,}/{snap.turns_total:,} turns, {snap.failed:,} failed, "
                    f"{snap.retries:,} retries"
                )
                if snap.truncated:
                    line += f", {truncated_text(snap.truncated)}"
                if snap.generated_tokens:
                    line += f", {generated_text(snap.generated_tokens)}"
                self._print(line)
        elif isinstance(event, StopRequested):
            self._print(f"stopping ({event.in_flight} in flight)")
        elif isinstance(event, RunFinished):
            verdict = self.stats.snapshot().verdict
            if verdict:
                self._print(verdict)
