"""Stop, then run the same call again, against the test server's request log: every answer
that arrived is kept and checkpointed, and a kept turn is never asked again.

Kept turns + turns asked again on the re-run == turns the server answered. A first stop
(``job.stop()``, one SIGINT) lets the requests in flight finish, so no turn is asked
twice; a second stop cancels them, and only those cut off are asked again.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

import nbllm
from nbllm.testing import TestServer, messages_key

CONVERSATIONS = 16
TURNS = 3
RECORDS = [
    {"id": f"c{i}", "turns": [f"c{i} question {k}?" for k in range(TURNS)]}
    for i in range(CONVERSATIONS)
]
ALL = CONVERSATIONS * TURNS
CONCURRENCY = 8


def kept_keys(df: pd.DataFrame) -> set[str]:
    """The server's key of every kept turn: the messages it was asked with."""
    keys = set()
    for _, rows in df.groupby("conversation_id", sort=False):
        messages: list[dict[str, str]] = []
        for row in rows.sort_values("turn").itertuples():
            messages.append({"role": "user", "content": row.question})
            if not isinstance(row.answer, str) or isinstance(row.error, str):
                break
            keys.add(messages_key(messages))
            messages.append({"role": "assistant", "content": row.answer})
    return keys


def answered(server: TestServer, after: float = 0.0, before: float = float("inf")) -> list[str]:
    return [e.key for e in server.requests if e.status == 200 and after <= e.t < before]


def wait_for_answers(server: TestServer, n: int) -> None:
    """Until the server has answered ``n`` requests and is busy with half as many more (so a
    stop finds requests in flight, for a while: each takes 0.3 s)."""
    deadline = time.monotonic() + 30
    while len(answered(server)) < n or server.stats()["in_flight"] < CONCURRENCY // 2:
        assert time.monotonic() < deadline, "the server answered too few requests"
        time.sleep(0.005)


def check_the_log(server: TestServer, kept: set[str], boundary: float, *, cancelled: bool) -> None:
    first = answered(server, before=boundary)
    again = answered(server, after=boundary)
    assert len(again) == len(set(again)) == ALL - len(kept)  # each missing turn asked once
    assert not kept & set(again)  # a kept turn is never asked again
    assert len(set(first) | set(again)) == ALL
    assert len(first) == len(set(first))
    assert kept <= set(first)
    cut_off = set(first) - kept
    if cancelled:
        assert len(cut_off) <= CONCURRENCY
        assert cut_off <= set(again)
    else:
        assert not cut_off  # every answer that arrived was kept: no turn asked twice
    assert all(e.status == 200 for e in server.requests)


def options(server: TestServer, checkpoint: Path) -> dict:
    return {
        "model": "nbllm-test",
        "api_base": server.url,
        "concurrency": CONCURRENCY,
        "checkpoint": checkpoint,
        "cache": False,
        "progress": False,
    }


@pytest.mark.parametrize("cancel", [False, True], ids=["graceful", "second-stop-cancels"])
def test_a_stopped_job_run_again_asks_only_for_what_it_did_not_keep(tmp_path, cancel):
    with TestServer(latency=0.3) as server:
        job = nbllm.submit(RECORDS, **options(server, tmp_path / "ckpt.sqlite"))
        wait_for_answers(server, 10)
        if cancel:  # two presses of Stop: the second cancels what is in flight
            other = threading.Thread(target=job.stop, kwargs={"timeout": 30})
            other.start()
            first = job.stop(timeout=30)
            other.join()
        else:
            first = job.stop(timeout=30)
        assert first.interrupted and job.status == "stopped"
        kept = kept_keys(first.df)
        assert len(kept) == first.summary.turns_ok
        # The server logs an answer as it sends it: a cancel may still cut it off.
        assert 10 - (CONCURRENCY if cancel else 0) <= len(kept) < ALL

        boundary = time.monotonic()
        second = nbllm.run(RECORDS, **options(server, tmp_path / "ckpt.sqlite"))
        assert second.summary.turns_ok == ALL and not second.interrupted
        assert second.summary.resumed == len(kept)
        check_the_log(server, kept, boundary, cancelled=cancel)


def read_rows(path: Path) -> pd.DataFrame:
    lines = path.read_text(encoding="utf-8").splitlines()
    return pd.DataFrame([json.loads(line) for line in lines])


@pytest.mark.parametrize("sigints", [1, 2], ids=["graceful", "second-sigint-cancels"])
def test_a_command_stopped_by_ctrl_c_run_again_asks_only_for_what_it_did_not_keep(
    tmp_path, sigints
):
    data = tmp_path / "convs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    checkpoint = tmp_path / "ckpt.sqlite"

    def command(out: Path, server: TestServer) -> list[str]:
        return [
            *(sys.executable, "-m", "nbllm.cli", "run", str(data)),
            *("--model", "nbllm-test", "--api-base", server.url),
            *("--concurrency", str(CONCURRENCY), "--checkpoint", str(checkpoint)),
            *("--no-cache", "--no-progress", "--out", str(out)),
        ]

    with TestServer(latency=0.3) as server:
        proc = subprocess.Popen(
            command(tmp_path / "first.jsonl", server), stderr=subprocess.PIPE, text=True
        )
        try:
            wait_for_answers(server, 10)
            for _ in range(sigints):
                proc.send_signal(signal.SIGINT)
                time.sleep(0.02)
            _, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == 130, err
        first = read_rows(tmp_path / "first.jsonl")
        kept = kept_keys(first)
        assert 10 - (CONCURRENCY if sigints > 1 else 0) <= len(kept) < ALL
        assert first["error"].isna().sum() == len(kept)

        boundary = time.monotonic()
        second = subprocess.run(
            command(tmp_path / "second.jsonl", server),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 0, second.stderr
        assert read_rows(tmp_path / "second.jsonl")["error"].isna().all()
        check_the_log(server, kept, boundary, cancelled=sigints > 1)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_wrong_port_ends_at_once_with_one_clear_line():
    url = f"http://127.0.0.1:{free_port()}/v1"
    t0 = time.perf_counter()
    result = nbllm.run(RECORDS, model="nbllm-test", api_base=url, checkpoint=False, cache=False)
    assert time.perf_counter() - t0 < 5  # default retries: no half minute of backoff
    reason = f"cannot reach {url}: connection refused"
    assert result.stop_reason == reason
    assert result.df["error"].str.startswith("not run").all()
    assert result.summary.turns_ok == 0
    assert result.verdict.startswith(reason)
