"""A run's figures, accumulated from the executor's events: what every view reads.

The notebook dashboard, the terminal progress bar and jobs each feed a ``RunStats`` with
the events they receive and read their figures from it; a metrics exporter plugs in the
same way. Each finished row is counted by ``nbllm.results.RowTotals``, the rules that the
end-of-run ``RunSummary`` counts the final rows with, so a live figure and the summary's
mean the same thing. What only a live view has is computed here: the pace over a recent
window, the ETA, the requests in flight, retries as they are sent, errors by kind and
the last error, a stop on its way, a local engine's preparation before the run and the
tokens it has generated while the run goes, and the batches of a provider's batch API
(``batch_api=True``) as last polled.
Once the run has finished, every figure is the end-of-run summary's (whole-run rates, the
turns that never ran), so a finished view and ``print(result.summary)`` agree.

``RunStats.update(event)`` runs for every event (thousands a second), so it does a few
additions and appends and nothing more; ``snapshot()`` does the rest (window sums,
percentiles) at the pace a view redraws. One thread may write while another reads.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

from nbllm.engines.batch.lines import ENDED
from nbllm.engines.local.phases import GENERATING
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
from nbllm.executor.limits import run_wide
from nbllm.redact import redact
from nbllm.results import RowTotals, RunSummary, percentile
from nbllm.types import SKIPPED

__all__ = [
    "GENERATING",
    "BatchFigures",
    "RunStats",
    "Snapshot",
    "batch_figures",
    "error_kind",
    "one_line",
]


WINDOW_S = 5.0
"""Rates and the ETA follow the turns finished in the last this-many seconds."""

BATCHES_SHOWN = 8
"""A snapshot lists at most this many batches (in flight first, the latest first); a run
of hundreds of batches would otherwise bury every other figure."""


def error_kind(error: str) -> str:
    """An error's kind: its text up to the first ":" (``"ConnectionFailed"``)."""
    return error.partition(":")[0].strip()


def one_line(error: str) -> str:
    """``error`` on one line, with anything that looks like a key or token redacted."""
    return redact(" ".join(error.split()))


@dataclass(frozen=True, slots=True)
class BatchFigures:
    """A provider's batch (``batch_api=True``) as last polled: its ``status`` (OpenAI's
    words), lines ``completed`` and ``failed`` of ``total``, ``age_s`` since it was created
    and its completion ``window_s`` (None where the provider did not say), and how many of
    the run's requests are ``waiting`` on it. ``error``: a failed batch's message, on one
    line, keys redacted."""

    id: str
    api: str
    status: str
    total: int
    completed: int
    failed: int
    age_s: float | None
    window_s: float | None
    waiting: int
    error: str | None = None

    @property
    def ended(self) -> bool:
        return self.status in ENDED


