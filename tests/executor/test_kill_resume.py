"""kill -9 in the middle of a run, then the same call again: a crash pays only for what
was in flight.

A job script runs ``nbllm.run`` in a child process against a ``TestServer`` in this
process, which logs every request (``log_path``, read back with ``read_log``). The child
is SIGKILLed partway, at a modest rate and at as high a rate as the client reaches; the
committed turns are read from its checkpoint; the same script runs again to the end.
The server's log then shows that no committed turn was requested again and that the
turns requested twice number at most the requests in flight at the kill (at most the
run's ``concurrency``) plus ``MAX_PENDING`` (answered turns a group commit may not have
committed yet). The test server's history check (a 400 for any assistant message it did
not answer) shows that every conversation was continued from its real stored answers.
The final frame equals an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import nbllm
from nbllm import Conversation
from nbllm.executor.storage import MAX_PENDING
from nbllm.testing import TestServer, messages_key, read_log

JOB = """
import json
import sys

import nbllm

url, checkpoint, data_path, out_path, cache, concurrency = sys.argv[1:]
with open(data_path) as f:
    data = json.load(f)
result = nbllm.run(
    data,
    model="nbllm-test",
    api_base=url,
    concurrency=int(concurrency),
    checkpoint=checkpoint,
    cache=cache == "on",
    progress=False,
)
result.df.to_json(out_path, orient="records", date_format="iso")
"""

N_CONVERSATIONS = 60


def make_dataset() -> list[dict]:
    rng = random.Random(20240611)
    return [
        {
            "id": f"conv-{i:02d}",
            "turns": [f"conversation {i} asks question {k}" for k in range(rng.randint(2, 5))],
        }
        for i in range(N_CONVERSATIONS)
    ]


def committed_turns(path: Path) -> dict[tuple[int, int], str]:
    """(conversation, turn) -> answer for every row committed before the kill."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT conversation, turn, answer FROM turns").fetchall()
    finally:
        conn.close()
    return {(c, t): a for c, t, a in rows}


def request_key(conv: dict, turn: int, answers: list[str]) -> str:
    """The server's key of the request for ``turn``, built the way nbllm builds it."""
    conversation = Conversation(conv["id"], tuple(conv["turns"]))
    return messages_key(conversation.messages_for(turn, answers))


def wait_until(predicate, timeout: float, what: str, poll: float = 0.002) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


def answered(server: TestServer, since: int) -> int:
    return sum(1 for r in server.requests[since:] if r.status == 200)


class Job:
    """The job script as a child process; always reaped, killed if still running."""

    def __init__(self, tmp_path: Path, name: str, args: list[str]) -> None:
        self.log_path = tmp_path / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, *args], stdout=self._log, stderr=subprocess.STDOUT
        )

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        finally:
            self._log.close()


# (latency range in seconds, concurrency): about 270 answers/s; as fast as the client goes.
MODEST = ((0.01, 0.05), 8)
FLAT_OUT = ((0.0, 0.002), 32)


