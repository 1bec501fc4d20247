"""The ``nbllm`` command, end to end against the real test HTTP server."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import nbllm
from nbllm.cli import main
from nbllm.executor.events import TurnFinished
from nbllm.results import COLUMNS
from nbllm.testing import TestServer

SECRET = "sentinel-key-123"

RECORDS = [
    {"id": "a", "turns": ["Revenue in 2019?", "And in 2020?"], "references": ["10", "12"]},
    {"id": "b", "turns": ["Net income?"]},
]


@pytest.fixture
def server():
    with TestServer() as srv:
        yield srv


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def cli(server: TestServer, data: Path | str, *extra: str) -> int:
    args = ["run", str(data), "--model", "nbllm-test", "--api-base", server.url]
    return main([*args, "--no-progress", *extra])


def read_jsonl(path: Path) -> list[dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_jsonl_input_to_jsonl_output(server, tmp_path, capsys):
    data = write_jsonl(tmp_path / "convs.jsonl", RECORDS)
    out = tmp_path / "results.jsonl"

    assert cli(server, data, "--out", str(out)) == 0

    stdout = capsys.readouterr().out
    assert "turns_ok           3" in stdout
    rows = read_jsonl(out)
    assert [(r["conversation_id"], r["turn"]) for r in rows] == [("a", 0), ("a", 1), ("b", 0)]
    assert all(list(r) == list(COLUMNS) for r in rows)
    assert rows[1]["answer"].startswith("Answer to turn 1: And in 2020?")
    assert rows[1]["reference"] == "12"
    assert rows[2]["reference"] is None  # missing values are null, not NaN
    assert rows[0]["error"] is None
    assert server.history_errors == 0


def test_long_csv_input_to_csv_output(server, tmp_path, capsys):
    data = tmp_path / "long.csv"
    data.write_text(
        "conversation_id,turn,question,reference\n"
        "c1,1,What was revenue?,007\n"
        "c1,2,And costs?,\n"
        "c2,1,How many stores?,12\n",
        encoding="utf-8",
    )
    out = tmp_path / "results.csv"

    assert cli(server, data, "--out", str(out)) == 0

    df = pd.read_csv(out, dtype={"reference": str})
    assert list(df.columns) == list(COLUMNS)
    assert df["conversation_id"].tolist() == ["c1", "c1", "c2"]
    assert df["reference"].tolist()[::2] == ["007", "12"]  # text stays text
    assert df["error"].isna().all()
    assert "turns_failed       0" in capsys.readouterr().out


def test_wide_csv_input(server, tmp_path, capsys):
    data = tmp_path / "wide.csv"
    data.write_text(
        "id,question_0,question_1,answer_0,answer_1\n"
        "x,Revenue 2019?,And 2020?,10,12\n"
        "y,Net income?,,3,\n",
        encoding="utf-8",
    )

    assert cli(server, data, "--system", "Answer with a number.") == 0

    out = capsys.readouterr().out
    assert "turns              3" in out
    assert "conversations      2" in out


def test_bad_out_suffix_sends_nothing(server, tmp_path, capsys):
    data = write_jsonl(tmp_path / "convs.jsonl", RECORDS)
    out = tmp_path / "results.xlsx"

    assert cli(server, data, "--out", str(out)) == 2

    err = capsys.readouterr().err
    assert err.startswith("nbllm: error: --out")
    assert "'.xlsx'" in err
    assert len(err.splitlines()) == 1
    assert server.requests == []
    assert not out.exists()


def test_missing_file(server, tmp_path, capsys):
    assert cli(server, tmp_path / "nope.csv") == 2
    err = capsys.readouterr().err
    assert err.startswith("nbllm: error: no such file")
    assert "nope.csv" in err
    assert "Traceback" not in err
    assert server.requests == []


def test_dataset_error_names_the_problem(server, tmp_path, capsys):
    data = write_jsonl(tmp_path / "bad.jsonl", [RECORDS[0], {"id": "b", "turn": ["Hi"]}])

    assert cli(server, data) == 2

    err = capsys.readouterr().err
    assert err.startswith("nbllm: error: ")
    assert "line 2" in err
    assert "'turn'" in err and "did you mean 'turns'" in err
    assert server.requests == []


def test_bad_option_value(server, tmp_path, capsys):
    data = write_jsonl(tmp_path / "convs.jsonl", RECORDS)
    assert cli(server, data, "--concurrency", "0") == 2
    assert "concurrency" in capsys.readouterr().err
    assert main(["run", str(data), "--engine", "pytorch"]) == 2
    assert capsys.readouterr().err.endswith("got 'pytorch' (did you mean 'torch'?)\n")
    assert server.requests == []


def test_parquet_input_to_parquet_output(server, tmp_path, capsys):
    """A wide .parquet table in, one .parquet row per turn out, types kept."""
    table = tmp_path / "convs.parquet"
    pd.DataFrame(
        {
            "id": ["a", "b"],
            "question_0": ["Revenue in 2019?", "Net income?"],
            "question_1": ["And in 2020?", None],
            "answer_0": ["10", None],
        }
    ).to_parquet(table, index=False)
    out = tmp_path / "results.parquet"

    assert cli(server, table, "--out", str(out)) == 0

    df = pd.read_parquet(out)
    assert list(df.columns) == list(COLUMNS)
    assert list(zip(df["conversation_id"], df["turn"], strict=True)) == [
        ("a", 0),
        ("a", 1),
        ("b", 0),
    ]
    assert df["answer"].iloc[1].startswith("Answer to turn 1: And in 2020?")
    assert df["reference"].iloc[0] == "10" and df["reference"].isna().iloc[1:].all()
    assert df["latency_s"].dtype == "Float64" and df["prompt_tokens"].dtype == "Int64"
    assert not df["error"].notna().any()
    assert server.history_errors == 0


def test_parquet_without_pyarrow_is_one_clear_line(server, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    data = write_jsonl(tmp_path / "convs.jsonl", RECORDS)
    table = tmp_path / "convs.parquet"
    table.write_bytes(b"PAR1")

    assert cli(server, data, "--out", str(tmp_path / "results.parquet")) == 2
    assert cli(server, table) == 2

    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert all(line.startswith("nbllm: error: ") and "needs pyarrow" in line for line in lines)
    assert server.requests == []


def test_failed_turns_exit_1(tmp_path, capsys):
    data = write_jsonl(tmp_path / "convs.jsonl", RECORDS)
    out = tmp_path / "results.csv"
    with TestServer(faults={"server_error": 1.0}) as failing:
        assert cli(failing, data, "--retries", "0", "--out", str(out)) == 1

    captured = capsys.readouterr()
    assert "3 of 3 turns failed" in captured.err
    assert "turns_failed       3" in captured.out
    df = pd.read_csv(out)
    assert df["error"].notna().all()


def test_a_server_that_cannot_be_reached_exits_1_with_the_verdict(tmp_path, capsys):
    data = write_jsonl(tmp_path / "convs.jsonl", RECORDS)
    with TestServer() as gone:
        url = gone.url
    # Its port is closed now.
    args = ["run", str(data), "--model", "nbllm-test", "--api-base", url, "--no-checkpoint"]
    assert main([*args, "--no-progress"]) == 1

    err = capsys.readouterr().err
    assert f"nbllm: cannot reach {url}" in err and "0 of 3 turns ok, 3 not run" in err


def test_api_key_is_used_but_never_shown(tmp_path, capsys):
    data = write_jsonl(tmp_path / "convs.jsonl", RECORDS)
    out = tmp_path / "results.jsonl"
    with TestServer(api_key=SECRET) as guarded:  # answers 401 unless the key is sent
        args = ["run", str(data), "--model", "nbllm-test", "--api-base", guarded.url]
        code = main([*args, "--api-key", SECRET, "--out", str(out)])  # progress bar on

    assert code == 0
    captured = capsys.readouterr()
    assert "turns_ok           3" in captured.out
    for text in (captured.out, captured.err, out.read_text(encoding="utf-8")):
        assert SECRET not in text


def test_api_key_file_and_stdin_keep_the_key_off_the_command_line(tmp_path, capsys, monkeypatch):
    data = write_jsonl(tmp_path / "convs.jsonl", RECORDS)
    key_file = tmp_path / "key.txt"
    key_file.write_text(f"  {SECRET}  \nignored second line\n", encoding="utf-8")
    with TestServer(api_key=SECRET) as guarded:  # answers 401 unless the key is sent
        from_file = cli(guarded, data, "--no-cache", "--api-key-file", str(key_file))
        monkeypatch.setattr(sys, "stdin", io.StringIO(SECRET + "\n"))
        from_stdin = cli(guarded, data, "--no-cache", "--fresh", "--api-key", "-")
        sent = len(guarded.requests)

    assert (from_file, from_stdin) == (0, 0)
    assert sent == 2 * 3  # every turn answered, not refused with a 401
    captured = capsys.readouterr()
    assert captured.out.count("turns_ok           3") == 2
    assert SECRET not in captured.out + captured.err


@pytest.mark.parametrize(
    ("options", "stdin", "expected"),
    [
        (["--api-key-file", "missing.txt"], "", "--api-key-file: cannot read"),
        (["--api-key-file", "empty.txt"], "", "holds no key: expected the API key on its first"),
        (["--api-key", "-"], "\n", "--api-key - (standard input) holds no key"),
        (["--api-key", "k", "--api-key-file", "empty.txt"], "", "not allowed with argument"),
    ],
    ids=["missing-file", "empty-file", "empty-stdin", "both"],
)
def test_a_bad_key_source_exits_2_before_any_request(
    server, tmp_path, capsys, monkeypatch, options, stdin, expected
):
    data = write_jsonl(tmp_path / "convs.jsonl", RECORDS)
    (tmp_path / "empty.txt").write_text("\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert cli(server, data, *options) == 2
    assert expected in capsys.readouterr().err
    assert server.requests == []


def test_api_key_help_warns_that_the_command_line_is_visible(capsys):
    assert main(["run", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "visible to every user of this machine (ps)" in text
    assert "prefer the environment" in text
    assert "--api-key-file PATH" in text


def test_failed_turns_name_the_most_common_error_with_its_count(tmp_path, capsys):
    data = write_jsonl(tmp_path / "convs.jsonl", RECORDS)
    with TestServer(api_key=SECRET) as guarded:
        code = cli(guarded, data, "--api-key", "sk-wrong-key-456", "--retries", "5")
        sent = len(guarded.requests)

    assert code == 1
    assert sent == 2  # one per conversation: refused credentials are not retried
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "nbllm: 3 of 3 turns failed (see the 'error' column); most common: "
        "AuthenticationError: HTTP 401: Incorrect or missing API key for the nbllm test server. "
        "(2 turns)"
    )
    assert "sk-wrong-key-456" not in err


PROGRESS_SCRIPT = """
import sys
import nbllm
from nbllm.testing import TestServer

