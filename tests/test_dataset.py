"""Tests for nbllm.dataset.load_conversations: every accepted shape and every bad input."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nbllm.dataset import load_conversations
from nbllm.errors import ConfigError, DatasetError
from nbllm.types import Conversation

# --------------------------------------------------------------------------- helpers


def long_df(**columns: list) -> pd.DataFrame:
    base = {
        "conversation_id": ["c1", "c1", "c2"],
        "turn": [0, 1, 0],
        "question": ["q1a", "q1b", "q2a"],
    }
    base.update(columns)
    return pd.DataFrame(base)


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- long format


def test_long_basic() -> None:
    convs = load_conversations(long_df(reference=["r1", None, 7]))
    assert [c.id for c in convs] == ["c1", "c2"]
    assert convs[0].questions == ("q1a", "q1b")
    assert convs[0].references == ("r1", None)
    assert convs[1].references == ("7",)
    assert all(isinstance(c, Conversation) for c in convs)
    assert convs[0].system is None and convs[0].context is None


def test_long_turns_out_of_order_and_first_appearance_order() -> None:
    df = pd.DataFrame(
        {
            "conversation_id": ["b", "a", "b", "a", "b"],
            "turn": [2, 1, 0, 0, 1],
            "question": ["b2", "a1", "b0", "a0", "b1"],
            "reference": ["rb2", "ra1", "rb0", "ra0", "rb1"],
        }
    )
    convs = load_conversations(df)
    assert [c.id for c in convs] == ["b", "a"]
    assert convs[0].questions == ("b0", "b1", "b2")
    assert convs[0].references == ("rb0", "rb1", "rb2")
    assert convs[1].questions == ("a0", "a1")


def test_long_one_based_turns_and_integral_float_turns() -> None:
    df = long_df(turn=[1.0, 2.0, 1.0])
    convs = load_conversations(df)
    assert convs[0].questions == ("q1a", "q1b")
    assert convs[1].questions == ("q2a",)


def test_long_int_ids_keep_python_type() -> None:
    df = long_df(conversation_id=np.array([10, 10, 20], dtype=np.int64))
    convs = load_conversations(df)
    assert [c.id for c in convs] == [10, 20]
    assert all(type(c.id) is int for c in convs)


def test_long_object_column_numpy_scalars_become_python() -> None:
    df = long_df(conversation_id=pd.Series([np.int64(1), np.int64(1), "x"], dtype=object))
    convs = load_conversations(df)
    assert [c.id for c in convs] == [1, "x"]
    assert type(convs[0].id) is int


def test_long_system_and_context_first_non_null() -> None:
    df = long_df(
        system=[None, "be brief", np.nan],
        context=["table A", np.nan, None],
    )
    convs = load_conversations(df)
    assert convs[0].system == "be brief"
    assert convs[0].context == "table A"
    assert convs[1].system is None and convs[1].context is None


def test_long_other_columns_are_ignored() -> None:
    convs = load_conversations(long_df(notes=["x", "y", "z"]))
    assert convs[0].meta == {}


def test_long_misspelled_optional_column_warns() -> None:
    with pytest.warns(UserWarning, match=r"'refrence' is ignored \(did you mean 'reference'\?\)"):
        convs = load_conversations(long_df(refrence=["a", "b", "c"]))
    assert convs[0].references == (None, None)


def test_default_system_applies_only_where_missing() -> None:
    df = long_df(system=["own", "own", None])
    convs = load_conversations(df, system="default")
    assert convs[0].system == "own"
    assert convs[1].system == "default"


def test_messages_for_loaded_conversation() -> None:
    df = long_df(system=["Be terse.", None, None], context=["Data: 1, 2, 3", None, None])
    conv = load_conversations(df)[0]
    messages = conv.messages_for(1, ["first answer"])
    assert messages == [
        {"role": "system", "content": "Be terse.\n\nData: 1, 2, 3"},
        {"role": "user", "content": "q1a"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "q1b"},
    ]


def test_messages_for_default_system() -> None:
    conv = load_conversations(long_df(), system="You help.")[1]
    assert conv.messages_for(0, []) == [
        {"role": "system", "content": "You help."},
        {"role": "user", "content": "q2a"},
    ]


def test_long_100k_rows() -> None:
    n = 100_000
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(n // 4), 4)
    turns = np.tile(np.arange(4), n // 4)
    perm = rng.permutation(n)
    df = pd.DataFrame(
        {
            "conversation_id": [f"c{i}" for i in ids[perm]],
            "turn": turns[perm],
            "question": [f"q{i}" for i in turns[perm]],
            "reference": ["r"] * n,
            "system": ["s"] * n,
        }
    )
    convs = load_conversations(df)
    assert len(convs) == n // 4
    assert all(c.questions == ("q0", "q1", "q2", "q3") for c in convs)


# --------------------------------------------------------------------------- long format errors


def test_long_missing_column_suggests_misspelling() -> None:
    df = pd.DataFrame({"conversation_id": ["c1"], "turn": [0], "questoin": ["q"]})
    with pytest.raises(
        DatasetError, match=r"missing column 'question' \(did you mean 'questoin'\?\); found col"
    ):
        load_conversations(df)


def test_long_missing_several_columns() -> None:
    df = pd.DataFrame({"conversation_id": ["c1"], "Turns": [0]})
    with pytest.raises(DatasetError, match=r"'turn' \(did you mean 'Turns'\?\), 'question'"):
        load_conversations(df)


def test_dataframe_with_neither_shape() -> None:
    with pytest.raises(DatasetError, match=r"neither accepted shape.*\['a', 'b'\].*wide"):
        load_conversations(pd.DataFrame({"a": [1], "b": [2]}))


def test_empty_dataframe() -> None:
    with pytest.raises(DatasetError, match="empty dataset"):
        load_conversations(pd.DataFrame(columns=["conversation_id", "turn", "question"]))


def test_long_nan_question() -> None:
    df = long_df(question=["q", np.nan, "q"])
    with pytest.raises(
        DatasetError,
        match=re.escape(
            "row 1 (conversation_id='c1', turn 1), column 'question': "
            "expected a non-empty string, got NaN"
        ),
    ):
        load_conversations(df)


def test_long_int_question_not_converted() -> None:
    df = long_df(question=["q", "q", 42])
    with pytest.raises(DatasetError, match=r"row 2 .*column 'question'.*got int 42"):
        load_conversations(df)


def test_long_blank_question_and_row_label() -> None:
    df = long_df(question=["q", "   ", "q"])
    df.index = ["x", "y", "z"]
    with pytest.raises(DatasetError, match=r"row 'y' \(conversation_id='c1', turn 1\).*blank"):
        load_conversations(df)


def test_long_nan_id() -> None:
    df = long_df(conversation_id=["c1", None, "c2"])
    with pytest.raises(DatasetError, match=r"row 1, column 'conversation_id': .*got (None|NaN)"):
        load_conversations(df)
    df = long_df(conversation_id=[1.0, np.nan, 2.0])
    with pytest.raises(DatasetError, match=r"row 1, column 'conversation_id': .*got NaN"):
        load_conversations(df)


def test_long_unhashable_id() -> None:
    df = long_df(conversation_id=[["a"], ["a"], ["b"]])
    with pytest.raises(DatasetError, match=r"row 0, column 'conversation_id': .*hashable"):
        load_conversations(df)


def test_long_duplicate_turn() -> None:
    df = long_df(turn=[0, 0, 0])
    with pytest.raises(
        DatasetError, match=r"conversation_id='c1': duplicate turn 0 in rows 0 and 1"
    ):
        load_conversations(df)


def test_long_gap_in_turns() -> None:
    df = long_df(turn=[0, 2, 0])
    with pytest.raises(
        DatasetError, match=r"conversation_id='c1': turn 1 is missing.*row 1 has turn 2"
    ):
        load_conversations(df)


def test_long_turns_not_starting_at_0_or_1() -> None:
    df = long_df(turn=[0, 1, 3])
    with pytest.raises(DatasetError, match=r"conversation_id='c2'.*first turn is 3 \(row 2"):
        load_conversations(df)


@pytest.mark.parametrize(
    ("turns", "got"),
    [
        ([0, 1.5, 0], "got float 1.5"),
        ([0, np.nan, 0], "got NaN"),
        (["0", "1", "0"], "got str '0'"),
        ([True, False, True], "got bool True"),
    ],
)
def test_long_bad_turn_values(turns: list, got: str) -> None:
    df = long_df(turn=turns)
    with pytest.raises(
        DatasetError, match=rf"row \d \(conversation_id='c\d'\), column 'turn'.*{got}"
    ):
        load_conversations(df)


def test_long_nullable_int_turn_with_missing() -> None:
    df = long_df(turn=pd.array([0, None, 0], dtype="Int64"))
    with pytest.raises(DatasetError, match=r"row 1 .*column 'turn'"):
        load_conversations(df)


def test_long_conflicting_system() -> None:
    df = long_df(system=["a", "b", None])
    with pytest.raises(
        DatasetError, match=r"conversation_id='c1', column 'system': rows 0 and 1 differ"
    ):
        load_conversations(df)


def test_long_non_string_context() -> None:
    df = long_df(context=["ok", None, 5])
    with pytest.raises(DatasetError, match=r"row 2 \(conversation_id='c2'\), column 'context'"):
        load_conversations(df)


def test_long_duplicate_column() -> None:
    df = pd.DataFrame(
        [["c1", 0, "q", "q"]], columns=["conversation_id", "turn", "question", "question"]
    )
    with pytest.raises(DatasetError, match="column 'question' appears more than once"):
        load_conversations(df)


# --------------------------------------------------------------------------- wide format


def test_wide_uneven_lengths_with_answers() -> None:
    df = pd.DataFrame(
        {
            "id": ["a", "b", "c"],
            "question_0": ["a0", "b0", "c0"],
            "question_1": ["a1", None, "c1"],
            "question_2": ["a2", np.nan, ""],
            "answer_0": [1.5, "b-ans", None],
            "answer_1": ["x", None, "y"],
            "answer_2": ["z", None, None],
            "context": ["table", None, None],
        }
    )
    convs = load_conversations(df, system="sys")
    assert [c.id for c in convs] == ["a", "b", "c"]
    assert convs[0].questions == ("a0", "a1", "a2")
    assert convs[0].references == ("1.5", "x", "z")
    assert convs[0].context == "table"
    assert convs[1].questions == ("b0",)
    assert convs[1].references == ("b-ans",)
    assert convs[2].questions == ("c0", "c1")
    assert convs[2].references == (None, "y")
    assert all(c.system == "sys" for c in convs)


def test_wide_default_id_is_index_label_and_one_based_columns() -> None:
    df = pd.DataFrame({"question_1": ["x", "y"], "question_2": ["x2", None]}, index=[5, 7])
    convs = load_conversations(df)
    assert [c.id for c in convs] == [5, 7]
    assert type(convs[0].id) is int
    assert convs[0].questions == ("x", "x2")
    assert convs[1].questions == ("y",)
    assert convs[1].references == (None,)


def test_wide_conversation_id_column() -> None:
    df = pd.DataFrame({"conversation_id": [3, 4], "question_0": ["a", "b"]})
    assert [c.id for c in load_conversations(df)] == [3, 4]


def test_wide_gap_is_error() -> None:
    df = pd.DataFrame(
        {
            "id": ["a", "b"],
            "question_0": ["a0", "b0"],
            "question_1": ["a1", None],
            "question_2": ["a2", "b2"],
        }
    )
    with pytest.raises(
        DatasetError, match=r"row 1 \(id='b'\), column 'question_2': .*empty column 'question_1'"
    ):
        load_conversations(df)


def test_wide_empty_conversation() -> None:
    df = pd.DataFrame({"id": ["a", "b"], "question_0": ["a0", None], "question_1": [None, " "]})
    with pytest.raises(DatasetError, match=r"row 1 \(id='b'\): empty conversation 'b'"):
        load_conversations(df)


def test_wide_non_string_question() -> None:
    df = pd.DataFrame({"question_0": ["a", 3]}, index=["r1", "r2"])
    with pytest.raises(DatasetError, match=r"row 'r2', column 'question_0': .*got int 3"):
        load_conversations(df)


def test_wide_duplicate_ids() -> None:
    df = pd.DataFrame({"id": ["a", "b", "a"], "question_0": ["x", "y", "z"]})
    with pytest.raises(DatasetError, match=r"duplicate conversation id 'a': rows 0 and 2"):
        load_conversations(df)
    df = pd.DataFrame({"question_0": ["x", "y"]}, index=["k", "k"])
    with pytest.raises(DatasetError, match=r"duplicate conversation id 'k': rows 'k' and 'k'"):
        load_conversations(df)


def test_wide_nan_id() -> None:
    df = pd.DataFrame({"id": ["a", None], "question_0": ["x", "y"]})
    with pytest.raises(DatasetError, match=r"row 1, column 'id': expected a conversation id"):
        load_conversations(df)


def test_wide_non_contiguous_columns() -> None:
    df = pd.DataFrame({"question_0": ["x"], "question_2": ["y"]})
    with pytest.raises(DatasetError, match=r"missing column 'question_1'"):
        load_conversations(df)
    df = pd.DataFrame({"question_2": ["x"]})
    with pytest.raises(DatasetError, match=r"must start at 'question_0' or 'question_1'"):
        load_conversations(df)


def test_wide_gap_names_the_missing_turn_column() -> None:
    df = pd.DataFrame({"question_0": ["x"], "question_1": ["y"], "question_3": ["z"]})
    with pytest.raises(DatasetError, match=r"missing column 'question_2'"):
        load_conversations(df)


@pytest.mark.parametrize("name", ["question0", "Question-0", "question 0", "questions_0"])
def test_wide_misspelled_first_question_is_refused_not_skipped(name: str) -> None:
    # Ignored, it would make 'question_1' each conversation's first turn.
    df = pd.DataFrame({name: ["first?"], "question_1": ["second?"]})
    with pytest.raises(
        DatasetError,
        match=rf"column '{name}' is not a turn column \(did you mean 'question_0'\?\)",
    ):
        load_conversations(df)


def test_wide_misspelled_later_turn_columns_are_refused() -> None:
    df = pd.DataFrame({"question_0": ["a"], "question_1": ["b"], "question2": ["c"]})
    with pytest.raises(DatasetError, match=r"'question2' .*did you mean 'question_2'"):
        load_conversations(df)
    df = pd.DataFrame({"question_0": ["a"], "answer0": ["ref"]})
    with pytest.raises(DatasetError, match=r"'answer0' .*did you mean 'answer_0'"):
        load_conversations(df)


def test_wide_other_columns_near_the_turn_names_stay_allowed() -> None:
    df = pd.DataFrame({"question_0": ["a"], "questions": ["x"], "question_type": ["y"]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 'questions' may be hinted at; it is not refused
        (conversation,) = load_conversations(df)
    assert conversation.questions == ("a",)


def test_wide_answer_without_question_column() -> None:
    df = pd.DataFrame({"question_0": ["x"], "answer_1": ["y"]})
    with pytest.raises(DatasetError, match=r"column 'answer_1' has no matching column"):
        load_conversations(df)


def test_wide_answer_after_conversation_ended() -> None:
    df = pd.DataFrame({"question_0": ["x"], "question_1": [None], "answer_1": ["y"]})
    with pytest.raises(DatasetError, match=r"row 0, column 'answer_1': .*'question_1' is empty"):
        load_conversations(df)


def test_wide_both_id_columns() -> None:
    df = pd.DataFrame({"id": [1], "conversation_id": [1], "question_0": ["x"]})
    with pytest.raises(DatasetError, match="both 'id' and 'conversation_id'"):
        load_conversations(df)


# --------------------------------------------------------------------------- records


def test_list_of_dicts() -> None:
    records = [
        {"id": "a", "turns": ["q0", "q1"], "references": ["r0", None], "meta": {"src": 1}},
        {"id": np.int64(2), "turns": [np.str_("only")], "system": "S", "context": "C"},
    ]
    convs = load_conversations(records, system="default")
    assert convs[0] == Conversation(
        id="a",
        questions=("q0", "q1"),
        references=("r0", None),
        system="default",
        meta={"src": 1},
    )
    assert convs[1].id == 2 and type(convs[1].id) is int
    assert convs[1].questions == ("only",) and type(convs[1].questions[0]) is str
    assert convs[1].system == "S" and convs[1].context == "C"
    assert convs[1].references == (None,)


def test_records_numeric_references_stringified() -> None:
    convs = load_conversations([{"id": 1, "turns": ["a", "b"], "references": [3, float("nan")]}])
    assert convs[0].references == ("3", None)


def test_records_from_generator() -> None:
    convs = load_conversations({"id": i, "turns": ["q"]} for i in range(3))
    assert [c.id for c in convs] == [0, 1, 2]


def test_list_of_conversations() -> None:
    given = [
        Conversation(id="x", questions=("a", "b")),
        Conversation(id="y", questions=("c",), references=("r",), system="own"),
    ]
    convs = load_conversations(given, system="default")
    assert convs[0].system == "default"
    assert convs[1].system == "own"
    assert convs[1].references == ("r",)
    assert convs[0].questions == ("a", "b")


def test_list_of_conversations_validated() -> None:
    with pytest.raises(
        DatasetError, match=r"record 1 \(id='y'\), attribute 'questions', turn 0: .*got None"
    ):
        load_conversations(
            [Conversation(id="x", questions=("a",)), Conversation(id="y", questions=(None,))]
        )  # type: ignore[arg-type]
    with pytest.raises(DatasetError, match=r"record 0 \(id='x'\), attribute 'questions'.*empty"):
        load_conversations([Conversation(id="x", questions=())])


def test_records_unknown_key_suggests() -> None:
    with pytest.raises(
        DatasetError,
        match=r"record 1: unknown key 'turn' \(did you mean 'turns'\?\); allowed keys: 'id'",
    ):
        load_conversations([{"id": 1, "turns": ["a"]}, {"id": 2, "turn": ["b"]}])


def test_records_missing_key() -> None:
    with pytest.raises(DatasetError, match=r"record 0: missing key 'id'"):
        load_conversations([{"turns": ["a"]}])


def test_records_duplicate_ids() -> None:
    with pytest.raises(DatasetError, match=r"duplicate conversation id 'a': record 0 and record 2"):
        load_conversations(
            [{"id": "a", "turns": ["x"]}, {"id": "b", "turns": ["y"]}, {"id": "a", "turns": ["z"]}]
        )


def test_records_empty_conversation() -> None:
    with pytest.raises(
        DatasetError, match=r"record 0 \(id='a'\), key 'turns': empty conversation 'a'"
    ):
        load_conversations([{"id": "a", "turns": []}])


def test_records_turns_must_be_list() -> None:
    with pytest.raises(DatasetError, match=r"record 0 \(id='a'\), key 'turns': expected a list"):
        load_conversations([{"id": "a", "turns": "just one string"}])


def test_records_int_and_nan_questions() -> None:
    with pytest.raises(
        DatasetError, match=r"record 0 \(id='a'\), key 'turns', turn 1: .*got int 7"
    ):
        load_conversations([{"id": "a", "turns": ["q", 7]}])
    with pytest.raises(DatasetError, match=r"key 'turns', turn 0: .*got NaN"):
        load_conversations([{"id": "a", "turns": [float("nan")]}])
    with pytest.raises(DatasetError, match=r"key 'turns', turn 0: .*got an empty string"):
        load_conversations([{"id": "a", "turns": [""]}])


def test_records_references_length() -> None:
    with pytest.raises(
        DatasetError,
        match=r"record 0 \(id='a'\), key 'references': expected a list of length 2 .*got length 1",
    ):
        load_conversations([{"id": "a", "turns": ["x", "y"], "references": ["r"]}])


def test_records_meta_must_be_mapping() -> None:
    with pytest.raises(DatasetError, match=r"record 0 \(id='a'\), key 'meta': expected a mapping"):
        load_conversations([{"id": "a", "turns": ["x"], "meta": ["no"]}])


def test_records_bad_id() -> None:
    with pytest.raises(DatasetError, match=r"record 0, key 'id': expected a conversation id"):
        load_conversations([{"id": None, "turns": ["x"]}])
    with pytest.raises(DatasetError, match=r"record 0, key 'id': expected a hashable"):
        load_conversations([{"id": ["x"], "turns": ["x"]}])


def test_records_bad_system() -> None:
    with pytest.raises(DatasetError, match=r"record 0 \(id='a'\), key 'system': expected a string"):
        load_conversations([{"id": "a", "turns": ["x"], "system": 3}])


def test_records_non_mapping_item() -> None:
    with pytest.raises(DatasetError, match=r"record 1: expected a mapping .*got int 5"):
        load_conversations([{"id": "a", "turns": ["x"]}, 5])


# --------------------------------------------------------------------------- JSONL


def test_jsonl_path(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "data.jsonl",
        [
            json.dumps({"id": "a", "turns": ["q0", "q1"], "references": ["r0", 1]}),
            "",
            "   ",
            json.dumps({"id": 2, "turns": ["q"], "context": "ctx", "meta": {"k": "v"}}),
        ],
    )
    for data in (path, str(path)):
        convs = load_conversations(data)
        assert [c.id for c in convs] == ["a", 2]
        assert convs[0].references == ("r0", "1")
        assert convs[1].context == "ctx"
        assert convs[1].meta == {"k": "v"}


def test_json_suffix_lines_and_array(tmp_path: Path) -> None:
    lines = write_jsonl(tmp_path / "lines.json", [json.dumps({"id": 1, "turns": ["q"]})])
    assert load_conversations(lines)[0].id == 1
    array = tmp_path / "array.json"
    array.write_text(json.dumps([{"id": 1, "turns": ["q"]}, {"id": 2, "turns": ["r"]}]))
    assert [c.id for c in load_conversations(array)] == [1, 2]


def test_jsonl_bad_line(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [json.dumps({"id": "a", "turns": ["q"]}), "", '{"id": "b", "turns": ["q"'],
    )
    with pytest.raises(DatasetError, match=re.escape(f"{path}, line 3: invalid JSON")):
        load_conversations(path)


def test_jsonl_line_not_object(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "list.jsonl", ['["a", "b"]'])
    with pytest.raises(DatasetError, match=re.escape(f"{path}, line 1: expected a mapping")):
        load_conversations(path)


def test_jsonl_record_errors_name_line(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [json.dumps({"id": "a", "turns": ["q"]}), json.dumps({"id": "b", "turns": ["q", 3]})],
    )
    with pytest.raises(
        DatasetError, match=re.escape(f"{path}, line 2 (id='b'), key 'turns', turn 1:")
    ):
        load_conversations(path)
    path = write_jsonl(
        tmp_path / "e.jsonl",
        [json.dumps({"id": "a", "turns": ["q"]}), json.dumps({"id": "a", "questions": ["q"]})],
    )
    with pytest.raises(DatasetError, match=r"line 2: unknown key 'questions'"):
        load_conversations(path)


def test_jsonl_duplicate_ids(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [json.dumps({"id": "a", "turns": ["q"]}), "", json.dumps({"id": "a", "turns": ["r"]})],
    )
    with pytest.raises(
        DatasetError, match=re.escape(f"{path}, duplicate conversation id 'a': line 1 and line 3")
    ):
        load_conversations(path)


def test_jsonl_missing_file_and_empty(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DatasetError, match=re.escape(f"no such file: {str(missing)!r}")):
        load_conversations(missing)
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", ""])
    with pytest.raises(DatasetError, match="empty dataset"):
        load_conversations(empty)


def test_path_with_wrong_suffix(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"\.jsonl.*got suffix '\.csv'"):
        load_conversations(tmp_path / "data.csv")


# --------------------------------------------------------------------------- other inputs


@pytest.mark.parametrize("data", [5, None, 3.5, b"bytes"])
def test_unsupported_inputs(data: object) -> None:
    with pytest.raises(DatasetError, match="accepted inputs: a long DataFrame"):
        load_conversations(data)


def test_single_dict_rejected() -> None:
    with pytest.raises(DatasetError, match=r"single mapping.*accepted inputs"):
        load_conversations({"id": "a", "turns": ["q"]})


def test_empty_list() -> None:
    with pytest.raises(DatasetError, match="empty dataset"):
        load_conversations([])


def test_bad_default_system() -> None:
    with pytest.raises(ConfigError, match="system="):
        load_conversations([{"id": "a", "turns": ["q"]}], system=3)  # type: ignore[arg-type]


def test_dataset_error_is_value_error() -> None:
    with pytest.raises(ValueError, match="empty dataset"):
        load_conversations([])
