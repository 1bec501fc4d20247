"""Structured answers and evaluation: a pydantic schema, scores against the references, and two
models compared side by side.

Part 1 asks nbllm's test server for answers that follow a pydantic schema; nbllm validates
each one and asks again, showing the model what was wrong, when an answer does not parse.
Part 2 scores two "models" against the dataset's reference answers and lays them side by
side. Its models are nbllm.FakeEngine handlers, Python functions that stand in for models,
so that the scores mean something without a real model. No key, no network. (The flow of
notebooks/05-structured-answers-and-evaluation.ipynb.)

    python examples/structured_answers.py
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pydantic

import nbllm
from nbllm.scoring import parse_number
from nbllm.testing import TestServer

DATA = Path(__file__).resolve().parent / "data" / "finqa_sample.jsonl"
EXAMPLE = {"progress": False, "checkpoint": False, "cache": False}


class Figure(pydantic.BaseModel):
    """What each answer must be: a number and its unit."""

    value: float
    unit: str


def part_1_schema() -> None:
    # bad_json_first=2: the server's first two answers are broken JSON, as a model's
    # sometimes are. nbllm asks again (parse_retries, default 2) and keeps the answer that
    # parses; later turns carry only that one.
    with TestServer(bad_json_first=2) as server:
        result = nbllm.run(
            DATA, model="nbllm-test", api_base=server.url, response_format=Figure, **EXAMPLE
        )
    print(result.verdict)
    print("asked again:", result.summary.parse_retries)
    # One column per field of the schema.
    print(result.parsed_df()[["conversation_id", "turn", "value"]].head(3).to_string(index=False))


CONVERSATIONS = nbllm.load_conversations(DATA)


def reference_of(request: nbllm.ChatRequest) -> str:
    """The reference answer to a request's last question (what a perfect model would say):
    the conversation is the one whose questions so far are the request's."""
    asked = tuple(str(m["content"]) for m in request.messages if m["role"] == "user")
    for conversation in CONVERSATIONS:
        if conversation.questions[: len(asked)] == asked:
            return conversation.references[len(asked) - 1] or ""
    return ""


def two_models(request: nbllm.ChatRequest) -> str:
    """Stands for two models: "careful" always gives the reference, "hasty" only on a
    conversation's first turn (its later answers are off by ten percent)."""
    right = reference_of(request)
    first_turn = not any(m["role"] == "assistant" for m in request.messages)
    if request.model == "careful" or first_turn:
        return f"The answer is {right}."
    number = parse_number(right)
    return f"About {number * 1.1:.2f}." if number is not None else "I do not know."


def part_2_scores() -> None:
    # model=[...]: every conversation is asked of every model, each with its own history.
    result = nbllm.run(
        DATA, engine=nbllm.FakeEngine(two_models), model=["careful", "hasty"], **EXAMPLE
    )
    # "numeric": the first number of the answer and of the reference, equal within 1 %.
    summary = result.score("numeric")
    print(f"mean score: {summary.mean:.2f} over {summary.scored} rows")
    print("by model:", summary.by_model.round(2).to_dict())
    print("by turn: ", {int(k): round(v, 2) for k, v in summary.by_turn.items()})
    side_by_side = result.compare()
    print(
        f"the models agree on {(side_by_side['agreement'] == 1).sum()} of {len(side_by_side)} turns"
    )
    with pd.option_context("display.width", 120, "display.max_colwidth", 30):
        print(
            side_by_side[["turn", "answer[careful]", "answer[hasty]"]]
            .head(4)
            .to_string(index=False)
        )


def main() -> None:
    part_1_schema()
    print()
    part_2_scores()
    # With real providers: model=["openai/gpt-4o-mini", "anthropic/claude-3-5-haiku-latest"]
    # and no engine=; response_format= works the same. result.judge(model=...) grades the
    # answers with a model as judge where numbers are not enough.


if __name__ == "__main__":
    main()