with TestServer() as server:
    nbllm.run(
        [{"id": i, "turns": ["a", "b"]} for i in range(20)], model="nbllm-test",
        api_base=server.url, checkpoint=False, cache=False, progress=True,
    )
"""


def test_progress_into_a_file_or_a_pipe_is_lines_never_frames(server, tmp_path):
    """A bar's carriage returns would land in the log: lines instead, and by default none."""
    data = write_jsonl(tmp_path / "convs.jsonl", RECORDS)
    log = tmp_path / "stderr.log"
    args = ["run", str(data), "--model", "nbllm-test", "--api-base", server.url]
    with log.open("w") as stderr:
        proc = subprocess.run(
            [sys.executable, "-m", "nbllm.cli", *args, "--no-checkpoint"],
            stdout=subprocess.PIPE, stderr=stderr, timeout=60, check=False,
        )  # fmt: skip
    assert proc.returncode == 0
    assert log.read_text() == ""  # the summary goes to stdout; nothing to say on stderr

    asked = subprocess.run(
        [sys.executable, "-c", PROGRESS_SCRIPT],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert asked.returncode == 0, asked.stderr
    assert "\r" not in asked.stderr
    lines = asked.stderr.splitlines()
    assert lines[0].startswith("nbllm: started: 40 turns in 20 conversations, model nbllm-test")
    assert lines[-1].startswith("nbllm: 40/40 turns ok in ")
    assert len(lines) == 2  # a short run: no line in between (one a minute)


def test_progress_lines_come_once_a_minute_while_turns_finish():
    import io

    from nbllm.executor.events import RunFinished, RunStarted
    from nbllm.types import TurnRecord
    from nbllm.ui import progress

    now = [0.0]
    out = io.StringIO()
    lines = progress.TextProgress(file=out, frames=False, clock=lambda: now[0])
    lines(RunStarted(conversations=3, turns=3, model="m", engine="fake", t=0.0))
    for i, at in enumerate((10.0, 61.0, 70.0)):
        now[0] = at
        answered = TurnRecord(i, 0, "q", answer="a", attempts=1, started_at=0.0, finished_at=at)
        lines(TurnFinished(answered, 0, at))
    lines(RunFinished(3, 0, 70.0, False, 70.0))
    assert out.getvalue().splitlines() == [
        "nbllm: started: 3 turns in 3 conversations, model m, engine fake",
        "nbllm: 2/3 turns, 0 failed, 0 retries",  # the first finish after a minute
        "nbllm: 3/3 turns ok in 1 min 10 s",
    ]


def test_progress_lines_count_tokens_generated_and_cut_answers():
    import io

    from nbllm.executor.events import EnginePhase, RunFinished, RunStarted
    from nbllm.types import TurnRecord
    from nbllm.ui import progress

    now = [0.0]
    out = io.StringIO()
    lines = progress.TextProgress(file=out, frames=False, clock=lambda: now[0])
    lines(RunStarted(conversations=2, turns=2, model="m", engine="torch", t=0.0))
    lines(EnginePhase("generating", 1234, None, 1.0))
    now[0] = 61.0
    cut = TurnRecord(0, 0, "q", answer="a", attempts=1, finish_reason="length")
    lines(TurnFinished(cut, 0, 61.0))
    lines(RunFinished(1, 0, 61.0, True, 61.0))
    assert out.getvalue().splitlines()[:2] == [
        "nbllm: started: 2 turns in 2 conversations, model m, engine torch",
        "nbllm: 1/2 turns, 0 failed, 0 retries, 1 cut short by max_tokens, 1,234 tokens generated",
    ]


def test_ctrl_c_writes_what_finished(server, tmp_path, capsys, monkeypatch):
    data = write_jsonl(tmp_path / "convs.jsonl", RECORDS)
    out = tmp_path / "results.jsonl"
    real_run = nbllm.run

    def run_then_interrupt(data, **options):
        sent = []

        def on_event(event):
            if isinstance(event, TurnFinished) and not sent:
                sent.append(event)
                signal.raise_signal(signal.SIGINT)  # as if Ctrl-C after the first finished turn

        return real_run(data, listeners=[on_event], **options)

    monkeypatch.setattr(nbllm, "run", run_then_interrupt)

    assert cli(server, data, "--concurrency", "1", "--out", str(out)) == 130

    assert "interrupted" in capsys.readouterr().err
    errors = [r["error"] for r in read_jsonl(out)]
    assert len(errors) == 3
    assert None in errors
    assert any(e is not None for e in errors)


def test_sigint_mid_run_exits_130_and_out_holds_what_finished(tmp_path):
    records = [{"id": f"c{i}", "turns": [f"Question {i}?"]} for i in range(8)]
    data = write_jsonl(tmp_path / "convs.jsonl", records)
    out = tmp_path / "results.jsonl"
    with TestServer(latency=0.5) as slow:  # one request at a time: 4 s for the whole batch
        args = ["run", str(data), "--model", "nbllm-test", "--api-base", slow.url]
        proc = subprocess.Popen(
            [sys.executable, "-m", "nbllm.cli", *args, "--concurrency", "1", "--out", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            # With one request at a time, the second was sent after the first turn's row.
            deadline = time.monotonic() + 30
            while len(slow.requests) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
            proc.wait()

    assert proc.returncode == 130, err
    assert "nbllm: interrupted" in err
    rows = read_jsonl(out)
    assert len(rows) == 8
    answered = [r for r in rows if r["error"] is None]
    assert 1 <= len(answered) < 8
    assert all(r["answer"].startswith("Answer to turn 0") for r in answered)
    assert all(r["error"].startswith("not run") for r in rows if r not in answered)


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"nbllm {nbllm.__version__}"


def test_console_script_writes_one_json_object_per_turn(server, tmp_path):
    data = write_jsonl(tmp_path / "convs.jsonl", RECORDS)
    out = tmp_path / "results.jsonl"
    args = ["run", str(data), "--model", "nbllm-test", "--api-base", server.url]
    proc = subprocess.run(
        [sys.executable, "-m", "nbllm.cli", *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert proc.returncode == 0, proc.stderr
    assert "turns_ok" in proc.stdout
    # stderr is a pipe here, not a terminal: no progress bar, only the closing notes.
    assert "%|" not in proc.stderr and "nbllm nbllm-test" not in proc.stderr
    assert proc.stderr.startswith("nbllm: wrote 3 rows")
    rows = read_jsonl(out)
    assert len(rows) == 3
    assert all(isinstance(r, dict) and list(r) == list(COLUMNS) for r in rows)
    assert [r["turn"] for r in rows] == [0, 1, 0]


def test_no_checkpoint_writes_no_run_folder(server, tmp_path, _nbllm_dir, capsys):
    data = write_jsonl(tmp_path / "convs.jsonl", RECORDS)

    assert cli(server, data, "--no-checkpoint") == 0

    assert not (_nbllm_dir / "runs").exists()
    assert nbllm.runs.list().empty
    assert main(["run", str(data), "--model", "m", "--checkpoint", "x", "--no-checkpoint"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_checkpoint_path(server, tmp_path, _nbllm_dir, capsys):
    data = write_jsonl(tmp_path / "convs.jsonl", RECORDS)
    path = tmp_path / "mine.sqlite"

    assert cli(server, data, "--checkpoint", str(path)) == 0
    assert cli(server, data, "--checkpoint", str(path)) == 0

    assert path.is_file()
    assert not (_nbllm_dir / "runs").exists()
    assert "3 of 3 turns resumed from the checkpoint" in capsys.readouterr().err
    assert len(server.requests) == 3


def test_rerun_resumes_and_sends_nothing(server, tmp_path, capsys):
    data = write_jsonl(tmp_path / "convs.jsonl", RECORDS)
    out = tmp_path / "results.jsonl"

    assert cli(server, data) == 0
    first = capsys.readouterr()
    assert "resumed" not in first.err
    assert len(server.requests) == 3

    assert cli(server, data, "--out", str(out)) == 0

    second = capsys.readouterr()
    assert "nbllm: 3 of 3 turns resumed from the checkpoint, 0 answered from the cache" in (
        second.err
    )
    assert "resumed            3" in second.out
    assert len(server.requests) == 3  # not one more request
    rows = read_jsonl(out)
    assert all(r["resumed"] for r in rows)
    assert rows[1]["answer"].startswith("Answer to turn 1: And in 2020?")


def test_fresh_starts_over(server, tmp_path, capsys):
    data = write_jsonl(tmp_path / "convs.jsonl", RECORDS)
    assert cli(server, data) == 0

    # Starting over, the answers still come from the response cache ...
    assert cli(server, data, "--fresh") == 0
    assert "0 of 3 turns resumed from the checkpoint, 3 answered from the cache" in (
        capsys.readouterr().err
    )
    assert len(server.requests) == 3

    # ... and without the cache every turn is asked again.
    assert cli(server, data, "--fresh", "--no-cache") == 0
    assert "resumed from the checkpoint" not in capsys.readouterr().err
    assert len(server.requests) == 6
    assert server.history_errors == 0


def test_no_cache_sends_every_request(server, tmp_path, _nbllm_dir, capsys):
    data = write_jsonl(tmp_path / "convs.jsonl", RECORDS)
    assert cli(server, data, "--no-checkpoint") == 0
    assert cli(server, data, "--no-checkpoint") == 0
    assert "3 answered from the cache" in capsys.readouterr().err
    assert len(server.requests) == 3

    assert cli(server, data, "--no-checkpoint", "--no-cache") == 0
    assert len(server.requests) == 6


def test_runs_lists_the_stored_runs(server, tmp_path, _nbllm_dir, capsys):
    assert main(["runs"]) == 0
    assert capsys.readouterr().out.startswith("no stored runs under ")

    data = write_jsonl(tmp_path / "convs.jsonl", RECORDS)
    assert cli(server, data) == 0
    capsys.readouterr()
    (run_id,) = nbllm.runs.list()["id"]
    (_nbllm_dir / "runs" / "broken").mkdir()

    assert main(["runs"]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert [t.strip() for t in lines[0].split("  ") if t.strip()] == [
        "ID", "CREATED (UTC)", "MODEL", "DONE/TOTAL", "BATCHES OUT", "SIZE", "IN USE"
    ]  # fmt: skip
    fields = lines[1].split()
    assert fields[0] == run_id
    assert fields[3:] == ["nbllm-test", "3/3", "0", fields[6], "KiB", "no"]
    assert lines[2].split()[0] == "broken"
    assert lines[3] == "unreadable: broken: no checkpoint.sqlite in this folder"

    # --root names another folder.
    assert main(["runs", "--root", str(tmp_path / "elsewhere")]) == 0
    assert "no stored runs under" in capsys.readouterr().out
    assert main(["runs", "--root", str(_nbllm_dir)]) == 0
    assert run_id in capsys.readouterr().out


def test_runs_rm_removes_a_run(server, tmp_path, _nbllm_dir, capsys):
    data = write_jsonl(tmp_path / "convs.jsonl", RECORDS)
    assert cli(server, data) == 0
    (run_id,) = nbllm.runs.list()["id"]
    capsys.readouterr()

    assert main(["runs", "rm", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nbllm: error: no stored run 'nope'")
    assert run_id in err

    assert main(["runs", "--root", str(_nbllm_dir), "rm", run_id[:8]]) == 0

    assert capsys.readouterr().out.strip() == (
        f"removed run {run_id} ({_nbllm_dir / 'runs' / run_id})"
    )
    assert nbllm.runs.list().empty
    assert main(["runs", "rm", run_id, "--root", str(_nbllm_dir)]) == 2
    assert "no stored run" in capsys.readouterr().err


def test_a_router_yaml_spreads_the_run_and_prints_each_deployments_figures(tmp_path, capsys):
    with TestServer(shared_history=True) as a, TestServer(shared_history=True) as b:
        config = tmp_path / "config.yaml"
        config.write_text(
            "model_list:\n"
            + "".join(
                f"  - model_name: llama\n    litellm_params:\n"
                f"      model: openai/llama\n      api_base: {s.url}\n"
                for s in (a, b)
            )
            + "router_settings:\n  routing_strategy: least-busy\n",
            encoding="utf-8",
        )
        records = [{**r, "id": f"{r['id']}{i}"} for i in range(4) for r in RECORDS]
        data = write_jsonl(tmp_path / "convs.jsonl", records)
        out = tmp_path / "out.csv"
        args = ["run", str(data), "--router", str(config), "--model", "llama", "--no-progress"]
        assert main([*args, "--concurrency", "4", "--no-cache", "--out", str(out)]) == 0
        stdout = capsys.readouterr().out
        for server in (a, b):
            deployment = f"llama@127.0.0.1:{server.url.split(':')[2].split('/')[0]}"
            assert deployment in stdout  # its row in the printed table
            assert server.requests and server.history_errors == 0
        assert set(pd.read_csv(out)["model"]) == {"llama"}
        assert main([*args[:4], "--model", "lama"]) == 2
        assert "did you mean 'llama'" in capsys.readouterr().err


def test_local_engine_flags_read_as_their_options():
    from nbllm.cli import build_parser
    from nbllm.engines.worker import local_option_args

    args = build_parser().parse_args(
        ["run", "data.jsonl", "--no-prefix-cache", "--prefix-cache-bytes", "1000",
         "--replicas", "auto", "--allow-oversubscribe", "--cluster", "ray"]
    )  # fmt: skip
    assert args.prefix_cache is False and args.prefix_cache_bytes == 1000
    assert args.replicas == "auto" and args.allow_oversubscribe is True and args.cluster == "ray"
    assert build_parser().parse_args(["run", "data.jsonl", "--replicas", "2"]).replicas == 2
    # A worker (nbllm serve) is told the same.
    serve_args = local_option_args(prefix_cache=False, prefix_cache_bytes=5)
    assert serve_args == ["--no-prefix-cache", "--prefix-cache-bytes", "5"]
    served = build_parser().parse_args(["serve", "--engine", "torch", *serve_args])
    assert served.prefix_cache is False and served.prefix_cache_bytes == 5