@pytest.mark.parametrize(
    ("kill_at", "cache", "rate"),
    [
        pytest.param(0.45, "off", MODEST, id="early-no-cache"),
        pytest.param(0.8, "off", MODEST, id="late-no-cache"),
        pytest.param(0.6, "on", MODEST, id="cache-on"),
        pytest.param(0.6, "warm", MODEST, id="warm-cache"),
        pytest.param(0.5, "off", FLAT_OUT, id="flat-out-no-cache"),
        pytest.param(0.5, "on", FLAT_OUT, id="flat-out-cache-on"),
    ],
)
def test_kill_9_then_rerun_resends_only_what_was_in_flight(tmp_path, kill_at, cache, rate):
    """``warm``: the cache (default place) already holds the two-turn conversations, which
    run last (longest first), so the second run answers them from the cache."""
    latency, concurrency = rate
    data = make_dataset()
    total = sum(len(r["turns"]) for r in data)
    turns = [(i, k) for i, conv in enumerate(data) for k in range(len(conv["turns"]))]
    warm = {(i, k) for i, k in turns if cache == "warm" and len(data[i]["turns"]) == 2}
    data_path = tmp_path / "data.json"
    data_path.write_text(json.dumps(data))
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(JOB))
    checkpoint = tmp_path / "run" / "checkpoint.sqlite"
    rng = random.Random(f"{kill_at}-{cache}")
    threshold = int((total - len(warm)) * kill_at) + rng.randint(0, 8)
    assert threshold >= 40

    log_path = tmp_path / "server.jsonl"
    with TestServer(latency=latency, log_path=log_path) as server:
        options = {"model": "nbllm-test", "api_base": server.url, "concurrency": concurrency}
        # The uninterrupted run: answers are deterministic in the messages.
        reference = nbllm.run(data, checkpoint=False, cache=False, progress=False, **options)
        assert reference.summary.turns_ok == total
        reference_answers = dict(zip(turns, reference.df["answer"], strict=True))
        every_key = {
            request_key(data[i], k, [reference_answers[(i, j)] for j in range(k)]): (i, k)
            for i, k in turns
        }
        assert len(every_key) == total
        if warm:
            short = [conv for conv in data if len(conv["turns"]) == 2]
            nbllm.run(short, checkpoint=False, cache=True, progress=False, **options)

        args = [str(script), server.url, str(checkpoint), str(data_path)]
        cache_arg = ["off" if cache == "off" else "on", str(concurrency)]
        # --- first run, killed partway
        start_first = len(server.requests)
        job = Job(tmp_path, "first", [*args, str(tmp_path / "first.json"), *cache_arg])
        try:
            wait_until(
                lambda: answered(server, start_first) >= threshold or job.proc.poll() is not None,
                30,
                f"{threshold} answered requests",
            )
            assert job.proc.poll() is None, f"the job ended before the kill:\n{job.output()}"
            os.kill(job.proc.pid, signal.SIGKILL)
            # Counted after the kill: whatever the server answers from now on, the child
            # never read (answers read before are counted as out of the server: a lower bound).
            answered_at_kill = len(server.requests)
            assert job.proc.wait(10) == -signal.SIGKILL
        finally:
            job.close()
        # Requests of the dead process still being answered land in the log now, not later.
        wait_until(lambda: server.stats()["in_flight"] == 0, 5, "the server to go idle")
        assert not (tmp_path / "first.json").exists()
        first_requests = server.requests[start_first:]
        # Still in the server when the child died: in flight at the kill, at the least.
        in_server_at_kill = len(server.requests) - answered_at_kill

        # --- what was committed before the kill, keyed as the server keys requests
        committed = committed_turns(checkpoint)
        assert 0 < len(committed) < total, f"{len(committed)}/{total} turns committed"
        committed_keys = set()
        for i, k in committed:
            # A turn is only ever committed after the turns before it.
            assert all((i, j) in committed for j in range(k)), (i, k)
            assert committed[(i, k)] == reference_answers[(i, k)]
            answers = [committed[(i, j)] for j in range(k)]
            committed_keys.add(request_key(data[i], k, answers))
        answered_first = {r.key for r in first_requests if r.status == 200}
        assert answered_first <= set(every_key)
        assert committed_keys - {k for k, t in every_key.items() if t in warm} <= answered_first

        # --- the same call again, to the end
        start_second = len(server.requests)
        job = Job(tmp_path, "second", [*args, str(tmp_path / "second.json"), *cache_arg])
        try:
            job.proc.wait(30)
            assert job.proc.returncode == 0, job.output()
        finally:
            job.close()
        second_requests = server.requests[start_second:]

    # The turns paid for twice, counted from the server's log file.
    logged = read_log(log_path)
    assert [e.key for e in logged] == [r.key for r in server.requests]
    first_keys = {e.key for e in logged[start_first:start_second] if e.status == 200}
    resent = len(first_keys & {e.key for e in logged[start_second:]})
    in_flight = concurrency  # the most requests the killed run can have had unanswered
    assert in_server_at_kill <= resent <= in_flight + MAX_PENDING, (
        f"{resent} turns sent again; {in_server_at_kill} requests were still in the server "
        f"at the kill, at most {in_flight} in flight"
    )

    assert server.history_errors == 0
    assert all(r.status == 200 for r in second_requests), second_requests
    second_keys = [r.key for r in second_requests]
    assert not committed_keys & set(second_keys), "a committed turn was requested again"
    assert len(second_keys) == len(set(second_keys)), "a turn was requested twice"

    rows = json.loads((tmp_path / "second.json").read_text())
    assert [(r["conversation_id"], r["turn"]) for r in rows] == [
        (data[i]["id"], k) for i, k in turns
    ]
    assert all(r["error"] is None for r in rows)
    assert [r["answer"] for r in rows] == list(reference.df["answer"])
    resumed = {t for t, r in zip(turns, rows, strict=True) if r["resumed"]}
    assert resumed == set(committed)
    # Every turn was answered once: before the kill (and committed), in the second run,
    # or from the cache, which holds only answers the server gave.
    cached = {t for t, r in zip(turns, rows, strict=True) if r["cached"]}
    requested = {every_key[key] for key in second_keys}
    assert set(committed) | requested | cached == set(turns)
    assert not requested & cached
    if cache == "off":
        assert not cached
        assert len(requested) == total - len(committed)
    elif cache == "on":
        assert {every_key[key] for key in answered_first} >= cached
    else:
        assert cached == warm
        assert not warm & {every_key[key] for key in answered_first | set(second_keys)}
        assert warm - set(committed), "the kill came after every warm turn: nothing to test"
