"""What a run gives back: one row per turn, in input order, and the run's figures."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from typing import TYPE_CHECKING, Any

from nbllm.types import TurnRecord

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["COLUMNS", "RunResult", "RunSummary", "percentile"]

COLUMNS = (
    "conversation_id",
    "turn",
    "question",
    "answer",
    "reference",
    "model",
    "engine",
    "latency_s",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "attempts",
    "error",
    "started_at",
    "finished_at",
    "cached",
    "resumed",
)


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (as numpy's default) of already sorted values."""
    if not sorted_values:
        return None
    pos = (len(sorted_values) - 1) * q
    low = math.floor(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


@dataclass(frozen=True, slots=True)
class RunSummary:
    """The run's figures. Latencies are of answered requests, in seconds.

    ``cached``: turns answered from the response cache in this run; ``resumed``: turns
    read back from the checkpoint. Neither sent a request in this run.
    """

    conversations: int
    turns: int
    turns_ok: int
    turns_failed: int
    wall_s: float
    requests_per_s: float
    tokens_per_s: float
    latency_p50: float | None
    latency_p95: float | None
    latency_p99: float | None
    retries: int
    cached: int
    resumed: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None
    interrupted: bool

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
            return str(value)

        return [(f.name, fmt(getattr(self, f.name))) for f in fields(self)]

    def __str__(self) -> str:
        rows = self._formatted()
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)

    def _repr_html_(self) -> str:
        cells = "".join(
            f"<tr><th style='text-align:left'>{html.escape(name)}</th>"
            f"<td style='text-align:right'>{html.escape(value)}</td></tr>"
            for name, value in self._formatted()
        )
        return f"<table>{cells}</table>"


class RunResult:
    """The result of a run: ``df`` (one row per turn), ``summary``, ``plot()``.

    ``records`` are in input order: conversation by conversation, turn by turn.
    ``interrupted`` is true when the run was stopped before every turn finished;
    the turns that never ran then carry an ``error`` saying so.
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
    ) -> None:
        self.records = list(records)
        self.conversations = conversations
        self.wall_s = wall_s
        self.started_at = started_at
        self.interrupted = interrupted
        self.model = model
        self.engine = engine
        self.gpu_samples: list[Any] = []  # filled by the notebook dashboard when it sampled GPUs

    def __repr__(self) -> str:
        s = self.summary
        state = ", interrupted" if self.interrupted else ""
        return (
            f"<RunResult {s.turns_ok}/{s.turns} turns ok, {s.conversations} conversations, "
            f"{s.wall_s:.2f} s{state}>"
        )

    def __len__(self) -> int:
        return len(self.records)

    @cached_property
    def df(self) -> pd.DataFrame:
        import pandas as pd

        rows = [tuple(getattr(r, c) for c in COLUMNS) for r in self.records]
        frame = pd.DataFrame.from_records(rows, columns=list(COLUMNS))
        for column in ("latency_s", "cost_usd", "started_at", "finished_at"):
            frame[column] = frame[column].astype("float64")
        for column in ("prompt_tokens", "completion_tokens"):
            frame[column] = frame[column].astype("Int64")
        frame["turn"] = frame["turn"].astype("int64")
        frame["attempts"] = frame["attempts"].astype("int64")
        frame["cached"] = frame["cached"].astype("bool")
        frame["resumed"] = frame["resumed"].astype("bool")
        return frame

    @cached_property
    def summary(self) -> RunSummary:
        ok = [r for r in self.records if r.ok]
        latencies = sorted(
            r.latency_s for r in ok if r.latency_s is not None and not (r.cached or r.resumed)
        )
        attempts = sum(r.attempts for r in self.records)
        sent = sum(1 for r in self.records if r.attempts)
        prompt = sum(r.prompt_tokens or 0 for r in self.records)
        completion = sum(r.completion_tokens or 0 for r in self.records)
        costs = [r.cost_usd for r in self.records if r.cost_usd is not None]
        wall = self.wall_s if self.wall_s > 0 else float("nan")
        return RunSummary(
            conversations=self.conversations,
            turns=len(self.records),
            turns_ok=len(ok),
            turns_failed=len(self.records) - len(ok),
            wall_s=self.wall_s,
            requests_per_s=attempts / wall if self.wall_s > 0 else 0.0,
            tokens_per_s=(prompt + completion) / wall if self.wall_s > 0 else 0.0,
            latency_p50=percentile(latencies, 0.50),
            latency_p95=percentile(latencies, 0.95),
            latency_p99=percentile(latencies, 0.99),
            retries=attempts - sent,
            cached=sum(1 for r in self.records if r.cached and not r.resumed),
            resumed=sum(1 for r in self.records if r.resumed),
            prompt_tokens=prompt,
            completion_tokens=completion,
            cost_usd=sum(costs) if costs else None,
            interrupted=self.interrupted,
        )

    def plot(self) -> Any:
        """A matplotlib figure: latency by turn, turns in flight and throughput over time,
        and GPU utilisation over the run when a GPU was sampled (``gpu_samples``)."""
        from nbllm.ui.plots import plot_result

        return plot_result(self, self.gpu_samples)
