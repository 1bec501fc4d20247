"""A record's own opening messages (few-shot, or a transcript to continue) and its per-turn
sampling parameters."""

from __future__ import annotations

import pytest

import nbllm
from nbllm import ChatRequest, Conversation, FakeEngine
from nbllm.dataset import load_conversations
from nbllm.errors import DatasetError
from nbllm.testing import TestServer
from nbllm.testing.request_log import messages_key

FEW_SHOT = [
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "3+3?"},
    {"role": "assistant", "content": "6"},
]


def test_opening_messages_come_after_the_system_message_and_before_every_turns_questions():
    requests: list[ChatRequest] = []

    def answer(request: ChatRequest) -> str:
        requests.append(request)
        return f"answer {len(requests)}"

    result = nbllm.run(
        [{"id": "a", "turns": ["5+5?", "And doubled?", "Halved?"], "messages": FEW_SHOT}],
        engine=FakeEngine(answer),
        model="m",
        system="Answer with a number.",
        checkpoint=False,
        progress=False,
    )
    assert result.summary.turns_ok == 3
    system = {"role": "system", "content": "Answer with a number."}
    turns = [
        {"role": "user", "content": "5+5?"},
        {"role": "assistant", "content": "answer 1"},
        {"role": "user", "content": "And doubled?"},
        {"role": "assistant", "content": "answer 2"},
        {"role": "user", "content": "Halved?"},
    ]
    assert [list(r.messages) for r in requests] == [
        [system, *FEW_SHOT, *turns[:1]],
        [system, *FEW_SHOT, *turns[:3]],
        [system, *FEW_SHOT, *turns],
    ]
    # The opening messages are the model's input, not rows of the result.
    assert result.df["question"].tolist() == ["5+5?", "And doubled?", "Halved?"]


def test_an_earlier_transcript_continues_on_a_real_server_with_exact_history():
    options = {"model": "openai/nbllm-test", "checkpoint": False, "progress": False}
    with TestServer() as server:
        earlier = nbllm.run(
            [{"id": "t", "turns": ["Hello"], "system": "You are terse."}],
            api_base=server.url,
            **options,
        )
        transcript = [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": earlier.df["answer"].iloc[0]},
        ]
        before = len(server.requests)
        records = [{"id": "t", "turns": ["Where were we?", "Go on"], "messages": transcript}]
        result = nbllm.run(records, api_base=server.url, **options)
        keys = [e.key for e in server.requests[before:] if e.status == 200]
        history_errors = server.history_errors
    # The server refuses an assistant message it did not give: the transcript reached it
    # whole, in place, in both turns.
    assert result.summary.turns_ok == 2
    assert history_errors == 0
    first = result.df["answer"].iloc[0]
    sent = [*transcript, {"role": "user", "content": "Where were we?"}]
    assert keys == [
        messages_key(sent),
        messages_key(
            [*sent, {"role": "assistant", "content": first}, {"role": "user", "content": "Go on"}]
        ),
    ]


def test_a_leading_system_message_is_the_conversations_system_prompt():
    (conv,) = load_conversations(
        [
            {
                "id": "a",
                "turns": ["q"],
                "messages": [{"role": "system", "content": "S"}, *FEW_SHOT[:2]],
            }
        ],
        system="default",
    )
    assert conv.system == "S"
    assert conv.messages == tuple(FEW_SHOT[:2])
    assert conv.messages_for(0, [])[0] == {"role": "system", "content": "S"}


def test_conversation_objects_keep_their_messages_and_a_caller_cannot_edit_them():
    given = Conversation("c", ("q",), messages=tuple(FEW_SHOT))
    (conv,) = load_conversations([given])
    sent = conv.messages_for(0, [])
    sent[0]["content"] = "edited"
    assert conv.messages_for(0, [])[0] == FEW_SHOT[0]


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"messages": "hi"}, "key 'messages': expected a list of messages like"),
        ({"messages": ["hi"]}, "message 0: expected a mapping {'role': ..., 'content': ...}"),
        (
            {"messages": [{"role": "usr", "content": "x"}]},
            "message 0: expected 'role' to be one of ('system', 'user', 'assistant'), got str "
            "'usr' (did you mean 'user'?)",
        ),
        ({"messages": [{"role": "user", "content": ""}]}, "'content' to be a non-empty string"),
        ({"messages": [{"role": "user", "content": ["x"]}]}, "'content' to be a non-empty"),
        ({"messages": [{"role": "user", "text": "x"}]}, "unknown key 'text'"),
        (
            {"messages": [*FEW_SHOT[:1], {"role": "system", "content": "late"}]},
            "message 1: a system message may only come first",
        ),
        (
            {"system": "S", "messages": [{"role": "system", "content": "T"}]},
            "a system message beside the record's system prompt",
        ),
        ({"turn_params": {"temperature": 0}}, "key 'turn_params': expected a list with one dict"),
        ({"turn_params": [{}]}, "expected 2 entries, one per turn, got 1"),
        ({"turn_params": [None, 3]}, "turn 1: expected a dict of sampling parameters or None"),
        ({"turn_params": [{"max_tokens": 0}, None]}, "turn 0: 'max_tokens' expected a whole"),
        ({"turn_params": [{"max_tokens": True}, None]}, "'max_tokens' expected a whole number"),
        ({"turn_params": [None, {"temperature": 3}]}, "'temperature' expected a number between"),
        ({"turn_params": [{"model": "x"}, None]}, "'model' cannot vary by turn"),
        ({"turn_params": [{"stream": True}, None]}, "'stream' cannot vary by turn"),
        ({"turn_params": [{"response_format": "json"}, None]}, "'response_format' expected a"),
        ({"turn_param": []}, "unknown key 'turn_param' (did you mean 'turn_params'?)"),
    ],
)
def test_bad_messages_and_turn_params_are_refused_naming_the_record(record, expected):
    with pytest.raises(DatasetError) as caught:
        load_conversations([{"id": "a", "turns": ["q0", "q1"], **record}])
    assert expected in str(caught.value)
    assert str(caught.value).startswith("record 0")


def test_turn_params_are_per_turn_and_empty_where_none_are_given():
    schema = {"type": "json_schema", "json_schema": {"name": "n", "schema": {}}}
    (conv,) = load_conversations(
        [
            {
                "id": "a",
                "turns": ["q0", "q1", "q2"],
                "turn_params": [
                    {"max_tokens": 5, "temperature": 0},
                    None,
                    {"response_format": schema},
                ],
            }
        ]
    )
    assert conv.params_for(0) == {"max_tokens": 5, "temperature": 0}
    assert conv.params_for(1) == {}
    assert conv.params_for(2) == {"response_format": schema}
    (plain,) = load_conversations([{"id": "b", "turns": ["q0", "q1"]}])
    assert [plain.params_for(k) for k in range(2)] == [{}, {}]


def test_opening_messages_and_turn_params_are_part_of_what_a_fingerprint_hashes():
    base = {"id": "a", "turns": ["q0", "q1"]}
    (plain,) = load_conversations([base])
    (shots,) = load_conversations([{**base, "messages": FEW_SHOT}])
    (params,) = load_conversations([{**base, "turn_params": [None, {"max_tokens": 3}]}])
    assert plain.sent_extras() == []
    assert shots.sent_extras() == [FEW_SHOT, [(), ()], [{}, {}]]
    assert params.sent_extras() == [[], [(), ()], [{}, {"max_tokens": 3}]]
