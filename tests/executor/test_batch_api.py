"""batch_api=True against the test server's batch endpoints: multi-turn conversations go
in waves of batches with exact histories and no live request; a kill -9 and a re-run
re-attach to the batch in flight; expired lines are sent again; large waves are split;
a stop cancels; a failed line goes live with batch_fallback="live"; bad options are
refused before anything is sent."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from pydantic import BaseModel

import nbllm
from nbllm.errors import CheckpointError, ConfigError
from nbllm.testing import TestServer

FAST = {"batch_poll_s": 0.02, "progress": False}


def dataset(n: int = 6) -> list[dict]:
    """Conversations of 1 to 4 turns, most of 3 or 4 (ConvFinQA's shape)."""
    lengths = [4, 3, 3, 4, 2, 1, 3, 4, 3, 2]
    return [
        {
            "id": f"c{i}",
            "turns": [f"question {k} of conversation {i}?" for k in range(lengths[i % 10])],
        }
        for i in range(n)
    ]


def run(server: TestServer, data: list[dict], **options) -> nbllm.RunResult:
    options = {**FAST, **options}
    return nbllm.run(data, model="nbllm-test", api_base=server.url, batch_api=True, **options)


def lines_sent(server: TestServer) -> int:
    return len(server.batch_requests)


def test_multi_turn_waves_have_exact_histories_and_send_nothing_live(tmp_path) -> None:
    data = dataset(6)
    turns = sum(len(c["turns"]) for c in data)
    with TestServer(batch_delay_s=0.1) as server:
        result = run(server, data, checkpoint=tmp_path / "run.sqlite", cache=False)
        assert result.summary.turns_ok == turns
        assert server.history_errors == 0
        assert server.requests == []  # no live request
        assert lines_sent(server) == turns
        # One wave per turn: every conversation's turn k in the same batch.
        assert server.stats()["batches_created"] == max(len(c["turns"]) for c in data)
        assert set(result.df["engine"]) == {"openai batch"}
        # The answers are the live ones.
        live = nbllm.run(
            data, model="nbllm-test", api_base=server.url, checkpoint=False, cache=False,
            progress=False,
        )  # fmt: skip
        assert list(result.df["answer"]) == list(live.df["answer"])


def test_a_conversation_goes_on_when_its_own_batch_ends(tmp_path) -> None:
    """Two batches of one wave (split by batch_max_requests): the conversations of the
    first to end are asked their next turn while the second is still in flight."""
    data = dataset(4)
    with TestServer(batch_delay_s=0.15) as server:
        result = run(server, data, batch_max_requests=2, checkpoint=False, cache=False)
        assert result.summary.turns_ok == sum(len(c["turns"]) for c in data)
        assert all(b.n_lines <= 2 for b in server.batches)
        assert server.history_errors == 0


def test_a_wave_larger_than_the_limit_is_split(tmp_path) -> None:
    data = dataset(10)
    with TestServer(batch_delay_s=0.05, batch_max_requests=4) as server:
        result = run(server, data, batch_max_requests=4, checkpoint=False, cache=False)
        assert result.summary.turns_ok == sum(len(c["turns"]) for c in data)
        assert all(b.status == "completed" for b in server.batches)
        assert max(b.n_lines for b in server.batches) == 4


def test_an_expired_batch_sends_again_only_its_unanswered_lines(tmp_path) -> None:
    data = [{"id": f"c{i}", "turns": ["only question?"]} for i in range(6)]
    with TestServer(batch_delay_s=0.05, batch_expire_first=1) as server:
        result = run(
            server, data, checkpoint=False, cache=False, retries=nbllm.RetryPolicy(initial=0.01)
        )
        assert result.summary.turns_ok == 6
        first, second = server.batches[0], server.batches[1]
        assert first.status == "expired"
        assert second.n_lines == 3  # the half the expired batch left unanswered
        assert sum(b.n_lines for b in server.batches) == 9
        assert lines_sent(server) == 6  # answered lines: each turn once
        assert server.requests == []


@pytest.mark.parametrize(
    ("fallback", "live_requests", "batch_lines"), [("batch", 0, [5, 2]), ("live", 2, [5])]
)
def test_failed_lines_are_sent_again_in_a_batch_or_live(fallback, live_requests, batch_lines):
    """The server fails the first two lines: they go in the next batch, or live with
    batch_fallback="live"."""
    data = [{"id": f"c{i}", "turns": ["q?"]} for i in range(5)]
    with TestServer(batch_delay_s=0.05, batch_fail_first=2) as server:
        result = run(
            server, data, batch_fallback=fallback, checkpoint=False, cache=False,
            retries=nbllm.RetryPolicy(initial=0.01),
        )  # fmt: skip
        assert result.summary.turns_ok == 5
        assert len(server.requests) == live_requests
        assert [b.n_lines for b in server.batches] == batch_lines


def test_a_refused_batch_puts_the_providers_message_in_the_error_column() -> None:
    data = [{"id": f"c{i}", "turns": ["q?"]} for i in range(3)]
    with TestServer(batch_delay_s=0.05, batch_max_requests=2) as server:
        result = run(server, data, checkpoint=False, cache=False)
        assert result.summary.turns_failed == 3
        error = result.df["error"][0]
        assert "failed" in error and "2" in error, error


JOB = """
import sys
import nbllm

url, checkpoint = sys.argv[1:]
data = [{"id": f"c{i}", "turns": [f"q{k} of {i}?" for k in range(2)]} for i in range(4)]
nbllm.run(data, model="nbllm-test", api_base=url, batch_api=True, batch_poll_s=0.05,
          checkpoint=checkpoint, cache=False, progress=False)
"""


def test_kill_9_then_rerun_reattaches_to_the_batch_in_flight(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(JOB))
    checkpoint = tmp_path / "run.sqlite"
    env = {**os.environ, "PYTHONPATH": str(Path(nbllm.__file__).parents[1])}
    with TestServer(batch_delay_s=1.5) as server:
        argv = [sys.executable, str(script), server.url, str(checkpoint)]
        child = subprocess.Popen(argv, env=env)
        try:
            deadline = time.monotonic() + 60
            while server.stats()["batches_created"] < 1:
                assert child.poll() is None, "the job ended before its first batch"
                assert time.monotonic() < deadline, "no batch within 60 s"
                time.sleep(0.01)
            time.sleep(0.2)  # the journal is written right after the create returns
            child.send_signal(signal.SIGKILL)
            child.wait(10)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(10)
        assert server.stats()["batches_created"] == 1
        data = [{"id": f"c{i}", "turns": [f"q{k} of {i}?" for k in range(2)]} for i in range(4)]
        result = nbllm.run(
            data, model="nbllm-test", api_base=server.url, batch_api=True, batch_poll_s=0.05,
            checkpoint=checkpoint, cache=False, progress=False,
        )  # fmt: skip
        assert result.summary.turns_ok == 8
        # The first wave was not created again: one batch for turn 0, one for turn 1.
        assert server.stats()["batches_created"] == 2
        assert lines_sent(server) == 8
        assert server.requests == []
        assert server.history_errors == 0


def test_a_rerun_after_the_batch_ended_collects_it_without_a_new_one(tmp_path) -> None:
    """The batches of a finished run are all collected: running it again sends nothing."""
    data = dataset(3)
    with TestServer(batch_delay_s=0.05) as server:
        first = run(server, data, checkpoint=tmp_path / "c.sqlite", cache=False)
        created = server.stats()["batches_created"]
        again = run(server, data, checkpoint=tmp_path / "c.sqlite", cache=False)
        assert again.summary.turns_ok == first.summary.turns_ok
        assert server.stats()["batches_created"] == created


def test_stop_cancels_the_batches_in_flight() -> None:
    data = [{"id": f"c{i}", "turns": ["q?"]} for i in range(3)]
    with TestServer(batch_delay_s=30) as server:
        job = nbllm.submit(
            data, model="nbllm-test", api_base=server.url, batch_api=True, batch_poll_s=0.02,
            checkpoint=False, cache=False, progress=False, stop_grace_s=0.5,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while server.stats()["batches_created"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        result = job.stop(timeout=30)
        assert result.summary.turns_ok == 0
        assert server.stats()["batches_cancelled"] == 1
        assert server.batches[0].status in ("cancelling", "cancelled")


def test_anthropic_message_batches_answer_multi_turn_conversations() -> None:
    data = dataset(3)
    with TestServer(batch_delay_s=0.05) as server:
        result = nbllm.run(
            data, model="anthropic/claude-test", api_base=server.url, api_key="k-test",
            batch_api=True, checkpoint=False, cache=False, system="Be brief.", **FAST,
        )  # fmt: skip
        assert result.summary.turns_ok == sum(len(c["turns"]) for c in data)
        assert server.history_errors == 0
        assert {b.api for b in server.batches} == {"anthropic"}
        assert set(result.df["engine"]) == {"anthropic batch"}


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"model": None, "engine": "torch"}, "runs on this machine"),
        ({"model": "groq/llama-3.1-8b-instant", "api_key": "x"}, "groq has no batch API"),
        ({"model": "openai/gpt-4o-mini", "api_key": "x", "rpm": 500}, "rpm"),
        ({"model": "openai/gpt-4o-mini", "api_key": "x", "tpm": 9000}, "tpm"),
    ],
)
def test_bad_batch_options_are_one_line_before_anything_is_sent(options, says) -> None:
    data = [{"id": "a", "turns": ["q?"]}]
    with pytest.raises(ConfigError) as caught:
        nbllm.run(data, batch_api=True, progress=False, checkpoint=False, cache=False, **options)
    message = str(caught.value)
    assert says in message and "\n" not in message, message
    assert "batch_api" in message


