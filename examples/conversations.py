"""Conversations: the shapes of data nbllm takes, and a template that builds them from a table.

Every turn of a conversation is sent with every earlier answer; different conversations run
at the same time. The answers come from nbllm's test server on this machine: no key, no
network. (The flow of notebooks/02-conversations.ipynb.)

    python examples/conversations.py
"""

from __future__ import annotations

import pandas as pd

import nbllm
from nbllm.template import ConversationTemplate
from nbllm.testing import TestServer

# 1. A list of records: one dict per conversation. Only "id" and "turns" are required;
#    "references" are never sent to the model (they are for scoring).
RECORDS = [
    {
        "id": "acme",
        "context": "Acme Corp revenue: 2022 $120m, 2023 $150m.",
        "turns": ["What was revenue in 2023?", "And in 2022?", "What was the growth?"],
        "references": ["150", "120", "25%"],
    },
    {"id": "globex", "turns": ["Who audits Globex?"]},  # one turn is a conversation too
]

# 2. A long DataFrame: one row per turn.
LONG = pd.DataFrame(
    {
        "conversation_id": ["a", "a", "b"],
        "turn": [0, 1, 0],
        "question": ["Name a prime number.", "And the next one?", "Name a colour."],
    }
)

# 3. A wide DataFrame: one row per conversation; an empty question ends it early.
WIDE = pd.DataFrame(
    {
        "id": ["x", "y"],
        "question_0": ["What is 2 + 2?", "What is 3 + 3?"],
        "question_1": ["Double it.", None],
    }
)

# 4. A template (the body of a %%llm_batch cell) turns any table into conversations:
#    {column} is filled from each row.
COMPANIES = pd.DataFrame(
    {
        "company": ["Initech", "Umbrella", "Hooli"],
        "year": [2023, 2023, 2022],
    }
)
TEMPLATE = """\
system: You are a careful financial analyst.
user: What was {company}'s revenue in {year}?
user: How does that compare with the year before?
"""


def main() -> None:
    for name, data in [("records", RECORDS), ("long", LONG), ("wide", WIDE)]:
        # load_conversations checks the data and sends nothing: a mistake is a
        # DatasetError naming the row and column, before any request.
        conversations = nbllm.load_conversations(data)
        turns = sum(len(c.questions) for c in conversations)
        print(f"{name}: {len(conversations)} conversations, {turns} turns")

    records = ConversationTemplate.parse(TEMPLATE).records(COMPANIES, id_column="company")
    print(f"template: {len(records)} conversations, first question: {records[0]['turns'][0]!r}")

    # The test server stands in for a model: its answers say which turn they answer.
    with TestServer() as server:
        result = nbllm.run(
            RECORDS + records,
            model="nbllm-test",
            api_base=server.url,
            progress=False,  # a script that prints its own lines
            checkpoint=False,  # an example: keep nothing on disk
            cache=False,
        )
    print(result.verdict)
    df = result.df
    print("rows per conversation:", df.groupby("conversation_id").size().to_dict())
    # Turn 2 of "acme" was sent with both earlier answers: the history travels.
    print("acme, turn 2:", df.loc[(df.conversation_id == "acme") & (df.turn == 2), "answer"].item())

    # A mistake is caught before anything is sent.
    try:
        nbllm.load_conversations([{"id": "bad", "turn": ["a misspelled key"]}])
    except nbllm.DatasetError as exc:
        print("refused:", exc)


if __name__ == "__main__":
    main()
