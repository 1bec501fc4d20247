"""A deployment dies mid-run: its group's other deployment, then its fallbacks, answer.

Two ``nbllm.testing`` servers, each a child process of its own (``start_subprocess``), form
one group; one is killed with SIGKILL partway through a multi-turn batch, as a machine or a
vLLM server dies. Every turn must still be answered, and exactly: with ``shared_history``
a test server answers 400 to any assistant message that no server of the group would have
answered for that history, so a turn carried to the survivor with a wrong or missing
earlier answer would show as an error row (and a 400 in the survivor's log). The killed
deployment's breaker must have opened, and the per-deployment summary must say so.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pandas as pd

import nbllm
from nbllm.executor.events import Event, TurnFinished
from nbllm.retry import RetryPolicy
from nbllm.testing import TestServer, read_log, start_subprocess

MODEL = "openai/test-model"
N_CONVERSATIONS = 40
TURNS = 4
LATENCY_S = 0.05
KILL_AFTER = N_CONVERSATIONS * TURNS // 4  # turns answered when the server is killed
# Quick retries: the run's time is the servers' latency, not back-off.
FAST_RETRIES = RetryPolicy(retries=8, initial=0.02, maximum=0.2)


def dataset(prefix: str = "c") -> list[dict[str, object]]:
    return [
        {
            "id": f"{prefix}{i}",
            "turns": [f"Question {k} of conversation {i}: what changed?" for k in range(TURNS)],
        }
        for i in range(N_CONVERSATIONS)
    ]


def deployment_entry(group: str, url: str) -> dict[str, object]:
    return {"model_name": group, "litellm_params": {"model": MODEL, "api_base": url}}


def deployment_of(url: str) -> str:
    """The id nbllm gives a deployment: the model's name and the server's host:port."""
    host_port = url.split("//", 1)[1].split("/", 1)[0]
    return f"test-model@{host_port}"


def closed_port_url() -> str:
    """The URL of a loopback port nothing listens on (a deployment that is down)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


class KillAfter:
    """A run listener that SIGKILLs ``pid`` once ``n`` turns have been answered."""

    def __init__(self, pid: int, n: int) -> None:
        self.pid = pid
        self.n = n
        self.answered = 0
        self.killed_at: float | None = None  # Unix seconds, the clock of started_at

    def __call__(self, event: Event) -> None:
        if not isinstance(event, TurnFinished) or not event.record.ok:
            return
        self.answered += 1
        if self.answered == self.n and self.killed_at is None:
            os.kill(self.pid, signal.SIGKILL)
            self.killed_at = time.time()


def deployments_table(result: nbllm.RunResult) -> dict[str, dict[str, object]]:
    table = result.summary.deployments
    return {row["deployment"]: row for row in table.to_dict(orient="records")}


def statuses(log: Path) -> list[int]:
    return [entry.status for entry in read_log(log)]


def test_a_server_killed_mid_run_leaves_every_turn_answered_by_the_other(tmp_path):
    logs = [tmp_path / "doomed.jsonl", tmp_path / "survivor.jsonl"]
    with (
        start_subprocess(latency=LATENCY_S, shared_history=True, log_path=logs[0]) as doomed,
        start_subprocess(latency=LATENCY_S, shared_history=True, log_path=logs[1]) as survivor,
    ):
        kill = KillAfter(doomed.pid, KILL_AFTER)
        started = time.monotonic()
        result = nbllm.run(
            dataset(),
            model="grp",
            router=[deployment_entry("grp", doomed.url), deployment_entry("grp", survivor.url)],
            routing="least-busy",
            cooldown_s=1.0,
            allowed_fails=2,
            concurrency=8,
            retries=FAST_RETRIES,
            timeout=5,
            checkpoint=False,
            cache=False,
            progress=False,
            listeners=[kill],
        )
        wall_s = time.monotonic() - started
        assert doomed.process.wait(timeout=5) == -signal.SIGKILL
    assert kill.killed_at is not None, f"only {kill.answered} turns were answered"
    dead, alive = deployment_of(doomed.url), deployment_of(survivor.url)
    df = result.df

    errors = df[df["error"].notna()]
    assert errors.empty, errors[["conversation_id", "turn", "error"]].to_string()
    assert len(df) == N_CONVERSATIONS * TURNS and result.summary.turns_ok == len(df)
    assert set(df["model"]) == {"grp"}
    assert set(df["deployment"]) == {dead, alive}
    # A turn first sent after the kill can only have been answered by the survivor; and the
    # kill came early enough that most of the batch is such turns.
    after = df[df["started_at"] > pd.Timestamp(kill.killed_at, unit="s", tz="UTC")]
    assert len(after) >= len(df) // 2
    assert set(after["deployment"]) == {alive}
    # The survivor took over conversations the dead server had begun, and accepted every
    # history it was sent: no 400 "history mismatch" in its log.
    assert set(statuses(logs[1])) == {200}
    taken_over = set(df.loc[df["deployment"] == dead, "conversation_id"]) & set(
        after["conversation_id"]
    )
    assert taken_over

    rows = deployments_table(result)
    assert set(rows) == {dead, alive}
    assert rows[dead]["group"] == rows[alive]["group"] == "grp"
    assert rows[dead]["breaker_trips"] >= 1
    assert rows[dead]["errors"] >= 1
    assert rows[dead]["breaker"] in ("open", "half-open")
    assert rows[alive]["breaker"] == "closed" and rows[alive]["breaker_trips"] == 0
    # Attempts as the servers and the rows saw them: every attempt at the survivor was
    # answered; at the dead one, those answered are its rows, the rest its errors.
    assert rows[alive]["requests"] == len(statuses(logs[1])) == (df["deployment"] == alive).sum()
    assert rows[dead]["requests"] - rows[dead]["errors"] == (df["deployment"] == dead).sum()
    # The dead deployment cost a few failed attempts, not a back-off for each turn.
    assert wall_s < 15, wall_s


def test_a_group_that_is_down_from_the_start_passes_every_turn_to_its_fallback():
    down = closed_port_url()
    with TestServer() as backup:
        backup_id = deployment_of(backup.url)
        result = nbllm.run(
            dataset("f")[:10],
            model="primary",
            router=[deployment_entry("primary", down), deployment_entry("backup", backup.url)],
            fallbacks=[{"primary": ["backup"]}],
            cooldown_s=60.0,
            allowed_fails=1,
            concurrency=4,
            retries=FAST_RETRIES,
            timeout=5,
            checkpoint=False,
            cache=False,
            progress=False,
        )
        answered_by_backup = backup.stats()["by_status"].get(200, 0)
    df = result.df
    assert df["error"].isna().all(), df["error"].dropna().tolist()[:3]
    assert set(df["deployment"]) == {backup_id}
    assert answered_by_backup == len(df) == 10 * TURNS
    rows = deployments_table(result)
    assert rows[deployment_of(down)]["breaker"] == "open"
    assert rows[deployment_of(down)]["breaker_trips"] == 1
    assert rows[backup_id]["requests"] == len(df)
