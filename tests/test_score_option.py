"""score= on the run: each answer scored against its reference as the run goes, by one rule
for the live figure, the summary and the score column."""

from __future__ import annotations

import pytest

import nbllm
from nbllm.engines import FakeEngine
from nbllm.errors import ConfigError
from nbllm.executor.stats import RunStats
from nbllm.ui.snapshot_text import figure_items

FAST = {"checkpoint": False, "cache": False, "progress": False}
DATA = [
    {"id": "a", "turns": ["revenue?", "growth?"], "references": ["12", "14 %"]},
    {"id": "b", "turns": ["costs?"], "references": ["8"]},
    {"id": "c", "turns": ["anything?"]},
]
ANSWERS = {"revenue?": "It was $12.0", "growth?": "0.14", "costs?": "about 7", "anything?": "x"}


def engine() -> FakeEngine:
    return FakeEngine(lambda request: ANSWERS[request.messages[-1]["content"]])


def test_the_running_score_the_summary_and_the_column_agree():
    stats = RunStats()
    seen: list[float | None] = []

    def listen(event):
        stats.update(event)
        seen.append(stats.snapshot().score)

    result = nbllm.run(DATA, engine=engine(), score="numeric", listeners=[listen], **FAST)
    scores = result.df["score"]
    assert list(scores.iloc[:3]) == [1.0, 1.0, 0.0] and scores.isna().iloc[3]
    assert result.summary.score == pytest.approx(2 / 3)
    assert result.summary.score_metric == "numeric"
    snap = stats.snapshot()
    assert snap.score == pytest.approx(result.summary.score)  # the live figure, same rule
    assert "score 0.67 (numeric)" in figure_items(snap)
    assert any(s is not None and s < snap.score for s in seen) or len(set(seen)) > 1
    # result.score() afterwards gives the same mean.
    assert result.score("numeric").mean == pytest.approx(result.summary.score)


def test_a_callable_that_fails_leaves_its_row_unscored_and_the_run_goes_on():
    def picky(answer, reference):
        if reference == "8":
            raise ValueError("cannot compare")
        return 1.0

    result = nbllm.run(DATA, engine=engine(), score=picky, **FAST)
    assert result.summary.turns_ok == 4
    assert result.summary.score == 1.0
    assert result.df["score"].isna().sum() == 2  # no reference, and the one that raised


@pytest.mark.parametrize(
    ("data", "score", "message"),
    [
        (DATA, "exactt", "did you mean 'exact'"),
        ([{"id": "c", "turns": ["anything?"]}], "exact", "score= needs references"),
    ],
)
def test_a_bad_score_is_refused_before_any_request(data, score, message):
    sent: list[object] = []
    fake = FakeEngine(lambda request: sent.append(request) or "x")
    with pytest.raises(ConfigError, match=message):
        nbllm.run(data, engine=fake, score=score, **FAST)
    assert sent == []