def batch_figures(event: BatchUpdated, now: float) -> BatchFigures:
    """``event``'s batch as of ``now`` (Unix seconds); an ended batch's age stops at the
    poll that found it ended."""
    created, expires = event.created_at, event.expires_at
    now = min(now, event.t) if event.ended else now
    return BatchFigures(
        id=event.batch_id,
        api=event.api,
        status=event.status,
        total=event.total,
        completed=event.completed,
        failed=event.failed,
        age_s=None if created is None else max(0.0, now - created),
        window_s=None if created is None or expires is None else max(0.0, expires - created),
        waiting=event.waiting,
        error=None if event.error is None else one_line(event.error),
    )


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A run's figures at one moment. Latencies are in seconds.

    While the run goes, rates are per second over the recent window; once it has
    finished, they and every count are the end-of-run summary's (``RunSummary``).
    Rates count only requests this run sent: cached and resumed rows sent none.
    ``turns_done``: turns with their final row, ok (resumed too) or failed; ``failed``:
    turns that ran without an answer (an error, or skipped after an earlier one);
    ``not_run``: turns the run stopped before (known once it finished); ``errors`` is
    the two together; ``turns_ok`` the answered ones. ``errors_by_kind``: (kind, count)
    of the failed turns, most frequent first, the kind being the error text up to its
    first ":"; ``last_error``: the latest error (of a turn or a retry) in full, on one
    line, keys redacted. ``retries`` counts the retries sent in this run (one scheduled
    and never sent, as an ensemble's withdrawn one, is not one).
    ``truncated``: answered turns that ``max_tokens`` cut short (``finish_reason``
    ``"length"``), as the summary counts them, and ``cached_tokens`` /
    ``cached_tokens_share`` the prompt tokens engines took from their caches, as it adds
    them up. ``cost_usd`` is ``None`` while no row
    has a known cost. ``eta_s`` is ``None`` until there is a pace to go by, while
    stopping, and once the run ended with turns not run.
    ``stopping``: a stop was asked and the requests in flight are finishing.
    ``stop_reason`` and ``verdict`` are the summary's, set once finished. ``phase``,
    ``phase_done``, ``phase_total`` and ``phase_detail``: a local engine's preparation
    ("converting", "exporting", "loading") before the run starts, in the phase's own
    unit (``None`` when unknown); all None once the run has started.
    ``generated_tokens``: while the run goes, the completion tokens a local engine says
    it has generated so far (its "generating" phase, counted since the engine was made),
    so a slow generation visibly moves before its turn finishes; None when no engine
    said, and once the run has finished (the summary's ``completion_tokens`` then).
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
    failed: int = 0
    not_run: int = 0
    truncated: int = 0
    cached_tokens: int = 0
    cached_tokens_share: float | None = None
    errors_by_kind: tuple[tuple[str, int], ...] = ()
    last_error: str | None = None
    stopping: bool = False
    stop_reason: str | None = None
    verdict: str | None = None
    phase: str | None = None
    phase_done: float | None = None
    phase_total: float | None = None
    phase_detail: str | None = None
    generated_tokens: int | None = None
    #: Why the limits shared through Redis are local for now (None while shared, or unused).
    quota_note: str | None = None
    #: The "auto" limits in force, (kind, limit per rate window): ("rpm", 412.0); with
    #: several deployments, the sum of theirs.
    auto_limits: tuple[tuple[str, float], ...] = ()
    #: Deployments whose breaker is not closed, or has opened: (id, state, trips).
    breakers: tuple[tuple[str, str, int], ...] = ()
    #: alerts=: the message of each alert raised so far, oldest first.
    alerts: tuple[str, ...] = ()
    #: score= of the run: the mean score of the rows scored so far, and the metric's name.
    score: float | None = None
    score_metric: str | None = None
    #: batch_api=True: what the batch answers cost less than live ones, summed as
    #: ``cost_usd`` is (None while no row says).
    saved_usd: float | None = None
    #: batch_api=True: the run's batches as last polled, those in flight first, then the
    #: ended ones, the latest first within each; at most ``BATCHES_SHOWN``.
    batches: tuple[BatchFigures, ...] = ()
    #: Batches in flight (not ended), the ones left out of ``batches`` too.
    batches_in_flight: int = 0
    #: Batches left out of ``batches`` (beyond ``BATCHES_SHOWN``).
    batches_not_shown: int = 0

    @property
    def turns_ok(self) -> int:
        """Turns answered (this run or, resumed, an earlier one)."""
        return self.turns_done - self.failed


class RunStats:
    """Accumulates events into the figures of ``Snapshot``; a new ``RunStarted`` starts over.

    An event listener itself (``listeners=[stats]``). ``turns_done``, ``errors`` and
    ``retries`` are plain counts, cheap enough to read after every event; ``snapshot``
    gives every figure. An ``EnginePhase`` of preparation after a finished run starts
    over too; the "generating" phase is a figure of the run going on, not a preparation.
    """

    def __init__(self, window_s: float = WINDOW_S) -> None:
        if not window_s > 0:
            msg = f"window_s must be a number of seconds > 0, got {window_s!r}"
            raise ConfigError(msg)
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
        self._score_metric: str | None = None
        self._started_t: float | None = None
        self._finished_t: float | None = None
        self._wall_s: float | None = None
        self._interrupted = False
        self._summary: RunSummary | None = None
        self._stopping = False
        self._errors_by_kind: dict[str, int] = {}
        self._last_error: str | None = None
        self._shown_error: tuple[str | None, str] = (None, "")
        self._quota: str | None = None
        self._auto_limits: dict[tuple[str, str], float] = {}
        self._breakers: dict[str, tuple[str, int]] = {}
        self._alerts: list[str] = []
        self._phase: EnginePhase | None = None
        self._generated: int | None = None
        self._batches: dict[str, BatchUpdated] = {}  # the latest poll of each batch
        # (finish time, requests sent, tokens) of this run's turns in the recent window,
        # with their running sums. Resumed rows stay out: read back from the checkpoint in a
        # burst at the start, they are not this run's pace.
        self._window: deque[tuple[float, int, int]] = deque()
        self._window_turns = 0
        self._window_requests = 0
        self._window_tokens = 0

    def update(self, event: Event) -> None:
        with self._lock:
            if isinstance(event, TurnFinished):
                self._turn_finished(event)
            elif isinstance(event, RequestSent):
                self._in_flight = event.in_flight
                if event.attempt > 1:  # a retry sent, as the summary counts them
                    self._retries += 1
            elif isinstance(event, RetryScheduled):
                self._last_error = event.error
            elif isinstance(event, RunStarted):
                self._reset()
                self._score_metric = event.score[0] if event.score else None
                self._rows = RowTotals(event.score[1] if event.score else None)
                self._started_t = event.t
                self._model, self._engine = event.model, event.engine
                self._turns_total = event.turns
                self._conversations_total = event.conversations
            elif isinstance(event, RunFinished):
                self._run_finished(event)
            elif isinstance(event, StopRequested):
                self._stopping = True
            elif isinstance(event, SharedQuota):
                self._quota = None if event.shared else event.reason
            elif isinstance(event, LimitChanged):
                self._auto_limits[(event.kind, event.deployment)] = event.limit
            elif isinstance(event, BreakerChanged):
                self._breakers[event.deployment] = (event.state, event.trips)
            elif isinstance(event, Alert):
                self._alerts.append(event.message)
            elif isinstance(event, BatchUpdated):
                # A batch polled after the run ended (a stop's cancel) still moves.
                self._batches[event.batch_id] = event
            elif isinstance(event, EnginePhase):
                if event.phase == GENERATING:
                    # A count that comes late, after the run finished, changes nothing.
                    if self._finished_t is None and event.done is not None:
                        self._generated = int(event.done)
                    return
                if self._finished_t is not None:
                    self._reset()
                self._phase = event
                return  # preparing: the run has not started
            if self._started_t is None:
                # A listener that joined a run already going starts at its first event.
                self._started_t = event.t

    __call__ = update

    def _last_error_line(self) -> str | None:
        """The last error on one line, redacted once per error, not once per snapshot (a
        dashboard asks several times a second)."""
        if self._last_error is None:
            return None
        if self._shown_error[0] is not self._last_error:
            self._shown_error = (self._last_error, one_line(self._last_error))
        return self._shown_error[1]

    def _turn_finished(self, event: TurnFinished) -> None:
        record = event.record
        rows = self._rows
        tokens_before = rows.sent_tokens
        rows.add(record)
        self._in_flight = event.in_flight
        if event.conversation_done:
            self._conversations_done += 1
        error = record.error
        if error is not None and not record.not_run:
            kind = error_kind(error)
            self._errors_by_kind[kind] = self._errors_by_kind.get(kind, 0) + 1
            # A skipped turn's error only points at the earlier one, the one worth showing.
            if kind != SKIPPED:
                self._last_error = error
        if record.resumed:
            return
        # The row's tokens as the totals count them: one rule for both.
        tokens = rows.sent_tokens - tokens_before
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

    def _run_finished(self, event: RunFinished) -> None:
        self._finished_t = event.t
        self._wall_s = event.wall_s
        self._interrupted = event.interrupted
        self._in_flight = 0
        self._stopping = False
        rows = self._rows
        # Turns that never ran may have no row event: the result has a row for each.
        rows.add_not_run(max(0, self._turns_total - rows.turns))
        self._summary = RunSummary.from_totals(
            rows,
            conversations=self._conversations_total,
            wall_s=event.wall_s,
            interrupted=event.interrupted,
            stop_reason=event.stop_reason,
        )

    @property
    def turns_done(self) -> int:
        """Turns that ran: ok or failed."""
        with self._lock:
            return self._rows.ran

    @property
    def errors(self) -> int:
        with self._lock:
            return self._rows.errors

    @property
    def retries(self) -> int:
        with self._lock:
            return self._retries

    def _batch_figures(self, now: float) -> tuple[tuple[BatchFigures, ...], int, int]:
        """The batches to show at ``now``, how many are in flight, how many left out."""
        polls = self._batches.values()
        if not polls:
            return (), 0, 0
        in_flight = sum(not poll.ended for poll in polls)
        latest = sorted(
            polls, key=lambda p: (p.ended, -(p.created_at if p.created_at is not None else p.t))
        )
        shown = tuple(batch_figures(poll, now) for poll in latest[:BATCHES_SHOWN])
        return shown, in_flight, len(latest) - len(shown)

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
            requests_per_s: float | None = requests / span if span > 0 else None
            tokens_per_s: float | None = tokens / span if span > 0 else None
            turns_per_s = turns / span if span > 0 else None

            rows = self._rows
            summary = self._summary
            retries = self._retries
            eta: float | None = None
            if summary is not None:
                eta = None if self._interrupted or rows.not_run else 0.0
                requests_per_s, tokens_per_s = summary.requests_per_s, summary.tokens_per_s
                retries = summary.retries
            elif turns_per_s and not self._stopping:
                eta = max(0, self._turns_total - rows.turns) / turns_per_s
            if self._wall_s is not None:
                elapsed = self._wall_s

            phase = self._phase if start is None else None
            latencies = rows.latencies()
            by_kind = sorted(self._errors_by_kind.items(), key=lambda kv: (-kv[1], kv[0]))
            batches, batches_in_flight, batches_not_shown = self._batch_figures(now)
            return Snapshot(
                model=self._model,
                engine=self._engine,
                turns_done=rows.ran,
                turns_total=self._turns_total,
                conversations_done=self._conversations_done,
                conversations_total=self._conversations_total,
                in_flight=self._in_flight,
                requests_per_s=requests_per_s,
                tokens_per_s=tokens_per_s,
                latency_p50=percentile(latencies, 0.50),
                latency_p95=percentile(latencies, 0.95),
                retries=retries,
                errors=rows.errors,
                cached=rows.cached,
                resumed=rows.resumed,
                eta_s=eta,
                cost_usd=rows.cost_usd,
                elapsed_s=elapsed,
                started=start is not None,
                finished=summary is not None,
                interrupted=self._interrupted,
                failed=rows.failed,
                not_run=rows.not_run,
                truncated=rows.truncated,
                cached_tokens=rows.cached_tokens,
                cached_tokens_share=rows.cached_tokens_share,
                errors_by_kind=tuple(by_kind),
                last_error=self._last_error_line(),
                stopping=self._stopping,
                stop_reason=None if summary is None else summary.stop_reason,
                verdict=None if summary is None else summary.verdict,
                phase=None if phase is None else phase.phase,
                phase_done=None if phase is None else phase.done,
                phase_total=None if phase is None else phase.total,
                phase_detail=None if phase is None else phase.detail or None,
                generated_tokens=None if summary is not None else self._generated,
                quota_note=self._quota,
                auto_limits=tuple(sorted(run_wide(self._auto_limits).items())),
                breakers=tuple((d, state, trips) for d, (state, trips) in self._breakers.items()),
                alerts=tuple(self._alerts),
                score=self._rows.score,
                score_metric=self._score_metric,
                saved_usd=rows.saved_usd,
                batches=batches,
                batches_in_flight=batches_in_flight,
                batches_not_shown=batches_not_shown,
            )
