"""What a run gives back: one row per turn, in input order, and the run's figures."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from typing import TYPE_CHECKING, Any

from nbllm.results_deployments import DeploymentFigures, deployments_frame
from nbllm.results_models import EnsembleFigures, compare_frame, ensemble_frame
from nbllm.results_sample import percentile
from nbllm.results_totals import RowTotals, Scorer, request_latency
from nbllm.types import TurnRecord

if TYPE_CHECKING:
    import pandas as pd

    from nbllm.scoring import MetricFunction, ScoreSummary

__all__ = [
    "COLUMNS",
    "RowTotals",
    "RunResult",
    "RunSummary",
    "dollars",
    "percentile",
    "request_latency",
]

COLUMNS = (
    "conversation_id",
    "turn",
    "question",
    "answer",
    "parsed",
    "reference",
    "model",
    "engine",
    "deployment",
    "latency_s",
    "queue_s",
    "service_s",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "finish_reason",
    "cost_usd",
    "saved_usd",
    "attempts",
    "error",
    "started_at",
    "finished_at",
    "cached",
    "resumed",
)

# Each column's dtype in ``RunResult.df`` (conversation_id keeps the ids as given).
_DTYPES = {
    "turn": "Int64",
    "question": "string",
    "answer": "string",
    "parsed": "object",
    "reference": "string",
    "model": "string",
    "engine": "string",
    "deployment": "string",
    "latency_s": "Float64",
    "queue_s": "Float64",
    "service_s": "Float64",
    "prompt_tokens": "Int64",
    "cached_tokens": "Int64",
    "completion_tokens": "Int64",
    "finish_reason": "string",
    "cost_usd": "Float64",
    "saved_usd": "Float64",
    "attempts": "Int64",
    "error": "string",
    "started_at": "datetime",
    "finished_at": "datetime",
    "cached": "bool",
    "resumed": "bool",
}


def dollars(usd: float | None) -> str:
    """Dollars, to the cent where they are many: ``"$0.0123"``, ``"$12.34"``."""
    if usd is None:
        return "-"
    return f"${usd:.4f}" if abs(usd) < 10 else f"${usd:,.2f}"


def _took(seconds: float) -> str:
    """``"0.04 s"``, ``"12.3 s"``, ``"3 min 05 s"``, ``"2 h 07 min"``."""
    if seconds < 0.995:  # a short run against a fast server still reads as a time, not 0.0 s
        return f"{max(0.0, seconds):.2f} s"
    if seconds < 59.95:
        return f"{max(0.0, seconds):.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


@dataclass(frozen=True, slots=True)
class RunSummary:
    """The run's figures. Latencies are in seconds.

    Each turn is ok, failed (an error, or skipped after an earlier turn failed) or not
    run (the run stopped before it ran: ``turns_not_run``). ``truncated``: ok turns whose
    answer ``max_tokens`` cut short (``finish_reason`` ``"length"``; the verdict says how
    many). ``cached``: turns answered from the response cache in this run; ``resumed``:
    turns read back from the checkpoint.

    Two kinds of figure. What this run did: ``requests_per_s``, ``tokens_per_s``,
    ``retries`` and the latency percentiles count only the requests this run sent, per
    second of its ``wall_s`` (cached and resumed turns sent none, so a run answered
    wholly from its checkpoint reports 0 requests/s, 0 retries and no latency). Where the
    time went, over the turns this run sent (answered or not): ``queue_p50``/``queue_p95``
    of ``queue_s`` (waiting for a slot, a limit, a pause or a backoff) and
    ``service_p50``/``service_p95`` of ``service_s`` (the requests themselves). What the
    result holds: the turn counts, ``prompt_tokens``, ``completion_tokens`` and
    ``cost_usd`` add up every row, resumed and cached ones too, as ``df`` does, and so does
    ``cached_tokens``: the prompt tokens engines took from their caches of earlier prompts
    (``cached_tokens_share`` of ``prompt_tokens``; None without prompt tokens). The text
    shows these two only where some prompt tokens were cached. ``saved_usd``: what the
    answers of a provider's batch API (``batch_api=True``) cost less than they would have
    live, summed like ``cost_usd`` (which is at the batch price); None, and left out of the
    text, where no row says.
    ``stop_reason``: why the run ended early by itself, or None. ``verdict`` says it all
    in one line. ``parse_retries``: asks again for answers that did not parse (``retries``
    leaves them out). ``score`` / ``score_metric``: with ``score=`` on the run, the mean
    score of the rows scored. ``deployments``: one row per deployment (a DataFrame).
    ``ensemble``: with ``ensemble=``, each model's turn times, how often its answer was
    kept and how much the ensemble's p95 gains on it (a DataFrame, ``EnsembleFigures``).
    ``alerts``: the message of each alert raised during the run (``alerts=``).
    """

    conversations: int
    turns: int
    turns_ok: int
    turns_failed: int
    turns_not_run: int
    truncated: int
    wall_s: float
    requests_per_s: float
    tokens_per_s: float
    latency_p50: float | None
    latency_p95: float | None
    latency_p99: float | None
    queue_p50: float | None
    queue_p95: float | None
    service_p50: float | None
    service_p95: float | None
    retries: int
    parse_retries: int
    cached: int
    resumed: int
    prompt_tokens: int
    cached_tokens: int
    cached_tokens_share: float | None
    completion_tokens: int
    cost_usd: float | None
    saved_usd: float | None
    interrupted: bool
    stop_reason: str | None = None
    score: float | None = None
    score_metric: str | None = None
    deployment_figures: tuple[DeploymentFigures, ...] = ()
    ensemble_figures: tuple[EnsembleFigures, ...] = ()
    alerts: tuple[str, ...] = ()

    @classmethod
    def from_totals(
        cls,
        totals: RowTotals,
        *,
        conversations: int,
        wall_s: float,
        interrupted: bool,
        stop_reason: str | None = None,
        deployments: Sequence[DeploymentFigures] = (),
        score_metric: str | None = None,
        ensemble: Sequence[EnsembleFigures] = (),
        alerts: Sequence[str] = (),
    ) -> RunSummary:
        """The whole run's figures from the totals of all its rows."""
        latencies, queue, service = totals.latencies(), totals.queue_s(), totals.service_s()
        return cls(
            conversations=conversations,
            turns=totals.turns,
            turns_ok=totals.answered,
            turns_failed=totals.failed,
            turns_not_run=totals.not_run,
            truncated=totals.truncated,
            wall_s=wall_s,
            requests_per_s=totals.attempts / wall_s if wall_s > 0 else 0.0,
            tokens_per_s=totals.sent_tokens / wall_s if wall_s > 0 else 0.0,
            latency_p50=percentile(latencies, 0.50),
            latency_p95=percentile(latencies, 0.95),
            latency_p99=percentile(latencies, 0.99),
            queue_p50=percentile(queue, 0.50),
            queue_p95=percentile(queue, 0.95),
            service_p50=percentile(service, 0.50),
            service_p95=percentile(service, 0.95),
            retries=totals.retries,
            parse_retries=totals.parse_retries,
            cached=totals.cached,
            resumed=totals.resumed,
            prompt_tokens=totals.prompt_tokens,
            cached_tokens=totals.cached_tokens,
            cached_tokens_share=totals.cached_tokens_share,
            completion_tokens=totals.completion_tokens,
            cost_usd=totals.cost_usd,
            saved_usd=totals.saved_usd,
            interrupted=interrupted,
            stop_reason=stop_reason,
            score=totals.score,
            score_metric=score_metric,
            deployment_figures=tuple(deployments),
            ensemble_figures=tuple(ensemble),
            alerts=tuple(alerts),
        )

    @property
    def deployments(self) -> pd.DataFrame:
        """One row per deployment the run could send to: requests, errors, 429s, latency
        p50/p95, tokens, cost, breaker trips and state (``DeploymentFigures``)."""
        return deployments_frame(self.deployment_figures)

    @property
    def ensemble(self) -> pd.DataFrame:
        """With ``ensemble=``: one row per model, then one for the ensemble; turns, turns
        kept, turns withdrawn, turn p50/p95 and the p95 gained (``EnsembleFigures``)."""
        return ensemble_frame(self.ensemble_figures)

    @property
    def verdict(self) -> str:
        """The run in one line: how many turns are ok (and how many of those cut short by
        ``max_tokens``), failed and not run, and what next."""
        turns, failed, not_run = self.turns, self.turns_failed, self.turns_not_run
        ok = f"{self.turns_ok:,}"
        # "ok" alone would hide the most common quiet error: answers that max_tokens cut.
        cut = f" ({self.truncated:,} cut short by max_tokens)" if self.truncated else ""
        if self.stop_reason:
            counts = f"{ok} of {turns:,} turns ok{cut}"
            if failed:
                counts += f", {failed:,} failed"
            if not_run:
                counts += f", {not_run:,} not run"
            return f"{self.stop_reason} — {counts}"
        took = _took(self.wall_s)
        if not_run:
            return (
                f"{ok} of {turns:,} turns ok{cut}, {not_run:,} not run (stopped), "
                f"{failed:,} failed in {took} — run it again to resume"
            )
        if failed:
            return (
                f"{ok} of {turns:,} turns ok{cut}, {failed:,} failed (see the error column) "
                f"in {took}"
            )
        return f"{ok}/{turns:,} turns ok{cut} in {took}"

    @property
    def success_rate(self) -> float:
        return self.turns_ok / self.turns if self.turns else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def _formatted(self) -> list[tuple[str, str]]:
        def fmt(value: Any) -> str:
            if value is None:
                return "-"
            if isinstance(value, bool):
                return str(value)
            if isinstance(value, int):
                return f"{value:,}"
            if isinstance(value, float):
                return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
            if isinstance(value, tuple):  # alerts: one message after another
                return "; ".join(map(str, value)) or "-"
            return str(value)

        left_out = {"deployment_figures", "ensemble_figures"}  # tables of their own
        if not self.cached_tokens:  # an engine without a prompt cache: nothing to say
            left_out |= {"cached_tokens", "cached_tokens_share"}
        if self.saved_usd is None:  # no batch API answered: nothing was saved or lost
            left_out.add("saved_usd")
        rows = []
        for f in fields(self):
            if f.name in left_out:
                continue
            value = fmt(getattr(self, f.name))
            if f.name == "saved_usd":
                value = f"saved {dollars(self.saved_usd)} against live prices (batch API)"
            rows.append((f.name, value))
        return rows

    def __str__(self) -> str:
        rows = self._formatted()
        width = max(len(name) for name, _ in rows)
        table = "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
        return f"{self.verdict}\n{table}"

    def _repr_html_(self) -> str:
        cells = "".join(
            f"<tr><th style='text-align:left'>{html.escape(name)}</th>"
            f"<td style='text-align:right'>{html.escape(value)}</td></tr>"
            for name, value in self._formatted()
        )
        caption = f"<caption style='text-align:left'>{html.escape(self.verdict)}</caption>"
        return f"<table>{caption}{cells}</table>"


