"""Scoring answers against references, and reading the number a prose answer gives.

Pure functions, no I/O. ``find_number`` reads the first number of a text (currency,
thousands separators, accounting negatives, percentages, ``million``/``bn`` scales);
``read_number`` is its value or None, ``parse_number`` its value or a ``ValueError`` (what
``parse="number"`` uses). The metrics map ``(answer, reference)`` to a score from 0 to 1,
or None where the row cannot be scored (no reference); ``score`` scores a whole result,
adds the ``score`` column to its ``df`` and returns a ``ScoreSummary``.
"""

from __future__ import annotations

import html
import math
import numbers
import re
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial, wraps
from typing import TYPE_CHECKING, Any

from nbllm.dataset.cells import did_you_mean
from nbllm.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "GIVE_REFERENCES",
    "METRICS",
    "Metric",
    "MetricFunction",
    "Number",
    "ScoreSummary",
    "contains",
    "exact",
    "f1",
    "find_number",
    "numeric",
    "parse_number",
    "read_number",
    "resolve_metric",
    "run_scorer",
    "score",
]

#: A built-in metric: None for a row it cannot score (no reference), 0.0 for no answer.
Metric = Callable[[str | None, str | None], float | None]
#: A metric of one's own: called with an answer and a reference, returns 0 to 1 (or None).
MetricFunction = Callable[[str, str], float | None]


@dataclass(frozen=True, slots=True)
class Number:
    """A number read from text: ``value`` as written (``"14 %"`` is 14.0, with
    ``percent`` true; ``"$5m"`` is 5e6), and ``text``, the characters it was read from."""

    value: float
    percent: bool
    text: str


_CURRENCY = r"(?:(?:US\$|[$€£¥₹]|USD|EUR|GBP|JPY|CHF|CAD|AUD|CNY|INR|RMB)\x20?)"
_SIGN = "[-+\u2212\u2013]"  # ASCII, the minus sign, and the en dash that prose uses for one
_GROUP_SPACES = "\u00a0\u2009\u202f"  # no-break, thin and narrow no-break spaces
_NUMBER = re.compile(
    rf"""
    (?<![\w.\-\u2212\u2013])  # not inside a word, a number or a range: Q3, COVID-19
    (?P<sign>{_SIGN})?
    (?P<currency>{_CURRENCY})?
    (?P<sign2>{_SIGN})?
    (?P<int>
        \d{{1,3}}(?:,\d{{3}})+(?!\d)               # 1,234,567
      | \d{{1,3}}(?:[{_GROUP_SPACES}]\d{{3}})+(?!\d)  # 1 234 567 (thin spaces)
      | \d{{1,3}}(?:\x20\d{{3}})+(?![\d,])         # 1 234 567 (plain spaces)
      | \d+
      | (?=\.\d)                                 # .5
    )
    (?P<fraction>\.\d+)?
    (?P<exponent>[eE][-+]?\d+)?
    (?:
        (?P<percent>[\x20{_GROUP_SPACES}]?%|\x20?(?i:percent|per\x20cent|pct)\b)
      | \x20?(?P<word>(?i:thousand|million|billion|trillion|bn|mn))\b
      | (?P<suffix>k|K|m|M|MM|b|B|tn)(?![A-Za-z])
    )?
    """,
    re.VERBOSE,
)
_SCALES = {
    "thousand": 1e3,
    "k": 1e3,
    "million": 1e6,
    "m": 1e6,
    "mn": 1e6,
    "mm": 1e6,
    "billion": 1e9,
    "b": 1e9,
    "bn": 1e9,
    "trillion": 1e12,
    "tn": 1e12,
}