class Revenue(BaseModel):
    answer: str
    year: int
    amount: float


def test_structured_answers_and_scores_work_the_same_over_batches() -> None:
    data = [{"id": f"c{i}", "turns": ["q0?", "q1?"], "references": ["x", "y"]} for i in range(3)]
    with TestServer(batch_delay_s=0.05) as server:
        result = run(
            server, data, response_format=Revenue, score="exact", checkpoint=False, cache=False
        )
        assert result.summary.turns_ok == 6
        assert list(result.df["parsed"].map(lambda p: p["year"])) == [0, 1] * 3
        assert "score" in result.df.columns
        assert server.requests == [] and server.history_errors == 0


def test_several_models_each_go_in_their_own_batches() -> None:
    data = dataset(3)
    turns = sum(len(c["turns"]) for c in data)
    with TestServer(batch_delay_s=0.05) as server:
        result = nbllm.run(
            data, model=["nbllm-test", "nbllm-other"], api_base=server.url, batch_api=True,
            checkpoint=False, cache=False, **FAST,
        )  # fmt: skip
        assert result.summary.turns_ok == 2 * turns
        assert set(result.df["model"]) == {"nbllm-test", "nbllm-other"}
        assert server.history_errors == 0 and server.requests == []


def test_rows_cost_the_batch_price_and_the_summary_says_the_saving() -> None:
    data = [{"id": f"c{i}", "turns": ["a question?"]} for i in range(3)]
    with TestServer(batch_delay_s=0.05) as server:
        result = nbllm.run(
            data, model="openai/gpt-4o-mini", api_base=server.url, batch_api=True,
            checkpoint=False, cache=False, **FAST,
        )  # fmt: skip
    df = result.df
    live = df["prompt_tokens"] * 1.5e-7 + df["completion_tokens"] * 6e-7
    batch = df["prompt_tokens"] * 7.5e-8 + df["completion_tokens"] * 3e-7
    assert list(df["cost_usd"]) == pytest.approx(list(batch))
    assert list(df["saved_usd"]) == pytest.approx(list(live - batch))
    assert result.summary.saved_usd == pytest.approx(float((live - batch).sum()))


