"""Several models in one run: ``result.compare()`` and the ensemble's figures.

``model=[...]`` asks every conversation of every model; ``compare`` lays their rows side by
side, one row per (conversation, turn). ``ensemble="first"`` / ``"vote"`` asks every turn
of every model and keeps one answer; ``EnsembleTotals`` gathers, per model, how long each
turn took it and how often its answer was kept, and ``EnsembleFigures`` freezes that for
``result.summary.ensemble``. A model whose request was withdrawn (another answered first)
took at least as long as the winner: its figures are lower bounds, counted in
``withdrawn``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from nbllm.results_sample import SortedSample, percentile

if TYPE_CHECKING:
    import pandas as pd

    from nbllm.types import TurnRecord

__all__ = [
    "ENSEMBLES",
    "ENSEMBLE_COLUMNS",
    "EnsembleFigures",
    "EnsembleTotals",
    "agreement_key",
    "compare_frame",
    "ensemble_frame",
]

#: The values of ``ensemble=``.
ENSEMBLES = ("first", "vote")


def agreement_key(record: TurnRecord, by_parsed: bool) -> str | None:
    """What two answers must share to agree: the parsed value where a parser or schema
    read them (``by_parsed``), else the answer with case and runs of whitespace aside (as
    the ``"exact"`` metric compares). None for a row without an answer."""
    if not record.ok:
        return None
    if by_parsed:
        if record.parsed is None:
            return None
        return json.dumps(record.parsed, sort_keys=True, default=str)
    return " ".join((record.answer or "").casefold().split())


@dataclass(frozen=True, slots=True)
class EnsembleFigures:
    """One model of an ensemble, or (``model`` "ensemble") the turns it kept.

    ``turns``: turns it took part in and finished (answered or withdrawn); ``kept``: turns
    whose answer was its own (the winner, or the majority's first); ``withdrawn``: turns
    another model answered first, its request cancelled; ``turn_p50`` / ``turn_p95``:
    seconds from the turn being ready to its answer (a lower bound where ``withdrawn``:
    at least the winner's); ``gain_p95``: how much shorter the ensemble's p95 is than
    this model's (1 - ensemble / model; a lower bound where ``withdrawn``).
    """

    model: str
    turns: int
    kept: int
    withdrawn: int
    turn_p50: float | None
    turn_p95: float | None
    gain_p95: float | None


ENSEMBLE_COLUMNS = tuple(f.name for f in fields(EnsembleFigures))


class EnsembleTotals:
    """Each model's turn times in an ensemble run, and the ensemble's own."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self._seconds = [SortedSample() for _ in self.names]
        self._kept = [0] * len(self.names)
        self._withdrawn = [0] * len(self.names)
        self._ensemble = SortedSample()

    def turn(self, seconds: float, kept: int | None, times: Sequence[float | None]) -> None:
        """One turn: ``seconds`` it took the ensemble, the index of the model ``kept``,
        and each model's own time (None: it failed, or never finished). A model withdrawn
        counts the ensemble's time, ``withdrawn`` saying so, where ``times`` says -1."""
        self._ensemble.add(seconds)
        if kept is not None:
            self._kept[kept] += 1
        for i, took in enumerate(times):
            if took is None:
                continue
            if took < 0:
                self._withdrawn[i] += 1
                took = seconds
            self._seconds[i].add(took)

    def figures(self) -> list[EnsembleFigures]:
        own = self._ensemble.values()
        ens_p95 = percentile(own, 0.95)
        out = []
        for i, name in enumerate(self.names):
            values = self._seconds[i].values()
            p95 = percentile(values, 0.95)
            gain = None if not p95 or ens_p95 is None else 1.0 - ens_p95 / p95
            p50 = percentile(values, 0.5)
            kept, withdrawn = self._kept[i], self._withdrawn[i]
            out.append(EnsembleFigures(name, len(values), kept, withdrawn, p50, p95, gain))
        kept = sum(self._kept)
        out.append(
            EnsembleFigures("ensemble", len(own), kept, 0, percentile(own, 0.5), ens_p95, None)
        )
        return out


def ensemble_frame(figures: Sequence[EnsembleFigures]) -> pd.DataFrame:
    import pandas as pd

    rows = [[getattr(f, c) for c in ENSEMBLE_COLUMNS] for f in figures]
    df = pd.DataFrame(rows, columns=list(ENSEMBLE_COLUMNS))
    dtypes = {"model": "string", "turns": "Int64", "kept": "Int64", "withdrawn": "Int64"}
    for column in ENSEMBLE_COLUMNS:
        df[column] = df[column].astype(dtypes.get(column, "Float64"))
    return df


#: The figures ``compare`` shows for each model, beside its answer.
_PER_MODEL = ("latency_s", "prompt_tokens", "completion_tokens", "cost_usd", "error")


def compare_frame(
    records: Sequence[TurnRecord], models: Sequence[str], scores: Sequence[Any] | None
) -> pd.DataFrame:
    """One row per (conversation, turn); per model its answer (and ``parsed``, where any
    row has one), latency, tokens, cost (and ``saved_usd``, where a batch API answered any
    row), error and score (``scores``, by row, where the result is scored); then
    ``agreement``: the share of the models that answered whose answer is the most common
    one (as ``agreement_key`` compares them)."""
    import pandas as pd

    by_parsed = any(r.parsed is not None for r in records)
    # What a batch API saved sits beside the cost, in the runs that used one.
    per_model: tuple[str, ...] = _PER_MODEL
    if any(r.saved_usd is not None for r in records):
        at = per_model.index("cost_usd") + 1
        per_model = (*per_model[:at], "saved_usd", *per_model[at:])
    keys: dict[tuple[Any, int], int] = {}
    table: list[dict[str, Any]] = []
    cells: list[list[str | None]] = []
    for i, record in enumerate(records):
        where = (record.conversation_id, record.turn)
        if where not in keys:
            keys[where] = len(table)
            table.append({"conversation_id": where[0], "turn": where[1]})
            table[-1]["question"] = record.question
            table[-1]["reference"] = record.reference
            cells.append([])
        row = table[keys[where]]
        name = record.model or ""
        row[f"answer[{name}]"] = record.answer
        if by_parsed:
            row[f"parsed[{name}]"] = record.parsed
        for column in per_model:
            row[f"{column}[{name}]"] = getattr(record, column)
        if scores is not None:
            row[f"score[{name}]"] = scores[i]
        cells[keys[where]].append(agreement_key(record, by_parsed))
    for row, answers in zip(table, cells, strict=True):
        given = [a for a in answers if a is not None]
        top = Counter(given).most_common(1)
        row["agreement"] = top[0][1] / len(given) if top else None
    columns = ["conversation_id", "turn", "question", "reference"]
    for name in models:
        columns.append(f"answer[{name}]")
        if by_parsed:
            columns.append(f"parsed[{name}]")
        columns += [f"{c}[{name}]" for c in per_model]
        if scores is not None:
            columns.append(f"score[{name}]")
    columns.append("agreement")
    df = pd.DataFrame(table).reindex(columns=columns)
    df["agreement"] = df["agreement"].astype("Float64")
    return df