def find_number(text: str | None) -> Number | None:
    """The first number in ``text``, or None when it gives none.

    The first, not the last: an answer states its figure and then explains it ("12.5,
    up from 10"). Read: ``"$1,234.5"`` (currency symbols and ``USD``-style codes),
    ``"-3"`` and ``"−3"``, ``"(12.3)"`` and ``"($12.3)"`` (accounting negatives:
    parentheses around the number alone), ``"1.2e3"``, ``"1 234"`` (thousands grouped by
    a space or a thin space; a plain space groups only runs of exactly three digits, so
    ``"100 200"`` reads as 100200), ``"14 %"``/``"14 percent"`` (value 14.0, ``percent``
    true), ``"5m"``, ``"USD 5M"``, ``"$1.2bn"``, ``"5 million"`` (scaled; a one-letter
    scale, k m b, must follow the digits directly, so ``"5 m"`` is 5). Not read: words
    (``"twelve"``), digits inside a word or after a hyphen (``"Q3"``, ``"COVID-19"``),
    decimal commas (``"1,5"`` reads as 1).
    """
    if not text:
        return None
    found = _NUMBER.search(text)
    if found is None:
        return None
    digits = found.group("int")
    for separator in "," + _GROUP_SPACES + " ":
        digits = digits.replace(separator, "")
    value = float(digits + (found.group("fraction") or "") + (found.group("exponent") or ""))
    scale = found.group("word") or found.group("suffix")
    if scale:
        value *= _SCALES[scale.lower()]
    sign = found.group("sign") or found.group("sign2")
    negative = sign != "+" if sign else _in_parentheses(text, found.start(), found.end())
    if negative:
        value = -value
    return Number(value, found.group("percent") is not None, found.group(0))


def _in_parentheses(text: str, start: int, end: int) -> bool:
    before = text[:start].rstrip()
    after = text[end:].lstrip()
    return before.endswith("(") and after.startswith(")")


def read_number(text: str | None) -> float | None:
    """The value of ``find_number(text)`` (``"14 %"`` gives 14.0), or None."""
    number = find_number(text)
    return None if number is None else number.value


def parse_number(text: str) -> float:
    """The value of the first number in ``text``, as ``find_number`` reads it.

    What ``parse="number"`` uses: ``"$1,234.5"`` -> 1234.5, ``"(12.3)"`` -> -12.3,
    ``"14 %"`` -> 14.0. Raises ``ValueError`` naming the text when it holds no number.
    """
    number = find_number(text)
    if number is None:
        shown = text if len(text) <= 60 else text[:57] + "..."
        msg = f"no number in {shown!r}"
        raise ValueError(msg)
    return number.value


# --- the metrics ------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _normalised(text: str) -> str:
    return " ".join(text.casefold().split())


def _tokens(text: str) -> list[str]:
    """SQuAD's normalisation: lower case, no punctuation, no articles, split on space."""
    return _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split()


def _needs_both(compare: Callable[[str, str], float | None]) -> Metric:
    """``compare`` as a metric: None for a row without a reference, 0.0 for a row with
    one but without an answer (a failed turn), else ``compare(answer, reference)``."""

    @wraps(compare)
    def metric(answer: str | None, reference: str | None) -> float | None:
        if reference is None or not reference.strip():
            return None
        if answer is None:
            return 0.0
        return compare(answer, reference)

    return metric


@_needs_both
def exact(answer: str, reference: str) -> float:
    """1.0 when the answer is the reference, case and runs of whitespace aside."""
    return float(_normalised(answer) == _normalised(reference))


@_needs_both
def contains(answer: str, reference: str) -> float:
    """1.0 when the reference appears in the answer, case and runs of whitespace aside."""
    return float(_normalised(reference) in _normalised(answer))


def _numeric(answer: str, reference: str, *, rel_tol: float = 1e-2) -> float | None:
    expected = find_number(reference)
    if expected is None:
        return None
    got = find_number(answer)
    if got is None:
        return 0.0

    def close(a: float, b: float) -> bool:
        return math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-12)

    return float(
        close(got.value, expected.value)
        or (got.percent and close(got.value / 100, expected.value))
        or (expected.percent and close(got.value, expected.value / 100))
    )


def numeric(answer: str | None, reference: str | None, *, rel_tol: float = 1e-2) -> float | None:
    """1.0 when the first numbers of both (``find_number``) agree within ``rel_tol``.

    A percentage counts either way: ``"14 %"`` equals both ``"14"`` and ``"0.14"``.
    None when the reference gives no number; 0.0 when the answer gives none.
    """
    return _needs_both(partial(_numeric, rel_tol=rel_tol))(answer, reference)


