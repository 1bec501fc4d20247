"""Replicas as Ray actors, on a local Ray instance of two CPUs."""

from __future__ import annotations

import os
import socket
import sys
import time

import pytest
from embedded_model import require_embedded_model
from helpers import after_turns

import nbllm
from nbllm.engines import ray_replicas
from nbllm.errors import ConfigError, EngineUnavailable

DATA = [
    {"id": f"c{i}", "turns": [f"What is {i} + {i}?", "Double it.", "Is that even?"]}
    for i in range(6)
]


def require_ray():
    try:
        import ray
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("tools/test.sh should have installed ray (the test extra)")
        pytest.skip("ray is not installed")
    return ray


def run(**options) -> nbllm.RunResult:
    return nbllm.run(DATA, max_tokens=8, checkpoint=False, cache=False, progress=False, **options)


@pytest.fixture(scope="module")
def local_ray():
    ray = require_ray()
    require_embedded_model()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    with ray_replicas._shared_lock:
        ray_replicas._shared.clear()
    ray.shutdown()


def test_cluster_ray_without_ray_installed_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails
    with pytest.raises(ConfigError, match=r"pip install 'nbllm\[ray\]'"):
        run(engine="torch", cluster="ray")


def test_a_ray_address_that_does_not_answer_is_one_line_before_any_request(monkeypatch):
    ray = require_ray()
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    started = time.monotonic()
    with pytest.raises(
        EngineUnavailable, match=f"no Ray cluster answers at ray://127.0.0.1:{port}"
    ):
        run(engine="torch", ray_address=f"ray://127.0.0.1:{port}")
    assert time.monotonic() - started < 10


def test_a_server_cannot_be_replicated_on_ray():
    with pytest.raises(ConfigError, match="cluster='ray' runs copies of a local model"):
        run(model="m", api_base="http://127.0.0.1:9/v1", cluster="ray")


def test_two_ray_actors_answer_as_one_model_and_a_killed_one_loses_no_turn(local_ray):
    ray = local_ray
    reference = run(engine="torch", worker=False)
    killed: list[object] = []

    def kill_one() -> None:
        # Once four turns are answered, actor 1 dies with requests in flight; Ray restarts it.
        [replicas] = ray_replicas._shared.values()
        killed.append(replicas.actors[0])
        ray.kill(replicas.actors[0], no_restart=False)

    result = run(engine="torch", cluster="ray", replicas=2, listeners=[after_turns(4, kill_one)])
    df = result.df
    assert killed, "the run ended before an actor could be killed"
    assert df["error"].isna().all(), df["error"].dropna().tolist()
    assert list(df["answer"]) == list(reference.df["answer"])  # exact history, every turn
    assert set(df["engine"]) == {"torch ray 1/2", "torch ray 2/2"}
    assert (df.groupby("conversation_id")["engine"].nunique() == 1).sum() >= 1

    # Ray starts the actor again (its model loads anew); then a second run uses both.
    [replicas] = ray_replicas._shared.values()
    deadline = time.monotonic() + 300
    while True:
        try:
            ray.get(replicas.actors[0].ready.remote(), timeout=60)
            break
        except ray.exceptions.RayActorError:  # still restarting
            assert time.monotonic() < deadline, "Ray did not start the actor again"
            time.sleep(0.5)
    again = run(engine="torch", cluster="ray", replicas=2)
    assert list(again.df["answer"]) == list(reference.df["answer"])
    assert again.df["engine"].nunique() == 2


def test_more_replicas_than_the_clusters_cpus_needs_oversubscribing(local_ray):
    with pytest.raises(ConfigError, match="more than the Ray cluster's 2 CPUs"):
        run(engine="torch", cluster="ray", replicas=3)
