"""The live figures of a run, accumulated from executor events; what every view renders.

``RunState.update(event)`` runs for every event (thousands a second), so it does a few
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
from nbllm.results import percentile

__all__ = ["RunState", "Snapshot"]

WINDOW_S = 5.0
"""Rates and the ETA follow the turns finished in the last this-many seconds."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A run's figures at one moment. Rates are per second over the recent window.

    Latencies (seconds) are of answered requests sent in this run: cached and resumed
    rows sent none. ``errors`` counts rows with an error (failed or skipped). ``cost_usd``
    is ``None`` while no row has a known cost. ``eta_s`` is ``None`` until there is a pace
    to go by, and once the run was interrupted.
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


class RunState:
    """Accumulates events into the figures of ``Snapshot``; a new ``RunStarted`` starts over."""

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
        self._turns_done = 0
        self._conversations_done = 0
        self._in_flight = 0
        self._retries = 0
        self._errors = 0
        self._cached = 0
        self._resumed = 0
        self._cost = 0.0
        self._cost_known = False
        self._started_t: float | None = None
        self._finished_t: float | None = None
        self._wall_s: float | None = None
        self._interrupted = False
        # Sorted latencies, plus those not merged in yet: an insort per row would move the
        # whole list each time (quadratic over a long run); one merge per snapshot is linear.
        self._latencies: list[float] = []
        self._new_latencies: list[float] = []
        # (finish time, requests sent, tokens) of this run's turns in the recent window,
        # with their running sums.
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

    def _turn_finished(self, event: TurnFinished) -> None:
        record = event.record
        self._turns_done += 1
        self._in_flight = event.in_flight
        if event.conversation_done:
            self._conversations_done += 1
        if record.error is not None:
            self._errors += 1
        if record.cost_usd is not None:
            self._cost += record.cost_usd
            self._cost_known = True
        if record.resumed:
            # Read back from the checkpoint in a burst at the start: not this run's pace.
            self._resumed += 1
            return
        answered = record.error is None and record.answer is not None
        tokens = 0
        if record.cached:
            self._cached += 1
        elif answered and record.latency_s is not None:
            self._new_latencies.append(record.latency_s)
        if answered:
            tokens = (record.prompt_tokens or 0) + (record.completion_tokens or 0)
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

    def snapshot(self, now: float | None = None) -> Snapshot:
        """The figures at ``now`` (Unix seconds, as event times; default: the clock).

        Once the run has finished the figures stay as they were at its end.
        """
        with self._lock:
            if now is None:
                now = time.time()
            if self._finished_t is not None:
                now = min(now, self._finished_t)
            if self._new_latencies:
                # Sorting a sorted run followed by a short unsorted one is a merge (Timsort).
                self._latencies.extend(self._new_latencies)
                self._latencies.sort()
                self._new_latencies.clear()

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

            finished = self._finished_t is not None
            eta: float | None = None
            if finished:
                eta = None if self._interrupted else 0.0
            elif turns_per_s:
                eta = max(0, self._turns_total - self._turns_done) / turns_per_s
            if self._wall_s is not None:
                elapsed = self._wall_s

            return Snapshot(
                model=self._model,
                engine=self._engine,
                turns_done=self._turns_done,
                turns_total=self._turns_total,
                conversations_done=self._conversations_done,
                conversations_total=self._conversations_total,
                in_flight=self._in_flight,
                requests_per_s=requests_per_s,
                tokens_per_s=tokens_per_s,
                latency_p50=percentile(self._latencies, 0.50),
                latency_p95=percentile(self._latencies, 0.95),
                retries=self._retries,
                errors=self._errors,
                cached=self._cached,
                resumed=self._resumed,
                eta_s=eta,
                cost_usd=self._cost if self._cost_known else None,
                elapsed_s=elapsed,
                started=start is not None,
                finished=finished,
                interrupted=self._interrupted,
            )
