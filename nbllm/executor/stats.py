"""A run's figures, accumulated from the executor's events: what every view reads.

The notebook dashboard, the terminal progress bar and jobs each feed a ``RunStats`` with
the events they receive and read their figures from it; a metrics exporter plugs in the
same way. Each finished row is counted by ``nbllm.results.RowTotals``, the rules that the
end-of-run ``RunSummary`` counts the final rows with, so a live figure and the summary's
mean the same thing. What only a live view has is computed here: the pace over a recent
window, the ETA, the requests in flight, and retries as they are scheduled.

``RunStats.update(event)`` runs for every event (thousands a second), so it does a few
additions and appends and nothing more; ``snapshot()`` does the rest (window sums,
percentiles) at the pace a view redraws. One thread may write while another reads.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

from nbllm.executor.events import (
    Event,
    RequestSent,
    RetryScheduled,
    RunFinished,
    RunStarted,
    TurnFinished,
)
from nbllm.results import RowTotals, percentile

__all__ = ["RunStats", "Snapshot"]

WINDOW_S = 5.0
"""Rates and the ETA follow the turns finished in the last this-many seconds."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A run's figures at one moment. Rates are per second over the recent window.

    Latencies (seconds) are of answered requests sent in this run: cached and resumed
    rows sent none. ``errors`` counts rows without an answer (failed or skipped);
    ``retries`` counts the retries scheduled in this run. ``cost_usd`` is ``None`` while no
    row has a known cost. ``eta_s`` is ``None`` until there is a pace to go by, and once
    the run was interrupted.
    """

    model: str | None = None
    engine: str | None = None
    turns_done: int = 0
    turns_total: int = 0
    conversations_done: int = 0
    conversations_total: int = 0
    in_flight: int = 0
    requests_per_s: float | None = None
    tokens_per_s: float | None = None
    latency_p50: float | None = None
    latency_p95: float | None = None
    retries: int = 0
    errors: int = 0
    cached: int = 0
    resumed: int = 0
    eta_s: float | None = None
    cost_usd: float | None = None
    elapsed_s: float = 0.0
    started: bool = False
    finished: bool = False
    interrupted: bool = False


class RunStats:
    """Accumulates events into the figures of ``Snapshot``; a new ``RunStarted`` starts over.

    An event listener itself (``listeners=[stats]``). ``turns_done``, ``errors`` and
    ``retries`` are plain counts, cheap enough to read after every event; ``snapshot``
    gives every figure.
    """

    def __init__(self, window_s: float = WINDOW_S) -> None:
        if window_s <= 0:
            msg = f"window_s must be positive, got {window_s!r}"
            raise ValueError(msg)
        self.window_s = window_s
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._model: str | None = None
        self._engine: str | None = None
        self._turns_total = 0
        self._conversations_total = 0
        self._conversations_done = 0
        self._in_flight = 0
        self._retries = 0
        self._rows = RowTotals()
        self._started_t: float | None = None
        self._finished_t: float | None = None
        self._wall_s: float | None = None
        self._interrupted = False
        # (finish time, requests sent, tokens) of this run's turns in the recent window,
        # with their running sums. Resumed rows stay out: read back from the checkpoint in a
        # burst at the start, they are not this run's pace.
        self._window: deque[tuple[float, int, int]] = deque()
        self._window_turns = 0
        self._window_requests = 0
        self._window_tokens = 0

    def update(self, event: Event) -> None:
        with self._lock:
            if self._started_t is None:
                self._started_t = event.t
            if isinstance(event, TurnFinished):
                self._turn_finished(event)
            elif isinstance(event, RequestSent):
                self._in_flight = event.in_flight
            elif isinstance(event, RetryScheduled):
                self._retries += 1
            elif isinstance(event, RunStarted):
                self._reset()
                self._started_t = event.t
                self._model, self._engine = event.model, event.engine
                self._turns_total = event.turns
                self._conversations_total = event.conversations
            elif isinstance(event, RunFinished):
                self._finished_t = event.t
                self._wall_s = event.wall_s
                self._interrupted = event.interrupted
                self._in_flight = 0

    __call__ = update

    def _turn_finished(self, event: TurnFinished) -> None:
        record = event.record
        rows = self._rows
        tokens_before = rows.prompt_tokens + rows.completion_tokens
        rows.add(record)
        self._in_flight = event.in_flight
        if event.conversation_done:
            self._conversations_done += 1
        if record.resumed:
            return
        # The row's tokens as the totals count them: one rule for both.
        tokens = rows.prompt_tokens + rows.completion_tokens - tokens_before
        window = self._window
        window.append((event.t, record.attempts, tokens))
        self._window_turns += 1
        self._window_requests += record.attempts
        self._window_tokens += tokens
        horizon = event.t - self.window_s
        while window[0][0] < horizon:
            _, requests, old_tokens = window.popleft()
            self._window_turns -= 1
            self._window_requests -= requests
            self._window_tokens -= old_tokens

    @property
    def turns_done(self) -> int:
        with self._lock:
            return self._rows.turns

    @property
    def errors(self) -> int:
        with self._lock:
            return self._rows.errors

    @property
    def retries(self) -> int:
        with self._lock:
            return self._retries

    def snapshot(self, now: float | None = None) -> Snapshot:
        """The figures at ``now`` (Unix seconds, as event times; default: the clock).

        Once the run has finished the figures stay as they were at its end.
        """
        with self._lock:
            if now is None:
                now = time.time()
            if self._finished_t is not None:
                now = min(now, self._finished_t)

            turns, requests, tokens = (
                self._window_turns,
                self._window_requests,
                self._window_tokens,
            )
            horizon = now - self.window_s
            for t, old_requests, old_tokens in self._window:
                if t >= horizon:
                    break
                turns -= 1
                requests -= old_requests
                tokens -= old_tokens

            start = self._started_t
            elapsed = max(0.0, now - start) if start is not None else 0.0
            span = min(self.window_s, elapsed)
            requests_per_s = requests / span if span > 0 else None
            tokens_per_s = tokens / span if span > 0 else None
            turns_per_s = turns / span if span > 0 else None

            rows = self._rows
            finished = self._finished_t is not None
            eta: float | None = None
            if finished:
                eta = None if self._interrupted else 0.0
            elif turns_per_s:
                eta = max(0, self._turns_total - rows.turns) / turns_per_s
            if self._wall_s is not None:
                elapsed = self._wall_s

            latencies = rows.latencies()
            return Snapshot(
                model=self._model,
                engine=self._engine,
                turns_done=rows.turns,
                turns_total=self._turns_total,
                conversations_done=self._conversations_done,
                conversations_total=self._conversations_total,
                in_flight=self._in_flight,
                requests_per_s=requests_per_s,
                tokens_per_s=tokens_per_s,
                latency_p50=percentile(latencies, 0.50),
                latency_p95=percentile(latencies, 0.95),
                retries=self._retries,
                errors=rows.errors,
                cached=rows.cached,
                resumed=rows.resumed,
                eta_s=eta,
                cost_usd=rows.cost_usd,
                elapsed_s=elapsed,
                started=start is not None,
                finished=finished,
                interrupted=self._interrupted,
            )