def test_a_budget_cap_holds_a_batch_s_worst_case_before_it_is_created() -> None:
    """Each request may take 100 answer tokens at $3e-7 each: the cap lets 3 go."""
    data = [{"id": f"c{i}", "turns": ["q?"]} for i in range(8)]
    with TestServer(batch_delay_s=0.05) as server:
        result = nbllm.run(
            data, model="openai/gpt-4o-mini", api_base=server.url, batch_api=True,
            max_tokens=100, max_cost_usd=3.5 * 100 * 3e-7, checkpoint=False, cache=False,
            **FAST,
        )  # fmt: skip
        assert [b.n_lines for b in server.batches] == [3]
    assert result.stop_reason is not None and "max_cost_usd" in result.stop_reason
    assert result.summary.turns_ok == 3
    assert result.df["error"].dropna().str.startswith("not run").all()


RESUMABLE = """
import sys
import nbllm

url, root = sys.argv[1:]
data = [{"id": f"c{i}", "turns": [f"q{k} of {i}?" for k in range(2)]} for i in range(3)]
nbllm.run(data, model="nbllm-test", api_base=url, batch_api=True, batch_poll_s=0.05,
          cache=False, progress=False)
"""


def test_runs_resume_picks_up_a_killed_batch_run_by_its_id(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(RESUMABLE))
    root = tmp_path / "nbllm-dir"
    env = {
        **os.environ, "PYTHONPATH": str(Path(nbllm.__file__).parents[1]), "NBLLM_DIR": str(root)
    }  # fmt: skip
    with TestServer(batch_delay_s=1.0) as server:
        child = subprocess.Popen([sys.executable, str(script), server.url, str(root)], env=env)
        try:
            deadline = time.monotonic() + 60
            while server.stats()["batches_created"] < 1:
                assert child.poll() is None and time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(0.2)
            child.send_signal(signal.SIGKILL)
            child.wait(10)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(10)
        runs = nbllm.runs.list_runs(root)
        assert len(runs) == 1 and runs["done"][0] == 0
        job = nbllm.runs.resume(runs["id"][0][:6], root=root, progress=False)
        result = job.result(timeout=60)
        assert result.summary.turns_ok == 6
        assert server.stats()["batches_created"] == 2  # turn 0's batch was re-attached
        assert server.requests == [] and server.history_errors == 0


