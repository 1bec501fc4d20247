"""Replicas of a local model in worker processes: placement, routing, and a replica that dies."""

from __future__ import annotations

import os
import signal
import time

import pytest
from embedded_model import require_embedded_model
from helpers import after_turns

import nbllm
from nbllm.engines import replicas as replicas_module
from nbllm.engines.hardware import GpuInfo, Hardware
from nbllm.engines.replicas import replica_places, resolve_replicas
from nbllm.errors import ConfigError

CPU_2 = Hardware(cpu_count=2, memory_total=None)
GPUS_2 = Hardware(
    cpu_count=16, memory_total=None, gpus=(GpuInfo(0, "A", "cuda"), GpuInfo(1, "B", "cuda"))
)

DATA = [
    {"id": f"c{i}", "turns": [f"What is {i} + {i}?", "Double it.", "Is that even?"]}
    for i in range(6)
]


def on(monkeypatch, machine: Hardware) -> None:
    monkeypatch.setattr(replicas_module, "hardware", lambda: machine)


# -- how many, and where ----------------------------------------------------------------


def test_auto_is_one_replica_per_visible_gpu_and_one_on_a_cpu(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    on(monkeypatch, CPU_2)
    assert resolve_replicas("auto") == 1
    on(monkeypatch, GPUS_2)
    assert resolve_replicas("auto") == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert resolve_replicas("auto") == 1


@pytest.mark.parametrize("bad", [0, -1, "two", 1.5, True])
def test_a_count_that_is_not_a_whole_number_or_auto_is_refused(bad):
    with pytest.raises(ConfigError, match="replicas must be a whole number >= 1 or 'auto'"):
        resolve_replicas(bad)


def test_more_replicas_than_gpus_or_cores_needs_oversubscribing(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    on(monkeypatch, GPUS_2)
    with pytest.raises(ConfigError, match=r"replicas=3 is more than the 2 visible GPUs.*"):
        resolve_replicas(3)
    assert resolve_replicas(3, allow_oversubscribe=True) == 3
    on(monkeypatch, CPU_2)
    with pytest.raises(ConfigError, match="more than the 2 CPU cores"):
        resolve_replicas(4)


def test_each_replica_is_pinned_to_a_gpu_or_given_a_share_of_the_cores(monkeypatch):
    on(monkeypatch, GPUS_2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert replica_places(3) == [
        {"CUDA_VISIBLE_DEVICES": "3"},
        {"CUDA_VISIBLE_DEVICES": "5"},
        {"CUDA_VISIBLE_DEVICES": "3"},
    ]
    on(monkeypatch, CPU_2)
    assert replica_places(2) == [{"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}] * 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"replicas": 0}, "replicas"),
        ({"replicas": 2, "api_base": "http://127.0.0.1:9/v1", "model": "m"}, "with a server"),
        ({"replicas": 2, "worker": False}, "worker=False"),
        ({"replicas": 64}, "allow_oversubscribe=True"),
    ],
)
def test_bad_replica_options_fail_before_anything_starts(options, message):
    started = time.monotonic()
    with pytest.raises(ConfigError, match=message):
        nbllm.run(DATA, progress=False, checkpoint=False, **options)
    assert time.monotonic() - started < 5  # no worker was started
    assert not replicas_module._shared


# -- two real replicas of the embedded model ----------------------------------------------


@pytest.fixture
def stop_replicas():
    yield
    with replicas_module._shared_lock:
        found = list(replicas_module._shared.values())
        replicas_module._shared.clear()
    for replica_set in found:
        replica_set.stop()


def run(**options) -> nbllm.RunResult:
    return nbllm.run(DATA, max_tokens=8, checkpoint=False, cache=False, progress=False, **options)


def test_two_replicas_answer_as_one_model_and_a_killed_one_loses_no_turn(stop_replicas):
    require_embedded_model()
    reference = run(engine="torch", worker=False)
    assert reference.df["error"].isna().all()

    killed: list[int] = []

    def kill_one() -> None:
        # Once four turns are answered, replica 1's process dies with requests in flight.
        [replica_set] = replicas_module._shared.values()
        pid = replica_set.workers[0].pid
        killed.append(pid)
        os.kill(pid, signal.SIGKILL)

    result = run(engine="torch", replicas=2, listeners=[after_turns(4, kill_one)])
    df = result.df
    assert killed, "the run ended before a replica could be killed"
    assert df["error"].isna().all(), df["error"].dropna().tolist()
    # Every turn answered, with the history a single model gives (greedy answers agree).
    assert list(df["answer"]) == list(reference.df["answer"])
    assert set(df["engine"]) <= {"torch worker 1/2", "torch worker 2/2"}
    assert df["engine"].nunique() == 2

    # The dead replica is started again in the background, and serves the next run.
    [replica_set] = replicas_module._shared.values()
    deadline = time.monotonic() + 120
    while replica_set.restarts < 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert replica_set.restarts == 1 and replica_set.workers[0].pid != killed[0]
    again = run(engine="torch", replicas=2)
    assert list(again.df["answer"]) == list(reference.df["answer"])


def test_a_conversation_stays_on_its_replica_while_it_lives(stop_replicas):
    require_embedded_model()
    df = run(engine="torch", replicas=2).df
    per_conversation = df.groupby("conversation_id")["engine"].nunique()
    assert (per_conversation == 1).all()
    assert df["engine"].nunique() == 2  # and the conversations were spread over both


@pytest.mark.gpu
def test_auto_starts_one_replica_per_gpu_each_pinned_to_its_own(stop_replicas):
    require_embedded_model()
    from nbllm.engines import hardware

    gpus = sum(1 for g in hardware().gpus if g.kind == "cuda")
    df = run(engine="torch", replicas="auto").df
    assert df["error"].isna().all()
    [replica_set] = replicas_module._shared.values()
    assert len(replica_set) == gpus
    pinned = [w_place["CUDA_VISIBLE_DEVICES"] for w_place in replica_set.places]
    assert len(set(pinned)) == gpus
    assert set(df["engine"]) <= {f"torch worker {i + 1}/{gpus}" for i in range(gpus)}