@_needs_both
def f1(answer: str, reference: str) -> float:
    """Token overlap (SQuAD's F1): the harmonic mean of the share of the answer's tokens
    found in the reference and the share of the reference's tokens found in the answer."""
    got, expected = _tokens(answer), _tokens(reference)
    if not got or not expected:
        return float(got == expected)
    common = sum((Counter(got) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(expected)
    return 2 * precision * recall / (precision + recall)


METRICS: dict[str, Metric] = {"exact": exact, "contains": contains, "numeric": numeric, "f1": f1}


def _check_rel_tol(rel_tol: Any) -> float:
    good = isinstance(rel_tol, int | float) and not isinstance(rel_tol, bool)
    if not good or not math.isfinite(rel_tol) or rel_tol <= 0:
        msg = f"rel_tol: expected a number above 0 (such as 0.01), got {rel_tol!r}"
        raise ConfigError(msg)
    return float(rel_tol)


def _built_in(name: str, rel_tol: float) -> Metric:
    return partial(numeric, rel_tol=rel_tol) if name == "numeric" else METRICS[name]


def resolve_metric(
    metric: str | MetricFunction, *, rel_tol: float = 1e-2
) -> tuple[str, Metric | MetricFunction]:
    """``(name, function)`` for a metric's name or a callable; bad names and a bad
    ``rel_tol`` raise ``ConfigError`` (what a run option ``score=`` can check up front)."""
    tolerance = _check_rel_tol(rel_tol)
    if isinstance(metric, str):
        if metric not in METRICS:
            hint = did_you_mean(metric, list(METRICS))
            names = ", ".join(repr(name) for name in METRICS)
            msg = f"metric: unknown metric {metric!r}{hint}; expected one of {names} or a callable"
            raise ConfigError(msg)
        return metric, _built_in(metric, tolerance)
    if callable(metric):
        return getattr(metric, "__name__", type(metric).__name__), metric
    msg = f"metric: expected a metric's name or a callable (answer, reference), got {metric!r}"
    raise ConfigError(msg)


def run_scorer(
    metric: str | MetricFunction, *, rel_tol: float = 1e-2
) -> tuple[str, Callable[[str | None, str | None], float | None]]:
    """``score=`` of a run: the metric's name and a function that scores one row as the
    run goes (the live figure, the summary's ``score`` and the ``score`` column). A row
    without a reference is not scored; a failed turn with one scores 0. A callable's
    exception or a value outside 0 to 1 leaves that row unscored, never stops the run
    (``result.score(metric)`` afterwards names the row)."""
    name, function = resolve_metric(metric, rel_tol=rel_tol)
    if isinstance(metric, str):
        return name, _built_in(metric, float(rel_tol))

    def guarded(answer: str, reference: str) -> float | None:
        try:
            value = function(answer, reference)
        except Exception:
            return None
        if isinstance(value, numbers.Real) and 0 <= float(value) <= 1:
            return float(value)
        return None

    return name, _needs_both(guarded)


#: How a user gives references: said wherever scoring finds none.
GIVE_REFERENCES = (
    "give references with the data (a reference column, answer_<k> columns, or a record's "
    "references)"
)


# --- scoring a result -------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ScoreSummary:
    """What ``RunResult.score`` found: ``mean`` over the ``scored`` rows (of ``rows``),
    and the mean ``by_turn`` (a Series indexed by turn) and ``by_model``."""

    metric: str
    mean: float | None
    scored: int
    rows: int
    by_turn: pd.Series
    by_model: pd.Series

    @property
    def headline(self) -> str:
        mean = "-" if self.mean is None else f"{self.mean:.3f}"
        line = f"{self.metric}: mean {mean} over {self.scored:,} of {self.rows:,} rows"
        unscored = self.rows - self.scored
        return line + (f" ({unscored:,} without a usable reference)" if unscored else "")

    def _tables(self) -> list[tuple[str, list[tuple[str, str]]]]:
        return [
            (title, [(str(key), f"{value:.3f}") for key, value in series.items()])
            for title, series in (("by turn", self.by_turn), ("by model", self.by_model))
        ]

    def __str__(self) -> str:
        lines = [self.headline]
        for title, rows in self._tables():
            width = max((len(key) for key, _ in rows), default=0)
            lines.append(f"{title}:")
            lines.extend(f"  {key:<{width}}  {value}" for key, value in rows)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<ScoreSummary {self.headline}>"

    def _repr_html_(self) -> str:
        parts = [f"<p>{html.escape(self.headline)}</p>"]
        for title, rows in self._tables():
            cells = "".join(
                f"<tr><th style='text-align:left'>{html.escape(key)}</th>"
                f"<td style='text-align:right'>{value}</td></tr>"
                for key, value in rows
            )
            caption = f"<caption style='text-align:left'>{html.escape(title)}</caption>"
            parts.append(f"<table>{caption}{cells}</table>")
        return "".join(parts)


def _text(value: Any) -> str | None:
    import pandas as pd

    return None if value is None or value is pd.NA else str(value)


def _row(df: pd.DataFrame, i: int) -> str:
    return f"row {i} (conversation {df['conversation_id'].iloc[i]!r}, turn {df['turn'].iloc[i]})"


def _user_score(
    function: MetricFunction, name: str, answer: str | None, reference: str | None, df: Any, i: int
) -> float | None:
    """A callable metric's score of row ``i``, checked to be a number from 0 to 1 (None:
    not scored)."""
    if reference is None or not reference.strip():
        return None
    if answer is None:
        return 0.0
    try:
        value = function(answer, reference)
    except Exception as exc:
        msg = f"metric={name}: {_row(df, i)}: raised {type(exc).__name__}: {exc}"
        raise ConfigError(msg) from exc
    if value is None:
        return None
    if not isinstance(value, numbers.Real) or not 0 <= float(value) <= 1:  # NaN fails too
        msg = f"metric={name}: {_row(df, i)}: expected a number from 0 to 1, got {value!r}"
        raise ConfigError(msg)
    return float(value)


def score(
    result: Any, metric: str | MetricFunction = "exact", *, rel_tol: float = 1e-2
) -> ScoreSummary:
    """Score every row of ``result`` (a ``RunResult``) against its reference.

    Adds (or replaces) the ``score`` column of ``result.df`` (``Float64``: missing where
    a row has no reference, or the metric could not read it) and returns the summary.
    A row with a reference but no answer (a failed turn) scores 0. ``metric`` is a name
    of ``METRICS`` or a callable ``(answer, reference) -> float`` from 0 to 1 (or None:
    not scored), called only for rows with both. ``rel_tol`` is ``"numeric"``'s tolerance.
    Rows without an answer name no model; ``by_model`` counts them under the model the
    run asked for. Raises ``ConfigError`` for an unknown metric, a ``rel_tol`` not above
    0, a result without any reference, or a callable's value out of range.
    """
    import pandas as pd

    name, _ = resolve_metric(metric, rel_tol=rel_tol)  # refuses bad options first
    df = result.df
    references = [_text(value) for value in df["reference"]]
    if not any(ref is not None and ref.strip() for ref in references):
        msg = f"score: no row has a reference to score against; {GIVE_REFERENCES}"
        raise ConfigError(msg)
    answers = [_text(value) for value in df["answer"]]
    if isinstance(metric, str):
        built_in = _built_in(metric, float(rel_tol))
        scores = [built_in(a, r) for a, r in zip(answers, references, strict=True)]
    else:
        scores = [
            _user_score(metric, name, a, r, df, i)
            for i, (a, r) in enumerate(zip(answers, references, strict=True))
        ]
    column = pd.array(scores, dtype="Float64")
    df["score"] = column
    models = df["model"]
    if isinstance(getattr(result, "model", None), str):
        models = models.fillna(result.model)
    frame = pd.DataFrame({"turn": df["turn"], "model": models, "score": column})
    frame = frame[frame["score"].notna()]
    mean = float(frame["score"].mean()) if len(frame) else None
    return ScoreSummary(
        metric=name,
        mean=mean,
        scored=len(frame),
        rows=len(df),
        by_turn=frame.groupby("turn", dropna=False)["score"].mean().astype("float64"),
        by_model=frame.groupby("model", dropna=False)["score"].mean().astype("float64"),
    )
