"""Per-deployment figures of a run: what ``result.summary.deployments`` shows.

The executor keeps one ``DeploymentTotals`` per deployment it may send to (one for a run
against a single engine) and tells it about every attempt: ``answered(latency_s, tokens,
cost_usd)`` or ``failed(rate_limited=...)``. Attempts count, not rows: a turn that failed
on one deployment and was answered by another counts once for each. ``figures()`` freezes
them for the summary (latency percentiles by the summary's own rule, ``percentile``), and
``deployments_frame`` makes the table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from nbllm.results_sample import percentile

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["DEPLOYMENT_COLUMNS", "DeploymentFigures", "DeploymentTotals", "deployments_frame"]


@dataclass(frozen=True, slots=True)
class DeploymentFigures:
    """One deployment's attempts in a run.

    ``requests``: attempts sent there; ``errors``: those that failed (429s included);
    ``rate_limited``: the 429s; ``latency_p50`` / ``latency_p95``: seconds, over its
    answered attempts; ``tokens`` and ``cost_usd`` (None where no answer had a cost): of
    its answers; ``breaker_trips``: times its breaker opened; ``breaker``: its breaker's
    state at the end ("closed", "open", "half-open"; "-" without a breaker, as for a run
    against a single engine).
    """

    deployment: str
    group: str
    requests: int
    errors: int
    rate_limited: int
    latency_p50: float | None
    latency_p95: float | None
    tokens: int
    cost_usd: float | None
    breaker_trips: int
    breaker: str


DEPLOYMENT_COLUMNS = tuple(f.name for f in fields(DeploymentFigures))
_DTYPES = {
    "deployment": "string",
    "group": "string",
    "requests": "Int64",
    "errors": "Int64",
    "rate_limited": "Int64",
    "latency_p50": "Float64",
    "latency_p95": "Float64",
    "tokens": "Int64",
    "cost_usd": "Float64",
    "breaker_trips": "Int64",
    "breaker": "string",
}


class DeploymentTotals:
    """The running counts of one deployment (see the module). Not locked: the executor's
    loop is its only writer."""

    __slots__ = (
        "_latencies",
        "cost_known",
        "cost_sum",
        "deployment",
        "errors",
        "group",
        "rate_limited",
        "requests",
        "tokens",
    )

    def __init__(self, deployment: str, group: str) -> None:
        self.deployment = deployment
        self.group = group
        self.requests = 0
        self.errors = 0
        self.rate_limited = 0
        self.tokens = 0
        self.cost_sum = 0.0
        self.cost_known = False
        self._latencies: list[float] = []

    def __repr__(self) -> str:
        return (
            f"DeploymentTotals({self.deployment!r}, requests={self.requests}, "
            f"errors={self.errors}, rate_limited={self.rate_limited})"
        )

    def sent(self) -> None:
        """An attempt left for this deployment."""
        self.requests += 1

    def answered(self, latency_s: float, tokens: int, cost_usd: float | None) -> None:
        self._latencies.append(latency_s)
        self.tokens += tokens
        if cost_usd is not None:
            self.cost_sum += cost_usd
            self.cost_known = True

    def failed(self, *, rate_limited: bool = False) -> None:
        self.errors += 1
        if rate_limited:
            self.rate_limited += 1

    def figures(self, *, breaker: str = "-", trips: int = 0) -> DeploymentFigures:
        latencies = sorted(self._latencies)
        return DeploymentFigures(
            deployment=self.deployment,
            group=self.group,
            requests=self.requests,
            errors=self.errors,
            rate_limited=self.rate_limited,
            latency_p50=percentile(latencies, 0.50),
            latency_p95=percentile(latencies, 0.95),
            tokens=self.tokens,
            cost_usd=self.cost_sum if self.cost_known else None,
            breaker_trips=trips,
            breaker=breaker,
        )


def deployments_frame(rows: Sequence[DeploymentFigures]) -> pd.DataFrame:
    """One row per deployment, the columns of ``DEPLOYMENT_COLUMNS`` (nullable dtypes:
    a latency or a cost that is not known is ``pd.NA``)."""
    import pandas as pd

    return pd.DataFrame(
        {
            name: pd.array([getattr(r, name) for r in rows], dtype=_DTYPES[name])
            for name in DEPLOYMENT_COLUMNS
        },
        columns=list(DEPLOYMENT_COLUMNS),
    )
