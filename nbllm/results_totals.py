"""The running totals of a run's rows: what the summary and the live statistics count.

``RowTotals`` counts rows one at a time by the rules every figure of nbllm uses, so that a
live figure (``nbllm.executor.stats``) and the end-of-run summary mean the same thing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from nbllm.results_sample import SortedSample
from nbllm.types import TurnRecord

__all__ = ["RowTotals", "Scorer", "request_latency"]

#: A row's score: (answer, reference) -> a number from 0 to 1, or None (not scored).
Scorer = Callable[[str | None, str | None], float | None]


# What one row counts for. The end-of-run summary and the live statistics
# (nbllm.executor.stats) both count rows with these rules, so a figure means one thing.


def request_latency(record: TurnRecord) -> float | None:
    """The latency of a request answered in this run; None for a row that sent none
    (cached, resumed) or got no answer."""
    if record.cached or record.resumed or not record.ok:
        return None
    return record.latency_s


class RowTotals:
    """The running totals of a run's rows, added one row at a time.

    ``add`` is a few additions (the live statistics call it for every finished turn);
    the latencies are sorted only when asked for. A row is answered, not run (see
    ``TurnRecord.not_run``) or failed. Only answered rows bring tokens. ``cached`` counts
    rows answered from the cache in this run, so a resumed row is never also cached.
    ``cached_tokens`` adds up the prompt tokens engines took from their prompt caches
    (``TurnRecord.cached_tokens``); ``cached_tokens_share`` is their share of
    ``prompt_tokens``. ``saved_usd`` adds up what batch API answers cost less than live
    ones (``TurnRecord.saved_usd``), as ``cost_usd`` adds up the costs: None while no row
    has one.
    ``truncated`` counts answered rows that ``max_tokens`` cut short (``finish_reason``
    ``"length"``), whichever run answered them: the answer in the result is cut either way.
    What this run sent leaves resumed rows out, whose attempts an earlier run made:
    ``attempts`` (requests sent), ``sent`` (rows with at least one attempt) and
    ``sent_tokens`` (the tokens of answers to those requests; cached rows sent none).
    ``queue_s()`` and ``service_s()`` are the rows this run sent, answered or not.
    Not locked: its owner serialises access.
    """

    __slots__ = (
        "_latencies",
        "_queue",
        "_service",
        "answered",
        "attempts",
        "cached",
        "cached_tokens",
        "completion_tokens",
        "cost_known",
        "cost_sum",
        "not_run",
        "parse_retries",
        "prompt_tokens",
        "resumed",
        "saved_known",
        "saved_sum",
        "score_sum",
        "scored",
        "scorer",
        "sent",
        "sent_tokens",
        "truncated",
        "turns",
    )

    def __init__(self, scorer: Scorer | None = None) -> None:
        self.scorer = scorer  # score= on the run: each row's answer against its reference
        self.score_sum = 0.0
        self.scored = 0
        self.turns = 0
        self.answered = 0
        self.not_run = 0
        self.attempts = 0
        self.sent = 0
        self.cached = 0
        self.resumed = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.sent_tokens = 0
        self.truncated = 0
        self.parse_retries = 0
        self.cost_sum = 0.0
        self.cost_known = False
        self.saved_sum = 0.0
        self.saved_known = False
        self._latencies = SortedSample()
        self._queue = SortedSample()
        self._service = SortedSample()

    @classmethod
    def of(cls, records: Sequence[TurnRecord], scorer: Scorer | None = None) -> RowTotals:
        """The totals of ``records``."""
        totals = cls(scorer)
        for record in records:
            totals.add(record)
        return totals

    def add(self, record: TurnRecord) -> None:
        self.turns += 1
        if self.scorer is not None and not record.not_run:
            value = self.scorer(record.answer, record.reference)
            if value is not None:
                self.score_sum += value
                self.scored += 1
        if record.ok:
            self.answered += 1
            tokens = (record.prompt_tokens or 0) + (record.completion_tokens or 0)
            self.prompt_tokens += record.prompt_tokens or 0
            self.cached_tokens += record.cached_tokens or 0
            self.completion_tokens += record.completion_tokens or 0
            if not (record.resumed or record.cached):
                self.sent_tokens += tokens
            if record.finish_reason == "length":
                self.truncated += 1
        elif record.not_run:
            self.not_run += 1
        if record.cost_usd is not None:
            self.cost_sum += record.cost_usd
            self.cost_known = True
        if record.saved_usd is not None:
            self.saved_sum += record.saved_usd
            self.saved_known = True
        if record.resumed:
            self.resumed += 1
            return
        self.parse_retries += record.parse_retries
        if record.attempts:
            self.attempts += record.attempts
            self.sent += record.asked  # each model an ensemble asked: its first attempt
        if record.cached:
            self.cached += 1
        elif record.attempts:
            if record.queue_s is not None:
                self._queue.add(record.queue_s)
            if record.service_s is not None:
                self._service.add(record.service_s)
        latency = request_latency(record)
        if latency is not None:
            self._latencies.add(latency)

    def add_not_run(self, count: int) -> None:
        """Count ``count`` turns that never ran and that no row was added for (yet)."""
        self.turns += count
        self.not_run += count

    @property
    def errors(self) -> int:
        """Rows without an answer: failed, skipped after an earlier failure, or not run."""
        return self.turns - self.answered

    @property
    def ran(self) -> int:
        """Rows that ran: answered or failed (not the ones that never ran)."""
        return self.turns - self.not_run

    @property
    def failed(self) -> int:
        """Rows without an answer that ran: an error, or skipped after an earlier one."""
        return self.ran - self.answered

    @property
    def score(self) -> float | None:
        """The mean score of the rows scored so far (None: none yet, or no ``score=``)."""
        return self.score_sum / self.scored if self.scored else None

    @property
    def retries(self) -> int:
        """Attempts in this run beyond each sent row's first, but those that asked again
        because an answer did not parse (``parse_retries``)."""
        return self.attempts - self.sent - self.parse_retries

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def cached_tokens_share(self) -> float | None:
        """``cached_tokens`` over ``prompt_tokens``; None while there are no prompt tokens."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else None

    @property
    def cost_usd(self) -> float | None:
        """The sum of the known costs; None while no row has one."""
        return self.cost_sum if self.cost_known else None

    @property
    def saved_usd(self) -> float | None:
        """What the batch API's answers saved against live prices; None while no row says."""
        return self.saved_sum if self.saved_known else None

    def latencies(self) -> list[float]:
        """The latencies of requests answered in this run, sorted (the list itself: read it,
        don't keep it)."""
        return self._latencies.values()

    def queue_s(self) -> list[float]:
        """The ``queue_s`` of the rows this run sent, sorted (read it, don't keep it)."""
        return self._queue.values()

    def service_s(self) -> list[float]:
        """The ``service_s`` of the rows this run sent, sorted (read it, don't keep it)."""
        return self._service.values()
