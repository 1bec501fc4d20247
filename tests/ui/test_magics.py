"""``%%llm_batch`` and ``%llm_config`` through a real IPython ``InteractiveShell``."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
from IPython.core.error import UsageError

import nbllm
from nbllm import api
from nbllm.cli import main as cli_main
from nbllm.config import RunConfig
from nbllm.jobs import Job
from nbllm.results import RunResult
from nbllm.testing import TestServer, messages_key
from nbllm.ui.magics import SESSION, LlmBatchMagics, _show
from nbllm.ui.preview import PREVIEW_COLUMNS, ResultPreview, clip

SYSTEM = "You are a careful financial analyst."
TEMPLATE = f"""system: {SYSTEM}
{{context}}
user: {{question_0}}
user: {{question_1}}
"""


@pytest.fixture
def server():
    with TestServer() as running:
        yield running


def magics(shell) -> LlmBatchMagics:
    return shell.magics_manager.registry["LlmBatchMagics"]


def frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "context": ["Revenue was 10 in 2019.", "Net income was 3."],
            "question_0": ["What was revenue?", "What was net income?"],
            "question_1": ["And doubled?", np.nan],  # the second conversation ends early
        },
        index=["a", "b"],
    )


def usage_error(result) -> str:
    """The one-line message of the UsageError a cell raised."""
    error = result.error_in_exec
    assert isinstance(error, UsageError), error
    message = str(error)
    assert "\n" not in message
    return message


def test_a_template_over_a_dataframe(shell, server, capsys):
    shell.user_ns["df"] = frame()
    cell = shell.run_cell(f"%%llm_batch df -m nbllm-test --api-base {server.url}\n{TEMPLATE}")
    assert cell.error_in_exec is None and cell.error_before_exec is None
    assert cell.result is None  # shown once, by display, not echoed as Out[]

    result = shell.user_ns["llm_result"]
    assert isinstance(result, RunResult)
    df = result.df
    assert list(zip(df["conversation_id"], df["turn"], strict=True)) == [
        ("a", 0),
        ("a", 1),
        ("b", 0),
    ]
    assert list(df["question"]) == ["What was revenue?", "And doubled?", "What was net income?"]
    assert df["error"].isna().all()
    assert server.history_errors == 0

    # the system message is the system block with this row's context filled in
    system = f"{SYSTEM}\nRevenue was 10 in 2019."
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": "What was revenue?"},
    ]
    key = messages_key(messages)
    assert df["answer"].iloc[0] == f"Answer to turn 0: What was revenue? [{key[:8]}]"
    assert df["answer"].iloc[1].startswith("Answer to turn 1: And doubled?")

    shown = capsys.readouterr().out.splitlines()
    assert shown[0] == result.verdict  # one line, not the 17-row summary
    # id, turn, question, answer, latency: no error column, as no row has an error
    assert shown[1].split() == [c for c in PREVIEW_COLUMNS if c != "error"]
    assert len(shown) == 1 + 1 + 3 + 1  # the verdict, the preview's header, 3 rows, the note
    assert shown[-1] == (
        "3 of 3 rows of llm_result.df · print(llm_result.summary) for every figure · "
        "llm_result.plot() for charts"
    )


def test_an_empty_body_runs_a_conversation_dataset(shell, server):
    shell.user_ns["records"] = [
        {"id": "x", "turns": ["Hello", "Again"]},
        {"id": "y", "turns": ["Hi"]},
    ]
    line = f"records -m nbllm-test --api-base {server.url} -o answers"
    shell.run_cell_magic("llm_batch", line, "\n")  # IPython refuses a body of ""
    assert shell.user_ns["answers"].summary.turns_ok == 3
    assert "llm_result" not in shell.user_ns

    cell = shell.run_cell(f"%llm_batch records -m nbllm-test --api-base {server.url}")
    assert cell.error_in_exec is None
    assert shell.user_ns["llm_result"].df["resumed"].all()  # the same run again: checkpointed
    assert len(server.requests) == 3
    assert server.history_errors == 0


def test_a_template_over_records_and_references(shell, server):
    shell.user_ns["rows"] = [
        {"id": "r1", "q": "Two plus two?", "a": 4},
        {"id": "r2", "q": "Capital of France?", "a": "Paris"},
    ]
    body = "user: {q}\nreference: {a}\n"
    cell = shell.run_cell(f"%%llm_batch rows -m nbllm-test --api-base {server.url}\n{body}")
    assert cell.error_in_exec is None
    df = shell.user_ns["llm_result"].df
    assert list(df["conversation_id"]) == ["r1", "r2"]
    assert list(df["question"]) == ["Two plus two?", "Capital of France?"]
    assert list(df["reference"]) == ["4", "Paris"]


def test_a_path_is_read_as_records_or_passed_to_nbllm(shell, server, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"id": "p1", "q": "First?"}\n\n{"id": "p2", "q": "Second?"}\n')
    convs = tmp_path / "convs.jsonl"
    convs.write_text('{"id": "c1", "turns": ["Hi", "And?"]}\n')
    shell.user_ns.update(rows=str(rows), convs=convs)

    cell = shell.run_cell(f"%%llm_batch rows -m nbllm-test --api-base {server.url}\nuser: {{q}}")
    assert cell.error_in_exec is None
    assert list(shell.user_ns["llm_result"].df["question"]) == ["First?", "Second?"]

    cell = shell.run_cell(f"%llm_batch convs -m nbllm-test --api-base {server.url} -o plain")
    assert cell.error_in_exec is None
    assert list(shell.user_ns["plain"].df["question"]) == ["Hi", "And?"]


def test_a_missing_column_is_named_before_any_request(shell, server):
    shell.user_ns["df"] = frame()
    body = "user: {question_0}\nuser: {question_2}\n"
    cell = shell.run_cell(f"%%llm_batch df -m nbllm-test --api-base {server.url}\n{body}")
    message = usage_error(cell)
    assert "{question_2}" in message
    assert "['context', 'question_0', 'question_1']" in message
    assert server.requests == []
    assert "llm_result" not in shell.user_ns


def test_a_first_turn_with_no_value_is_an_error(shell, server):
    shell.user_ns["df"] = pd.DataFrame({"q": ["Fine?", None]})
    cell = shell.run_cell(f"%%llm_batch df -m nbllm-test --api-base {server.url}\nuser: {{q}}")
    assert "row 1: the first turn is empty ({q} has no value)" in usage_error(cell)
    assert server.requests == []


@pytest.mark.parametrize(
    ("line", "body", "expected"),
    [
        ("df -m m --bogus", "user: {question_0}", "unrecognized arguments: --bogus"),
        ("df -m m --concurrency -2", "user: {question_0}", "concurrency= expected a whole"),
        ("df -m m --concurrency many", "user: {question_0}", "invalid int value: 'many'"),
        ("df -m m --engine tpu", "user: {question_0}", "engine= expected one of auto, "),
        ("df -m m --engine pytorch", "user: {question_0}", "(did you mean 'torch'?)"),
        ("dff -m m", "user: {question_0}", "DATA 'dff' is not defined"),
        ("df --api-base http://127.0.0.1:9/v1", "user: {question_0}", "model= is required"),
        ("df -m m -o 1x", "user: {question_0}", "-o expects a Python name"),
        ("df -m m --checkpoint here --no-checkpoint", "user: {q}", "not allowed with argument"),
        ("df -m m", "hello\nuser: {question_0}", "comes before the first 'system:' or 'user:'"),
        ("df -m m", "system: only a system prompt", "no 'user:' line"),
        ("df -m m", "user: {question_0} {", "literal braces"),
    ],
)
def test_bad_input_is_one_line(shell, line, body, expected):
    shell.user_ns["df"] = frame()
    cell = shell.run_cell(f"%%llm_batch {line}\n{body}")
    assert expected in usage_error(cell)
    assert "llm_result" not in shell.user_ns


def test_a_template_error_is_a_dataset_error_shown_in_one_line(shell):
    shell.user_ns["df"] = frame()
    cell = shell.run_cell("%%llm_batch df -m m\nuser: {question_9}")
    message = usage_error(cell)
    assert message.startswith("%%llm_batch: the template uses {question_9} (did you mean")
    assert isinstance(cell.error_in_exec.__cause__, nbllm.DatasetError)


def test_an_engine_nbllm_cannot_run_is_its_own_error_in_one_line(shell, server):
    shell.user_ns["df"] = frame()
    cell = shell.run_cell(
        f"%%llm_batch df -m some/model --engine vllm --api-base {server.url}\n{TEMPLATE}"
    )
    message = usage_error(cell)
    assert message.startswith("nbllm: ") and "vllm" in message
    assert isinstance(cell.error_in_exec.__cause__, nbllm.NbllmError)
    assert server.requests == []


def test_llm_config_sets_and_shows_the_session_defaults(shell, capsys):
    shell.run_line_magic("llm_config", "model=openai/gpt-4o-mini concurrency=16 rpm=600")
    m = magics(shell)
    assert (m.model, m.concurrency, m.rpm) == ("openai/gpt-4o-mini", 16, 600.0)

    shell.run_line_magic("llm_config", "")
    shown = capsys.readouterr().out
    lines = {line.split()[0]: line for line in shown.splitlines()[1:]}
    assert "openai/gpt-4o-mini" in lines["model"] and SESSION in lines["model"]
    assert "16" in lines["concurrency"] and SESSION in lines["concurrency"]
    assert lines["tpm"].split()[1:] == ["-", "default"]
    assert "checkpoint dir" in shown and "$NBLLM_DIR" in shown
    assert "max_cost_usd" in shown and "metrics_port" in shown  # every other option too

    shell.run_line_magic("llm_config", "concurrency=none")
    assert m.concurrency is None
    assert m.setting("concurrency") == (32, "default")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("api_key=sk-secret", "api_key is not a setting"),
        ("colour=blue", "unknown key 'colour'; allowed keys: model, api_base, concurrency"),
        ("concurrency=0", "concurrency= expected a whole number >= 1 or 'auto', got 0"),
        ("temperature=hot", "temperature expects a number, got 'hot'"),
        ("api_base=localhost", "api_base= expected an http(s) URL"),
        ("model", "expected key=value"),
    ],
)
def test_llm_config_refuses_bad_settings_in_one_line(shell, line, expected):
    cell = shell.run_cell(f"%llm_config {line}")
    message = usage_error(cell)
    assert expected in message
    assert "sk-secret" not in message
    m = magics(shell)
    assert all(getattr(m, key) is None for key in ("model", "api_base", "concurrency"))


def test_config_magic_sets_the_same_traits(shell):
    shell.run_cell("%config LlmBatchMagics.concurrency = 8")
    assert magics(shell).concurrency == 8
    assert magics(shell).setting("concurrency") == (8, SESSION)

    shell.run_cell("%config LlmBatchMagics.concurrency = 0")  # refused by the same check
    assert magics(shell).concurrency == 8


def test_precedence_magic_then_session_then_environment_then_default(shell, monkeypatch):
    calls = []

    def spy(data, **options):
        calls.append(options)
        return RunResult([], conversations=0, wall_s=0.0, started_at=0.0)

    monkeypatch.setattr(nbllm, "run", spy)
    shell.user_ns["records"] = [{"id": 1, "turns": ["hi"]}]
    m = magics(shell)

    def options(line: str = "") -> dict:
        cell = shell.run_cell(f"%llm_batch records {line}")
        assert cell.error_in_exec is None, cell.error_in_exec
        return calls[-1]

    monkeypatch.setenv("NBLLM_MODEL", "env-model")
    opts = options()
    assert opts["model"] == "env-model"
    assert "concurrency" not in opts  # nbllm.run's own default applies
    assert m.setting("concurrency") == (32, "default")
    assert opts["progress"] is None  # automatic: the dashboard in a notebook

    monkeypatch.setenv("NBLLM_CONCURRENCY", "4")
    monkeypatch.setenv("NBLLM_API_BASE", "http://127.0.0.1:9/v1")
    opts = options()
    assert (opts["concurrency"], opts["api_base"]) == (4, "http://127.0.0.1:9/v1")
    assert m.setting("concurrency") == (4, "$NBLLM_CONCURRENCY")

    shell.run_line_magic("llm_config", "concurrency=8 model=session-model")
    opts = options()
    assert (opts["concurrency"], opts["model"]) == (8, "session-model")

    opts = options("--concurrency 2 -m magic-model --no-checkpoint --engine openai")
    assert (opts["concurrency"], opts["model"]) == (2, "magic-model")
    assert (opts["checkpoint"], opts["engine"]) == (False, "openai")
    assert options("--checkpoint runs/here")["checkpoint"] == "runs/here"


def test_a_bad_environment_value_names_the_variable(shell, monkeypatch):
    monkeypatch.setenv("NBLLM_CONCURRENCY", "lots")
    shell.user_ns["records"] = [{"id": 1, "turns": ["hi"]}]
    cell = shell.run_cell("%llm_batch records -m m")
    assert (
        "$NBLLM_CONCURRENCY: concurrency expects a whole number or 'auto', got 'lots'"
        in usage_error(cell)
    )


def test_no_api_key_is_ever_shown(shell, monkeypatch, capsys):
    monkeypatch.setenv("NBLLM_API_KEY", "sk-very-secret")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-very-secret")
    shell.run_line_magic("llm_config", "")
    assert "sk-very-secret" not in capsys.readouterr().out


def test_background_binds_the_job_now_and_the_result_at_the_end(shell, capsys):
    with TestServer(latency=0.3) as slow:
        shell.user_ns["df"] = frame()
        line = f"df -m nbllm-test --api-base {slow.url} -o bg --background"
        cell = shell.run_cell(f"%%llm_batch {line}\n{TEMPLATE}")
        assert cell.error_in_exec is None

        job = shell.user_ns["bg_job"]
        assert isinstance(job, Job)
        assert job.status == "running"
        assert "bg" not in shell.user_ns
        assert f"nbllm job {job.id} started in the background" in capsys.readouterr().out

        result = job.result(timeout=30)
        assert shell.user_ns["bg"] is result
        assert result.summary.turns_ok == 3
        # the line is rewritten when the job ends (a terminal prints it again)
        assert capsys.readouterr().out.strip() == (
            f"nbllm job {job.id} done: {result.verdict}; bg holds the result"
        )
        assert slow.history_errors == 0


def test_background_refuses_bad_input_in_the_cell(shell):
    shell.user_ns["df"] = frame()
    cell = shell.run_cell(f"%%llm_batch df -m m --background --concurrency 0\n{TEMPLATE}")
    assert "concurrency=" in usage_error(cell)
    assert "llm_result_job" not in shell.user_ns


def test_a_stopped_background_job_binds_the_interrupted_result(shell):
    with TestServer(latency=2.0) as slow:  # the batch takes 4 s unless stopped
        shell.user_ns["df"] = frame()
        line = f"df -m nbllm-test --api-base {slow.url} -o bg --background"
        cell = shell.run_cell(f"%%llm_batch {line}\n{TEMPLATE}")
        assert cell.error_in_exec is None

        job = shell.user_ns["bg_job"]
        result = job.stop(timeout=30)

        assert result.interrupted and job.status == "stopped"
        assert shell.user_ns["bg"] is result
        assert result.df["error"].str.startswith("not run").any()


class Captured(Exception):
    """Raised by the spy in place of preparing the run: the options were all we wanted."""


def test_every_face_hands_its_options_to_the_run(shell, monkeypatch, tmp_path):
    """The CLI's flags, the magic's options and the environment, as the RunConfig they make."""
    seen: list[RunConfig] = []

    def spy(data, config, **how):
        seen.append(config)
        raise Captured

    monkeypatch.setattr(api, "prepare_run", spy)  # behind nbllm.run
    # behind nbllm.submit (the module: nbllm.jobs is the function that lists the jobs)
    monkeypatch.setattr(sys.modules["nbllm.jobs"], "prepare_run", spy)
    base = "http://127.0.0.1:9/v1"
    data = tmp_path / "convs.jsonl"
    data.write_text('{"id": "a", "turns": ["Hi"]}\n', encoding="utf-8")

    cli = ["run", str(data), "--model", "m", "--api-base", base, "--rpm", "500", "--tpm", "9000"]
    cli += ["--timeout", "30", "--temperature", "0.5", "--max-tokens", "64", "--concurrency", "4"]
    cli += ["--retries", "2", "--system", "Be terse.", "--engine", "openai", "--stop-grace-s", "3"]
    with pytest.raises(Captured):
        cli_main([*cli, "--checkpoint", "runs/x", "--fresh", "--no-cache"])
    assert seen[-1] == RunConfig(
        model="m", api_base=base, concurrency=4, rpm=500.0, tpm=9000.0, timeout=30.0,
        retries=2, system="Be terse.", max_tokens=64, temperature=0.5, progress=None,
        checkpoint="runs/x", cache=False, resume=False, engine="openai", stop_grace_s=3.0,
    )  # fmt: skip
    with pytest.raises(Captured):
        cli_main(["run", str(data), "--no-checkpoint", "--no-progress"])
    assert seen[-1] == RunConfig(checkpoint=False, progress=False)

    shell.user_ns["records"] = [{"id": 1, "turns": ["hi"]}]
    magic = "%llm_batch records -m m --rpm 500 --tpm 9000 --max-tokens 64 --temperature 0.5"
    magic += f" --concurrency 4 --engine openai --api-base {base} --checkpoint here"
    assert isinstance(shell.run_cell(magic).error_in_exec, Captured)
    assert seen[-1] == RunConfig(
        model="m", api_base=base, concurrency=4, rpm=500.0, tpm=9000.0, max_tokens=64,
        temperature=0.5, engine="openai", checkpoint="here",
    )  # fmt: skip
    assert isinstance(shell.run_cell(f"{magic} --background").error_in_exec, Captured)
    assert seen[-1] == seen[-2]

    for variable, value in [
        ("NBLLM_RPM", "120"), ("NBLLM_TPM", "5000"), ("NBLLM_CONCURRENCY", "3"),
        ("NBLLM_MODEL", "env-model"), ("NBLLM_API_BASE", base),
    ]:  # fmt: skip
        monkeypatch.setenv(variable, value)
    assert isinstance(shell.run_cell("%llm_batch records").error_in_exec, Captured)
    assert seen[-1] == RunConfig(
        model="env-model", api_base=base, concurrency=3, rpm=120.0, tpm=5000.0
    )
    assert len(seen) == 5


def test_unload_removes_the_magics(shell):
    shell.run_line_magic("unload_ext", "nbllm")
    assert "llm_batch" not in shell.magics_manager.magics["cell"]
    assert "llm_config" not in shell.magics_manager.magics["line"]
    assert not any(isinstance(c, LlmBatchMagics) for c in shell.configurables)
    shell.run_line_magic("load_ext", "nbllm")  # and back, for the fixture's teardown
    assert "llm_batch" in shell.magics_manager.magics["cell"]


def test_the_preview_clips_long_text_to_one_line_and_points_at_the_errors(capsys):
    def answer(request):
        question = request.messages[-1]["content"]
        if question.startswith("fail"):
            raise nbllm.errors.ServerError("the server broke")
        return "A long answer,\nover lines:\n" + "word " * 40

    records = [{"id": i, "turns": ["Why " * 30 if i < 5 else "fail now"]} for i in range(7)]
    result = nbllm.run(records, engine=nbllm.FakeEngine(answer), model="m", progress=False,
                       checkpoint=False, retries=0)  # fmt: skip
    _show(result, "answers")  # what %%llm_batch shows after its run
    shown = capsys.readouterr().out.splitlines()
    assert shown[0] == result.verdict
    assert shown[1].split() == list(PREVIEW_COLUMNS)  # an error column: two rows have one
    rows = shown[2:-1]
    assert len(rows) == 5  # the first five of seven
    assert all(("Why Why" in row and "…" in row and "A long answer, over lines:" in row)
               for row in rows)  # fmt: skip
    assert all(len(row) < 200 for row in rows)
    assert shown[-1] == (
        "5 of 7 rows of answers.df · print(answers.summary) for every figure · "
        "answers.df[answers.df.error.notna()] for the 2 with an error · answers.plot() for charts"
    )


def test_the_preview_in_html_keeps_each_cell_on_one_line():
    assert clip("a\n  b   c", 60) == "a b c"
    assert clip("x" * 70, 60) == "x" * 60 + "…"
    result = nbllm.run([{"id": "<a>", "turns": ["one\ntwo"]}], engine=nbllm.FakeEngine(),
                       model="m", progress=False, checkpoint=False)  # fmt: skip
    page = ResultPreview.of(result.df, note="see <df>")._repr_html_()
    assert "white-space: nowrap" in page
    assert "&lt;a&gt;" in page and "see &lt;df&gt;" in page  # escaped
    assert "one two" in page
    assert "&lt;NA&gt;" not in page and "NaN" not in page  # missing is blank


WIDE = pd.DataFrame(
    {
        "company": ["Acme", "Globex"],
        "question_0": ["Revenue?", "Profit?"],
        "question_1": ["Doubled?", None],
    }
)


def test_id_names_the_conversations_with_a_template_and_without(shell, server):
    shell.user_ns["df"] = WIDE
    line = f"df -m nbllm-test --api-base {server.url} --no-checkpoint"
    cell = shell.run_cell(f"%%llm_batch {line} --id company\nuser: {{question_0}}")
    assert cell.error_in_exec is None, cell.error_in_exec
    assert list(shell.user_ns["llm_result"].df["conversation_id"]) == ["Acme", "Globex"]

    cell = shell.run_cell(f"%llm_batch {line} --id company -o wide")
    assert cell.error_in_exec is None, cell.error_in_exec
    df = shell.user_ns["wide"].df
    assert list(zip(df["conversation_id"], df["turn"], strict=True)) == [
        ("Acme", 0),
        ("Acme", 1),
        ("Globex", 0),
    ]

    shell.user_ns["rows"] = [{"name": "n1", "turns": ["Hi"]}, {"name": "n2", "turns": ["Yo"]}]
    cell = shell.run_cell(f"%llm_batch rows -m nbllm-test --api-base {server.url} --id name")
    assert cell.error_in_exec is None, cell.error_in_exec
    assert list(shell.user_ns["llm_result"].df["conversation_id"]) == ["n1", "n2"]


@pytest.mark.parametrize("body", ["user: {question_0}", ""])
def test_a_missing_id_column_is_one_line_naming_the_columns(shell, server, body):
    shell.user_ns["df"] = WIDE
    cell = shell.run_cell(
        f"%%llm_batch df -m nbllm-test --api-base {server.url} --id compnay\n{body}\n"
    )
    message = usage_error(cell)
    assert "'compnay'" in message and "did you mean 'company'" in message
    assert "['company', 'question_0', 'question_1']" in message
    assert server.requests == []


def test_the_preview_leaves_out_columns_no_row_fills():
    def refuse(request):
        raise nbllm.errors.RequestRejected("no such model", status=404)

    failed = nbllm.run([{"id": "a", "turns": ["hi"]}], engine=nbllm.FakeEngine(refuse),
                       model="m", progress=False, checkpoint=False, retries=0)  # fmt: skip
    columns = list(ResultPreview.of(failed.df).frame.columns)
    assert columns == ["conversation_id", "turn", "question", "error"]
    answered = nbllm.run([{"id": "a", "turns": ["hi"]}], engine=nbllm.FakeEngine(),
                         model="m", progress=False, checkpoint=False)  # fmt: skip
    columns = list(ResultPreview.of(answered.df).frame.columns)
    assert columns == ["conversation_id", "turn", "question", "answer", "latency_s"]


def test_a_setting_comes_from_nbllm_toml_below_the_session(shell, tmp_path, monkeypatch):
    (tmp_path / "nbllm.toml").write_text("model = 'from-file'\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    m = magics(shell)
    assert m.setting("model") == ("from-file", f"{tmp_path.resolve() / 'nbllm.toml'}:1")
    m.model = "from-session"
    assert m.setting("model") == ("from-session", SESSION)