def test_resume_of_a_run_that_kept_no_call_says_so(tmp_path: Path) -> None:
    root = tmp_path / "dir"
    folder = root / "runs" / "abc123"
    folder.mkdir(parents=True)
    from nbllm.executor.checkpoint import CheckpointStore, RunIdentity

    identity = RunIdentity(dataset="d", model="m", engine="e", params={}, system=None)
    CheckpointStore.open(folder / "checkpoint.sqlite", identity, conversations=1, turns=1).close()
    with pytest.raises(CheckpointError, match="keeps no call to resume"):
        nbllm.runs.resume("abc", root=root)


def test_a_stopped_batch_run_is_finished_by_nbllm_runs_resume(tmp_path, monkeypatch, capsys):
    """stop() cancels the batch in flight; ``nbllm runs resume ID`` sends its turns again
    and runs the rest to the end."""
    from nbllm.cli import main

    monkeypatch.setenv("NBLLM_DIR", str(tmp_path))
    data = [{"id": f"c{i}", "turns": ["q0?", "q1?"]} for i in range(3)]
    with TestServer(batch_delay_s=1.0) as server:
        job = nbllm.submit(
            data, model="nbllm-test", api_base=server.url, batch_api=True, batch_poll_s=0.02,
            cache=False, progress=False, stop_grace_s=0.2,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while server.stats()["batches_created"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert job.stop(timeout=30).summary.turns_ok == 0
        run_id = nbllm.runs.list_runs()["id"][0]
        capsys.readouterr()
        assert main(["runs", "resume", run_id[:8]]) == 0
        out = capsys.readouterr().out
        assert "6/6 turns ok" in out, out
        assert server.stats()["batches_cancelled"] == 1
        assert server.history_errors == 0 and server.requests == []


async def test_an_interrupted_run_says_which_batch_each_waiting_turn_is_in(tmp_path) -> None:
    data = [{"id": f"c{i}", "turns": ["q0?", "q1?"]} for i in range(3)]
    with TestServer(batch_delay_s=30) as server:
        running = nbllm.arun(
            data, model="nbllm-test", api_base=server.url, batch_api=True,
            checkpoint=tmp_path / "c.sqlite", cache=False, **FAST,
        )  # fmt: skip
        task = asyncio.create_task(running)
        while server.stats()["batches_created"] < 1:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        task.cancel()  # an interrupt: the batch is not cancelled
        result = await task
        assert server.stats()["batches_cancelled"] == 0
    batch_id = server.batches[0].id
    first = result.df[result.df["turn"] == 0]["error"]
    assert all(e.startswith(f"not run: pending in batch {batch_id}") for e in first)
    assert all("run the same call again" in e for e in first)
    assert result.df[result.df["turn"] == 1]["error"].str.startswith("not run: the run was").all()


def test_a_run_begun_live_goes_on_through_batches_from_its_checkpoint(tmp_path) -> None:
    """A live run stopped by its token cap, run again with batch_api=True: its answered
    turns are resumed, only the rest go into batches."""
    data = dataset(4)
    turns = sum(len(c["turns"]) for c in data)
    checkpoint = tmp_path / "c.sqlite"
    with TestServer(batch_delay_s=0.05) as server:
        options = {"model": "nbllm-test", "api_base": server.url, "cache": False}
        live = nbllm.run(
            data, checkpoint=checkpoint, progress=False, max_tokens_total=200, concurrency=2,
            **options,
        )  # fmt: skip
        assert 0 < live.summary.turns_ok < turns, live.summary
        again = nbllm.run(data, checkpoint=checkpoint, batch_api=True, **FAST, **options)
        assert again.summary.turns_ok == turns
        assert again.summary.resumed == live.summary.turns_ok
        assert len(server.batch_requests) == turns - live.summary.turns_ok
        assert server.history_errors == 0


def test_a_kept_call_keeps_plain_options_and_never_the_key() -> None:
    from nbllm.config import RunConfig
    from nbllm.dataset import load_conversations
    from nbllm.run_call import call_of, call_text

    conversations = load_conversations([{"id": "a", "turns": ["q?"], "references": ["1"]}])
    config = RunConfig(
        model="openai/gpt-4o-mini", batch_api=True, api_key="key-not-kept", score="numeric",
        parse="number", alerts={"latency_p95_s": 1.0}, parse_retries=0,
        redis_url="redis://:password-not-kept@127.0.0.1:6379/0",
    )  # fmt: skip
    text = call_text(config, conversations)
    assert text is not None and "key-not-kept" not in text and "password-not-kept" not in text
    again, options = call_of(text, "here")
    assert again == conversations
    assert (options["score"], options["parse"], options["alerts"]) == (
        "numeric", "number", {"latency_p95_s": 1.0}
    )  # fmt: skip
    assert "api_key" not in options
