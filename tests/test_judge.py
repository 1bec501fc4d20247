"""result.judge(): an LLM as judge, a second run against the test server."""

from __future__ import annotations

import pytest

import nbllm
from nbllm.engines import FakeEngine
from nbllm.errors import ConfigError
from nbllm.judge import JUDGE_PROMPT
from nbllm.testing import TestServer

FAST = {"checkpoint": False, "cache": False, "progress": False}
DATA = [
    {"id": "a", "turns": ["Revenue in 2020?", "And 2021?"], "references": ["12", "14"]},
    {"id": "b", "turns": ["Net income?"]},
]


def test_the_judge_grades_every_row_with_a_reference_and_adds_two_columns():
    with TestServer() as server:
        result = nbllm.run(DATA, model="m", api_base=server.url, **FAST)
        graded = result.judge(model="judge", api_base=server.url, **FAST)
        assert server.history_errors == 0
    assert graded.summary.turns_ok == 2  # the two rows with a reference
    df = result.df
    # The test server fills a number field with its turn plus a half: the judge answered.
    assert list(df["judge_score"].iloc[:2]) == [0.5, 0.5]
    assert df["judge_score"].isna().iloc[2]  # no reference: not judged
    assert df["judge_reason"].iloc[0].startswith("Answer to turn 0:")
    assert graded.df["parsed"].notna().all()


def test_the_judges_prompts_are_what_it_is_sent_and_can_be_changed():
    seen: list[list[dict[str, str]]] = []

    def grader(request):
        seen.append(list(request.messages))
        return '{"score": 1, "reason": "same number"}'

    result = nbllm.run(DATA, engine=FakeEngine(lambda r: "It was 12."), **FAST)
    result.judge(engine=FakeEngine(grader), rubric="Be kind.", system="You grade.", **FAST)
    system, user = seen[0]
    assert system == {"role": "system", "content": "You grade."}
    assert user["content"] == JUDGE_PROMPT.format(
        question="Revenue in 2020?", reference="12", answer="It was 12.", rubric="Be kind."
    )
    assert list(result.df["judge_score"].iloc[:2]) == [1.0, 1.0]
    with pytest.raises(ConfigError, match="placeholder 'answr'"):
        result.judge(engine=FakeEngine(grader), prompt="{answr}", **FAST)


def test_a_result_without_references_cannot_be_judged():
    result = nbllm.run([{"id": 1, "turns": ["hi"]}], engine=FakeEngine(), **FAST)
    with pytest.raises(ConfigError, match="no row has both an answer and a reference"):
        result.judge(engine=FakeEngine(), **FAST)
