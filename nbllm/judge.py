"""An LLM as judge: a second nbllm run that grades a result's answers against references.

``judge(result, model=..., rubric=...)`` (also ``result.judge(...)``) asks ``model`` about
every row of ``result`` that has both an answer and a reference, with the same executor,
limits, retries, checkpoint and dashboard as any run, and structured answers: the judge
must answer ``{"score": 0..1, "reason": "..."}`` (``Verdict``), asked again where it does
not. It adds ``judge_score`` (``Float64``) and ``judge_reason`` (``string``) columns to
``result.df`` (missing where a row was not judged) and returns the judge's own
``RunResult`` (its rows, cost and summary).

The prompts are plain strings, visible and overridable: ``system`` (``JUDGE_SYSTEM``) and
``prompt`` (``JUDGE_PROMPT``), whose ``{question}``, ``{answer}``, ``{reference}`` and
``{rubric}`` are filled per row. Any other keyword goes to ``nbllm.run`` (``api_base``,
``concurrency``, ``rpm``, ``checkpoint``, ...).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from nbllm.errors import ConfigError
from nbllm.results import RunResult
from nbllm.scoring import GIVE_REFERENCES

__all__ = ["DEFAULT_RUBRIC", "JUDGE_PROMPT", "JUDGE_SYSTEM", "Verdict", "judge"]

JUDGE_SYSTEM = (
    "You grade answers against a reference answer. You are strict and consistent, and you "
    "judge only what the answer says, not how it is written."
)
DEFAULT_RUBRIC = (
    "Score 1 when the answer says what the reference says (numbers equal, in any units or "
    "format), 0 when it contradicts the reference or misses it, and in between when it is "
    "partly right."
)
JUDGE_PROMPT = (
    "Question:\n{question}\n\nReference answer:\n{reference}\n\nAnswer to grade:\n{answer}\n\n"
    '{rubric}\nReply with a JSON object: {{"score": a number from 0 to 1, "reason": one '
    "short sentence}}."
)


class Verdict(BaseModel):
    """What the judge answers for each row."""

    score: float = Field(ge=0, le=1)
    reason: str


def judge(
    result: RunResult,
    *,
    model: str | None = None,
    rubric: str = DEFAULT_RUBRIC,
    prompt: str = JUDGE_PROMPT,
    system: str = JUDGE_SYSTEM,
    **options: Any,
) -> RunResult:
    """Grade ``result``'s answers with ``model`` (see the module); the judge's RunResult."""
    import pandas as pd

    import nbllm

    df = result.df
    rows = [
        i
        for i, (answer, reference) in enumerate(zip(df["answer"], df["reference"], strict=True))
        if answer is not pd.NA and reference is not pd.NA and str(reference).strip()
    ]
    if not rows:
        what = "no row has both an answer and a reference to grade against"
        msg = f"judge: {what}; {GIVE_REFERENCES}"
        raise ConfigError(msg)
    records = []
    for i in rows:
        try:
            text = prompt.format(
                question=df["question"].iloc[i],
                answer=df["answer"].iloc[i],
                reference=df["reference"].iloc[i],
                rubric=rubric,
            )
        except (KeyError, IndexError) as exc:
            msg = (
                f"judge: prompt= has a placeholder {exc} that is not one of {{question}}, "
                "{answer}, {reference}, {rubric} (double the braces of literal ones)"
            )
            raise ConfigError(msg) from None
        records.append({"id": i, "turns": [text]})
    graded = nbllm.run(records, model=model, system=system, response_format=Verdict, **options)
    scores: list[Any] = [pd.NA] * len(df)
    reasons: list[Any] = [pd.NA] * len(df)
    for record in graded.records:
        if isinstance(record.parsed, dict):
            i = int(record.conversation_id)  # type: ignore[call-overload]
            scores[i] = record.parsed["score"]
            reasons[i] = record.parsed["reason"]
    df["judge_score"] = pd.array(scores, dtype="Float64")
    df["judge_reason"] = pd.array(reasons, dtype="string")
    return graded