class RunResult:
    """The result of a run: ``df`` (one row per turn), ``summary``, ``verdict``, ``plot()``.

    ``records`` are in input order: conversation by conversation, turn by turn.
    ``interrupted`` is true when its user stopped the run before every turn finished.
    ``stop_reason`` says why the run ended early by itself (it could not reach the
    server, say); None when it ran to the end or was stopped by its user. Either way
    the turns that never ran carry an ``error`` that starts with ``"not run"``.
    """

    def __init__(
        self,
        records: Sequence[TurnRecord],
        *,
        conversations: int,
        wall_s: float,
        started_at: float,
        interrupted: bool = False,
        model: str | None = None,
        engine: str | None = None,
        stop_reason: str | None = None,
        deployments: Sequence[DeploymentFigures] = (),
        limit_history: Sequence[tuple[float, str, float]] = (),
        score: tuple[str, Scorer] | None = None,
        models: Sequence[str] = (),
        ensemble: Sequence[EnsembleFigures] | None = None,
        alerts: Sequence[Any] = (),
    ) -> None:
        self.records = list(records)
        #: model=[...]: the models, in the order given (empty for a run of one model).
        self.models = tuple(models)
        #: ensemble=: each model's figures and the ensemble's (None without an ensemble).
        self.ensemble = None if ensemble is None else tuple(ensemble)
        #: alerts=: every Alert raised during the run (``nbllm.alerts``), in order.
        self.alerts = tuple(alerts)
        self.deployments = tuple(deployments)
        #: The "auto" limits over the run: (time, "requests/s" | "tokens/s" | "concurrency",
        #: limit), at the start and after each change; what ``plot()`` draws.
        self.limit_history = tuple(limit_history)
        #: score= of the run: the metric's name and the function that scored each row.
        self.scoring = score
        self.conversations = conversations
        self.wall_s = wall_s
        self.started_at = started_at
        self.interrupted = interrupted
        self.model = model
        self.engine = engine
        self.stop_reason = stop_reason
        self.gpu_samples: list[Any] = []  # filled by the notebook dashboard when it sampled GPUs

    def __repr__(self) -> str:
        return f"<RunResult {self.verdict}, {self.conversations:,} conversations>"

    def __len__(self) -> int:
        return len(self.records)

    @property
    def verdict(self) -> str:
        """The run in one line, as ``summary.verdict``."""
        return self.summary.verdict

    @cached_property
    def df(self) -> pd.DataFrame:
        """One row per turn, the columns of ``COLUMNS``.

        Missing is ``pd.NA`` everywhere (``NaT`` in the two time columns): text columns
        are ``string``, numbers nullable ``Int64`` / ``Float64``, ``started_at`` and
        ``finished_at`` ``datetime64[ns, UTC]``; ``cached`` and ``resumed`` are ``bool``.
        ``conversation_id`` keeps the dataset's ids as they were, and ``parsed`` the values
        ``response_format`` / ``parse`` made (``object``); with ``score=`` on the run a
        ``score`` column follows (``Float64``).
        ``finish_reason`` says why each answer ended: ``"stop"``, ``"length"`` when
        ``max_tokens`` cut it short, or the provider's word (``"content_filter"``, ...);
        missing where there is no answer or the engine did not say.
        ``cached_tokens``: how many of ``prompt_tokens`` the engine took from a cache of
        earlier prompts (a provider's prompt cache, a local engine's prefix cache); missing
        where the engine did not say. ``saved_usd``: what a batch API's answer
        (``batch_api=True``) cost less than a live one (``cost_usd`` is at the batch price);
        missing for a live answer or where the price is not known.
        """
        import pandas as pd

        records = self.records

        def values(column: str) -> list[Any]:
            return [getattr(r, column) for r in records]

        columns: dict[str, Any] = {
            "conversation_id": pd.Series(values("conversation_id"), dtype=object)
        }
        for column in COLUMNS[1:]:
            kind = _DTYPES[column]
            if kind == "datetime":
                # Whole microseconds: a float's last bits would show as stray nanoseconds.
                micros = (pd.Series(values(column), dtype="float64") * 1e6).round()
                columns[column] = pd.to_datetime(micros, unit="us", utc=True).astype(
                    "datetime64[ns, UTC]"
                )
            elif kind == "object":
                columns[column] = pd.Series([pd.NA if v is None else v for v in values(column)])
            else:
                columns[column] = pd.array(values(column), dtype=kind)
        df = pd.DataFrame(columns, columns=list(COLUMNS))
        if any(r.votes is not None for r in records):  # ensemble="vote"
            df.insert(df.columns.get_loc("model") + 1, "votes", pd.array(values("votes"), "Int64"))
        if self.scoring is not None:  # score= on the run: as the summary scored each row
            score = self.scoring[1]
            scores = [None if r.not_run else score(r.answer, r.reference) for r in records]
            df["score"] = pd.array(scores, dtype="Float64")
        return df

    def compare(self) -> pd.DataFrame:
        """The models of ``model=[...]`` side by side: one row per (conversation, turn),
        each model's answer, latency, tokens, cost, error (and score, where ``score=`` or
        ``score()`` scored the rows) in columns named ``answer[<model>]`` and so on, then
        ``agreement``: the share of the models that answered whose answer is the most
        common one (compared as ``"exact"`` does, or by ``parsed`` where a parser read
        them)."""
        if not self.models or self.ensemble is not None:
            msg = "compare() needs a run of several models side by side: model=['a', 'b']"
            raise ValueError(msg)
        df = self.df
        scores = None
        if "score" in df.columns:
            scores = [
                None if v is None else float(v) for v in df["score"].to_numpy(None, na_value=None)
            ]
        return compare_frame(self.records, self.models, scores)

    def parsed_df(self) -> pd.DataFrame:
        """The ``parsed`` answers as columns: one row per turn, ``conversation_id``,
        ``turn`` and ``model``, then each field of a parsed object (nested ones as
        ``outer.inner``), or one ``parsed`` column where the values are not objects."""
        from nbllm.parsing import parsed_frame

        return parsed_frame(self.df)

    @cached_property
    def summary(self) -> RunSummary:
        scoring = self.scoring
        return RunSummary.from_totals(
            RowTotals.of(self.records, scoring[1] if scoring else None),
            conversations=self.conversations,
            wall_s=self.wall_s,
            interrupted=self.interrupted,
            stop_reason=self.stop_reason,
            deployments=self.deployments,
            score_metric=scoring[0] if scoring else None,
            ensemble=self.ensemble or (),
            alerts=tuple(a.message for a in self.alerts),
        )

    def score(
        self, metric: str | MetricFunction = "exact", *, rel_tol: float = 1e-2
    ) -> ScoreSummary:
        """Score each answer against its reference: adds a ``score`` column (0 to 1, missing
        where there is no reference) to ``df`` and returns the mean overall, by turn and by
        model. ``metric``: ``"exact"``, ``"contains"``, ``"numeric"`` (equal within
        ``rel_tol``), ``"f1"`` or a callable ``(answer, reference) -> float``; see
        ``nbllm.scoring.score``."""
        from nbllm.scoring import score

        return score(self, metric, rel_tol=rel_tol)

    def judge(self, *, model: str | None = None, **options: Any) -> RunResult:
        """Grade the answers against their references with an LLM as judge, a second run:
        adds ``judge_score`` and ``judge_reason`` columns to ``df`` and returns the judge's
        own result. A convenience for ``nbllm.judge.judge(result, ...)`` (its prompts, the
        ``rubric`` and the run's options there); like ``plot``, imported only when asked."""
        from nbllm.judge import judge

        return judge(self, model=model, **options)

    def plot(self) -> Any:
        """A matplotlib figure: latency by turn, turns in flight and throughput over time,
        and GPU utilisation over the run when a GPU was sampled (``gpu_samples``).

        A convenience for ``nbllm.ui.plots.plot_result(result)``; its import is the one
        deliberate upward import from this data module, made only when a plot is asked for.
        """
        from nbllm.ui.plots import plot_result

        return plot_result(self)
