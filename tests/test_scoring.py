"""Scoring answers against references (``result.score``) and reading numbers from prose
(``parse_number``, what ``parse="number"`` uses): hand-checked cases, bad input refused
with one line before anything is scored, and whole runs scored end to end."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import pytest

import nbllm
from nbllm.errors import ConfigError
from nbllm.results import RunResult
from nbllm.scoring import (
    contains,
    exact,
    f1,
    find_number,
    numeric,
    parse_number,
    read_number,
    resolve_metric,
)
from nbllm.testing import TestServer
from nbllm.types import TurnRecord

# --- reading numbers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value", "percent"),
    [
        ("$1,234.5", 1234.5, False),
        ("1,234,567.89 USD", 1234567.89, False),
        ("(12.3)", -12.3, False),  # an accounting negative
        ("($12.3)", -12.3, False),
        ("the change was (4.1%)", -4.1, True),
        ("14 %", 14.0, True),
        ("14%", 14.0, True),
        ("14\u00a0%", 14.0, True),
        ("about 14 percent", 14.0, True),
        ("-3", -3.0, False),
        ("\u22123", -3.0, False),  # the minus sign
        ("$-5", -5.0, False),
        ("-$5", -5.0, False),
        ("+2.5", 2.5, False),
        ("1.2e3", 1200.0, False),
        ("1.2E-2", 0.012, False),
        (".5", 0.5, False),
        ("1 234", 1234.0, False),
        ("1\u2009234\u2009567", 1234567.0, False),  # thin spaces
        ("1 2345", 1.0, False),  # not a group of three: two numbers, the first read
        ("USD 5m", 5e6, False),
        ("5 million", 5e6, False),
        ("$1.2bn", 1.2e9, False),
        ("$1.2 Billion", 1.2e9, False),
        ("12.5k", 12500.0, False),
        ("5 m", 5.0, False),  # a spaced single letter is a unit, not a scale
        ("5mg", 5.0, False),
        ("The answer is 12.5, up from 10", 12.5, False),  # the first number
        ("Q3 revenue was 7", 7.0, False),  # digits inside a word are not a number
        ("COVID-19 cost 3", 3.0, False),
        ("2019-2020", 2019.0, False),
        ("version 1.2.3", 1.2, False),
        ("It is 12.5.", 12.5, False),
    ],
)
def test_find_number_reads_the_number_a_prose_answer_gives(
    text: str, value: float, percent: bool
) -> None:
    number = find_number(text)
    assert number is not None
    assert number.value == pytest.approx(value)
    assert number.percent is percent
    assert parse_number(text) == number.value == read_number(text)


@pytest.mark.parametrize("text", ["twelve", "", "no figures here", "Q3", "COVID-19", "."])
def test_text_without_a_number_reads_none(text: str) -> None:
    assert find_number(text) is None
    assert read_number(text) is None
    assert read_number(None) is None


def test_parse_number_raises_a_value_error_naming_the_text() -> None:
    with pytest.raises(ValueError, match="no number in 'twelve'"):
        parse_number("twelve")
    with pytest.raises(ValueError) as caught:
        parse_number("x" * 200)
    assert len(str(caught.value)) < 80  # a long answer is cut, the message stays one line


# --- the metrics --------------------------------------------------------------------------


def test_exact_ignores_case_and_runs_of_whitespace_only() -> None:
    assert exact("  Paris\n", "paris") == 1.0
    assert exact("New   York", "new york") == 1.0
    assert exact("Paris.", "Paris") == 0.0
    assert exact("Paris", None) is None  # no reference: not scored
    assert exact("Paris", "  ") is None
    assert exact(None, "Paris") == 0.0  # a failed turn scores 0


def test_contains_finds_the_reference_inside_the_answer() -> None:
    assert contains("The capital is  PARIS, of course.", "paris") == 1.0
    assert contains("Lyon", "Paris") == 0.0
    assert contains(None, "Paris") == 0.0
    assert contains("Paris", None) is None


@pytest.mark.parametrize(
    ("answer", "reference", "expected"),
    [
        ("14 %", "0.14", 1.0),  # percentages either way
        ("0.14", "14%", 1.0),
        ("14%", "14", 1.0),
        ("14", "14 %", 1.0),
        ("14", "0.14", 0.0),  # neither is marked as a percentage
        ("The answer is 12.5, up from 10", "12.5", 1.0),
        ("12.6", "12.5", 1.0),  # within 1 %
        ("12.7", "12.5", 0.0),
        ("$1,234.5", "1234.5", 1.0),
        ("(12.3)", "-12.3", 1.0),
        ("12.3", "-12.3", 0.0),
        ("USD 5m", "5,000,000", 1.0),
        ("0", "0", 1.0),
        ("0.001", "0", 0.0),
        ("twelve", "12", 0.0),  # the answer gives no number
        (None, "12", 0.0),
        ("12", "twelve", None),  # nothing to compare against
        ("12", None, None),
    ],
)
def test_numeric_on_hand_checked_cases(
    answer: str | None, reference: str | None, expected: float | None
) -> None:
    assert numeric(answer, reference) == expected


def test_numeric_tolerance_is_relative_and_settable() -> None:
    assert numeric("12.7", "12.5", rel_tol=0.05) == 1.0
    assert numeric("1,010,000", "1,000,000") == 1.0
    assert numeric("1,020,000", "1,000,000") == 0.0
    _, loose = resolve_metric("numeric", rel_tol=0.05)
    assert loose("12.7", "12.5") == 1.0


def test_f1_is_squad_token_overlap() -> None:
    # answer tokens {cat, sat}, reference {cat, sat, down}: precision 1, recall 2/3
    assert f1("The cat sat.", "a cat sat down") == pytest.approx(0.8)
    assert f1("Paris!", "paris") == 1.0
    assert f1("Lyon", "Paris") == 0.0
    assert f1("red red", "red") == pytest.approx(2 / 3)  # a repeated token counts once
    assert f1("", "Paris") == 0.0
    assert f1("the", "a") == 1.0  # both only articles: nothing left on either side
    assert f1(None, "Paris") == 0.0
    assert f1("Paris", None) is None


# --- bad input ----------------------------------------------------------------------------


def test_an_unknown_metric_is_refused_with_a_did_you_mean() -> None:
    with pytest.raises(ConfigError) as caught:
        resolve_metric("exct")
    message = str(caught.value)
    assert "unknown metric 'exct' (did you mean 'exact'?)" in message
    assert "'numeric'" in message and "\n" not in message
    with pytest.raises(ConfigError, match="expected a metric's name or a callable"):
        resolve_metric(42)  # type: ignore[arg-type]


@pytest.mark.parametrize("rel_tol", [0, -0.1, math.nan, math.inf, True, "0.01", None])
def test_a_rel_tol_not_above_zero_is_refused(rel_tol: object) -> None:
    with pytest.raises(ConfigError, match=r"^rel_tol: expected a number above 0"):
        resolve_metric("numeric", rel_tol=rel_tol)  # type: ignore[arg-type]


def _result(records: list[TurnRecord], model: str | None = "m") -> RunResult:
    return RunResult(records, conversations=2, wall_s=1.0, started_at=0.0, model=model)


def _records() -> list[TurnRecord]:
    return [
        TurnRecord("a", 0, "q", answer="Paris", reference="paris", model="m"),
        TurnRecord("a", 1, "q", answer="Rome", reference="Milan", model="m"),
        TurnRecord("b", 0, "q", answer="Oslo", reference="oslo", model="m"),
        TurnRecord("b", 1, "q", reference="Bergen", error="ServerError: 500"),  # no model
        TurnRecord("c", 0, "q", answer="Bern", model="m"),  # no reference
    ]


def test_scoring_a_result_without_any_reference_is_refused() -> None:
    result = _result([TurnRecord("a", 0, "q", answer="x", model="m")])
    with pytest.raises(ConfigError, match=r"^score: no row has a reference"):
        result.score("exact")
    assert "score" not in result.df.columns


def test_bad_options_are_refused_before_any_row_is_scored() -> None:
    result = _result(_records())
    with pytest.raises(ConfigError, match="did you mean 'contains'"):
        result.score("contain")
    with pytest.raises(ConfigError, match="rel_tol"):
        result.score("numeric", rel_tol=0)
    assert "score" not in result.df.columns


# --- scoring a result ---------------------------------------------------------------------


def test_score_adds_a_float_column_and_summarises_by_turn_and_model() -> None:
    result = _result(_records())
    summary = result.score("exact")
    column = result.df["score"]
    assert str(column.dtype) == "Float64"
    assert column.tolist()[:4] == [1.0, 0.0, 1.0, 0.0]  # the failed turn scores 0
    assert column.isna().tolist() == [False, False, False, False, True]
    assert summary.metric == "exact"
    assert (summary.scored, summary.rows) == (4, 5)
    assert summary.mean == pytest.approx(0.5)
    assert summary.by_turn.to_dict() == {0: 1.0, 1: 0.0}
    # the failed row names no model: it counts under the model the run asked for
    assert summary.by_model.to_dict() == {"m": 0.5}
    assert summary.by_turn.index.name == "turn" and summary.by_model.index.name == "model"

    text = str(summary)
    assert text.splitlines()[0] == (
        "exact: mean 0.500 over 4 of 5 rows (1 without a usable reference)"
    )
    assert "by turn:\n  0  1.000\n  1  0.000\nby model:\n  m  0.500" in text
    assert "0.500" in summary._repr_html_() and "<table>" in summary._repr_html_()


def test_scoring_again_replaces_the_column() -> None:
    result = _result(_records())
    result.score("exact")
    summary = result.score(lambda answer, reference: 0.25)
    assert result.df["score"].dropna().tolist() == [0.25, 0.25, 0.25, 0.0]
    assert summary.metric == "<lambda>"
    assert list(result.df.columns).count("score") == 1


def test_a_callable_metric_sees_only_rows_with_an_answer_and_a_reference() -> None:
    seen = []

    def same_length(answer: str, reference: str) -> bool:
        seen.append((answer, reference))
        return len(answer) == len(reference)

    result = _result(_records())
    summary = result.score(same_length)
    assert seen == [("Paris", "paris"), ("Rome", "Milan"), ("Oslo", "oslo")]
    assert result.df["score"].tolist()[:4] == [1.0, 0.0, 1.0, 0.0]  # a bool counts as 1 or 0
    assert summary.metric == "same_length"


@pytest.mark.parametrize("value", [1.5, -0.1, math.nan, "1", [1]])
def test_a_callable_metric_out_of_range_names_the_row(value: object) -> None:
    result = _result(_records())

    def metric(answer: str, reference: str) -> Any:
        return value if answer == "Rome" else 1.0

    with pytest.raises(ConfigError) as caught:
        result.score(metric)
    message = str(caught.value)
    assert message.startswith("metric=metric: row 1 (conversation 'a', turn 1): ")
    assert "expected a number from 0 to 1" in message


def test_a_callable_metric_that_raises_names_the_row() -> None:
    def broken(answer: str, reference: str) -> float:
        return 1 / 0

    with pytest.raises(ConfigError, match=r"row 0 \(conversation 'a', turn 0\).*ZeroDivision"):
        _result(_records()).score(broken)


def test_a_summary_with_no_scorable_row_says_so() -> None:
    # references there, but none is a number: "numeric" cannot score any row
    result = _result([TurnRecord("a", 0, "q", answer="12", reference="twelve", model="m")])
    summary = result.score("numeric")
    assert summary.mean is None and summary.scored == 0
    assert str(summary).startswith("numeric: mean - over 0 of 1 rows")
    assert result.df["score"].isna().all()


# --- whole runs ---------------------------------------------------------------------------


def test_a_run_against_the_test_server_is_scored_by_every_metric() -> None:
    # The test server answers "Answer to turn {turn}: {question} [key]".
    data = [
        {
            "id": "fr",
            "turns": ["capital of France?", "and Italy?"],
            "references": ["Capital of France", "Rome"],
        },
        {"id": "de", "turns": ["capital of Germany?"], "references": ["Berlin"]},
        {"id": "x", "turns": ["no reference here"]},
    ]
    with TestServer() as server:
        result = nbllm.run(
            data,
            model="nbllm-test",
            api_base=server.url,
            progress=False,
            checkpoint=False,
            cache=False,
        )
    assert result.summary.turns_ok == 4

    summary = result.score("contains")
    assert result.df["score"].tolist()[:3] == [1.0, 0.0, 0.0]
    assert result.df["score"].isna().tolist() == [False, False, False, True]
    assert summary.mean == pytest.approx(1 / 3)
    assert summary.by_turn.to_dict() == {0: 0.5, 1: 0.0}
    assert list(summary.by_model.index) == ["nbllm-test"]

    assert result.score("exact").mean == 0.0
    # no reference here is a number: "numeric" has nothing to compare against
    assert result.score("numeric").scored == 0
    f1_scores = result.score("f1")
    assert f1_scores.mean is not None and 0 < f1_scores.mean < 1
    first_answer = str(result.df["answer"].iloc[0])
    assert result.df["score"].iloc[0] == pytest.approx(f1(first_answer, "Capital of France"))


def test_a_finance_run_scored_numerically_takes_percentages_either_way() -> None:
    answers = {
        "growth?": "Revenue grew 14 % year on year, from 10.2 to 11.6.",
        "margin?": "The margin was (3.1)%.",
        "cash?": "About $1.2bn.",
        "ratio?": "I cannot tell.",
    }
    references = {"growth?": "0.14", "margin?": "-3.1%", "cash?": "1,200,000,000", "ratio?": "1.5"}
    data = [{"id": q, "turns": [q], "references": [references[q]]} for q in answers]
    engine = nbllm.FakeEngine(lambda request: answers[request.messages[-1]["content"]])
    result = nbllm.run(
        data, engine=engine, model="m", progress=False, checkpoint=False, cache=False
    )
    summary = result.score("numeric")
    assert result.df["score"].tolist() == [1.0, 1.0, 1.0, 0.0]
    assert summary.mean == pytest.approx(0.75)
    assert isinstance(summary.by_model, pd.Series)


def test_a_callable_may_leave_a_row_unscored_and_the_html_escapes_names() -> None:
    records = [
        TurnRecord("a", 0, "q", answer="yes", reference="yes", model="<b>m</b>"),
        TurnRecord("a", 1, "q", answer="n/a", reference="no", model="<b>m</b>"),
    ]
    summary = _result(records).score(lambda answer, reference: None if answer == "n/a" else 1)
    assert (summary.scored, summary.mean) == (1, 1.0)
    page = summary._repr_html_()
    assert "&lt;b&gt;m&lt;/b&gt;" in page and "<b>m" not in page
