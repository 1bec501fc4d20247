"""Structured answers: response_format= and parse=, against the real test server."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

import nbllm
from nbllm.engines import FakeEngine
from nbllm.errors import ConfigError
from nbllm.parsing import ParseFailed, make_parser
from nbllm.testing import TestServer

FAST = {"checkpoint": False, "cache": False, "progress": False}


class Revenue(BaseModel):
    answer: str
    year: int
    amount: float


def data(n: int = 3, turns: int = 2) -> list[dict[str, object]]:
    return [{"id": i, "turns": [f"q{i} turn {k}" for k in range(turns)]} for i in range(n)]


def test_answers_come_back_validated_and_parsed_into_columns():
    with TestServer() as server:
        result = nbllm.run(data(), model="m", api_base=server.url, response_format=Revenue, **FAST)
        assert server.history_errors == 0
        sent = [entry for entry in server.requests]
    assert result.summary.turns_ok == 6
    assert result.summary.parse_retries == 0
    first = result.df["parsed"].iloc[1]
    assert first == {"answer": first["answer"], "year": 1, "amount": 1.5}
    wide = result.parsed_df()
    assert list(wide.columns) == ["conversation_id", "turn", "model", "answer", "year", "amount"]
    assert list(wide["year"]) == [0, 1] * 3
    assert len(sent) == 6  # nothing asked twice


def test_an_answer_that_does_not_parse_is_asked_again_outside_the_history(tmp_path):
    """The first two JSON answers are cut short: each turn that got one is asked again,
    shown its error; later turns carry only the valid answer (the server checks that
    every assistant message is one it gave)."""
    log = tmp_path / "log.jsonl"
    with TestServer(bad_json_first=2, log_path=log) as server:
        result = nbllm.run(
            data(2, 2), model="m", api_base=server.url, response_format=Revenue,
            concurrency=1, **FAST,
        )  # fmt: skip
        requests = server.requests
    assert result.summary.turns_ok == 4
    assert result.summary.parse_retries == 2
    assert result.summary.retries == 0  # a re-ask for a bad answer is not a retry
    assert result.df["parsed"].notna().all()
    assert result.df["attempts"].sum() == 6 == len(requests)
    # The re-ask: the question, the bad answer, then a message that names the error.
    assert max(r.n_messages for r in requests) == 3 and server.history_errors == 0


def test_every_try_failing_keeps_the_last_answer_and_says_which_field():
    def never_right(request):
        return '{"answer": "x", "year": "last year", "amount": 1}'

    result = nbllm.run(
        data(1, 2), engine=FakeEngine(never_right), response_format=Revenue, parse_retries=1,
        **FAST,
    )  # fmt: skip
    first, second = result.df.iloc[0], result.df.iloc[1]
    assert first["error"].startswith("ParseError: field year:")
    assert first["answer"] == '{"answer": "x", "year": "last year", "amount": 1}'
    assert first["parsed"] is pd_na()
    assert first["attempts"] == 2
    assert second["error"].startswith("skipped")  # the conversation ends there
    assert result.summary.parse_retries == 1


def pd_na():
    import pandas as pd

    return pd.NA


def test_a_json_schema_dict_and_a_parse_callable_work_together():
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string"}, "year": {"type": "integer"}},
        "required": ["answer", "year"],
    }
    with TestServer() as server:
        result = nbllm.run(
            data(2, 1), model="m", api_base=server.url, response_format=schema,
            parse=lambda obj: obj["year"] + 2000, **FAST,
        )  # fmt: skip
    assert list(result.df["parsed"]) == [2000, 2000]
    assert list(result.parsed_df()["parsed"]) == [2000, 2000]


def test_resumed_turns_are_parsed_again_and_nothing_is_sent_twice(tmp_path):
    options = {"model": "m", "response_format": Revenue, "checkpoint": tmp_path / "run.sqlite"}
    with TestServer() as server:
        nbllm.run(data(), api_base=server.url, cache=False, progress=False, **options)
        sent = len(server.requests)
        again = nbllm.run(data(), api_base=server.url, cache=False, progress=False, **options)
        assert len(server.requests) == sent
    assert again.summary.resumed == 6
    assert again.df["parsed"].notna().all()


def test_the_parser_finds_json_in_prose_and_names_what_failed():
    parser = make_parser(Revenue)
    assert parser is not None
    fenced = 'Here you go:\n```json\n{"answer": "a", "year": 2020, "amount": 3}\n```'
    assert parser.parse(fenced) == {"answer": "a", "year": 2020, "amount": 3.0}
    with pytest.raises(ParseFailed, match="field amount: Field required"):
        parser.parse('{"answer": "a", "year": 2020}')
    with pytest.raises(ParseFailed, match=r"no JSON object|not valid JSON"):
        parser.parse("twelve")
    assert parser.wire == {
        "type": "json_schema",
        "json_schema": {"name": "Revenue", "schema": Revenue.model_json_schema()},
    }


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"response_format": 3}, "response_format= expected a pydantic model class or a JSON"),
        ({"response_format": {"type": "array"}}, "must describe a JSON object"),
        ({"response_format": {"type": "object", "properties": 3}}, "not a valid JSON schema"),
        ({"parse": "numbr"}, "did you mean 'number'"),
        ({"parse_retries": -1}, "parse_retries= expected a whole number >= 0"),
    ],
)
def test_bad_structured_options_are_refused_before_any_request(options, message):
    engine = FakeEngine()
    with pytest.raises(ConfigError, match=message):
        nbllm.run(data(1, 1), engine=engine, **options, **FAST)


def test_the_magic_takes_a_schema_and_a_parser_from_the_notebook(monkeypatch):
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    monkeypatch.delenv("NBLLM_API_BASE", raising=False)
    config = Config()
    config.HistoryManager.enabled = False
    shell = InteractiveShell.instance(config=config)
    shell.run_line_magic("load_ext", "nbllm")
    try:
        with TestServer() as server:
            shell.user_ns.update(rows=data(2, 1), Revenue=Revenue, year=lambda o: o["year"])
            line = f"rows -m m --api-base {server.url} --no-checkpoint -o out"
            cell = shell.run_cell(f"%llm_batch {line} --schema Revenue --parse year")
            assert cell.error_in_exec is None
            assert list(shell.user_ns["out"].df["parsed"]) == [0, 0]
            cell = shell.run_cell(f"%llm_batch {line} --schema Revenu")
            assert "--schema 'Revenu' is not defined in the notebook" in str(cell.error_in_exec)
            assert "did you mean 'Revenue'" in str(cell.error_in_exec)
    finally:
        shell.run_line_magic("unload_ext", "nbllm")
        shell.reset(new_session=False)


def test_parse_number_reads_the_number_a_prose_answer_gives():
    answers = iter(["Revenue was $1,234.5 million.", "A loss of (12.3)", "About 14 %", "no idea"])
    result = nbllm.run(
        data(4, 1), engine=FakeEngine(lambda request: next(answers)), parse="number",
        parse_retries=0, concurrency=1, **FAST,
    )  # fmt: skip
    parsed = list(result.df["parsed"])
    assert parsed[:3] == [1_234_500_000.0, -12.3, 14.0]
    assert result.df["error"].iloc[3].startswith("ParseError: parse=parse_number could not")


def test_a_local_engine_is_asked_the_schema_in_its_prompt():
    from nbllm.engines.local.base import Generation, schema_in_prompt
    from nbllm.types import ChatRequest

    wire = make_parser(Revenue).wire  # type: ignore[union-attr]
    request = ChatRequest("m", [{"role": "user", "content": "Revenue in 2020?"}], {
        "max_tokens": 64, "response_format": wire,
    })  # fmt: skip
    asked = schema_in_prompt(request)
    assert "response_format" not in asked.params
    Generation.from_params(asked.params)  # what a local engine refuses is gone
    text = asked.messages[-1]["content"]
    assert text.startswith("Revenue in 2020?\n\nAnswer with a single JSON object")
    assert '"amount"' in text
    assert schema_in_prompt(ChatRequest("m", request.messages, {})).messages == request.messages


def test_a_turn_may_ask_for_its_own_pydantic_schema():
    records = [
        {
            "id": i,
            "turns": [f"q{i} plain", f"q{i} typed"],
            "turn_params": [None, {"response_format": Revenue}],
        }
        for i in range(2)
    ]
    with TestServer() as server:
        result = nbllm.run(records, model="m", api_base=server.url, **FAST)
        sent = [entry for entry in server.requests]
    df = result.df
    assert df["error"].isna().all(), df["error"].tolist()
    assert df["parsed"].isna().tolist() == [True, False, True, False]
    assert set(df["parsed"].iloc[1]) == {"answer", "year", "amount"}
    assert len(sent) == 4  # each turn asked once: every typed answer parsed the first time


def test_a_bad_schema_in_turn_params_is_refused_naming_the_turn():
    engine = FakeEngine()
    bad = {"type": "object", "properties": {"x": {"type": "no-such-type"}}}
    records = [{"id": "a", "turns": ["q0", "q1"], "turn_params": [None, {"response_format": bad}]}]
    with pytest.raises(
        ConfigError, match=r"conversation 'a', turn 1, turn_params: response_format"
    ):
        nbllm.run(records, engine=engine, model="m", **FAST)
    assert engine.calls == 0
