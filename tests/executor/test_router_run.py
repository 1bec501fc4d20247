"""router=: a deployment list run through nbllm's router, against real servers on loopback.

The servers stand for the deployments of one group: with ``shared_history`` each accepts an
earlier answer any of them would have given (and nothing else), so a turn answered by one
and the next sent to another proves the history crossed deployments exactly.
"""

from __future__ import annotations

import pytest

import nbllm
from nbllm.errors import ConfigError
from nbllm.executor.events import BreakerChanged, Event
from nbllm.testing import TestServer

FAST = {"checkpoint": False, "cache": False, "progress": False}


def dataset(n: int = 12, turns: int = 3) -> list[dict[str, object]]:
    return [{"id": i, "turns": [f"q{i} turn {k}" for k in range(turns)]} for i in range(n)]


def entry(server: TestServer, group: str = "grp", **params: object) -> dict[str, object]:
    return {
        "model_name": group,
        "litellm_params": {"model": "openai/test-model", "api_base": server.url, **params},
    }


def deployment_of(server: TestServer) -> str:
    return f"test-model@127.0.0.1:{server.url.split(':')[2].split('/')[0]}"


def test_turns_spread_over_a_group_and_histories_cross_deployments_exactly():
    with TestServer(shared_history=True) as a, TestServer(shared_history=True) as b:
        result = nbllm.run(
            dataset(),
            model="grp",
            router=[entry(a), entry(b)],
            routing="least-busy",
            concurrency=8,
            **FAST,
        )
        assert result.summary.turns_ok == 36
        assert a.history_errors == b.history_errors == 0
        df = result.df
        assert set(df["deployment"]) == {deployment_of(a), deployment_of(b)}
        assert set(df["model"]) == {"grp"}  # the group asked, not the server's name
        # Some conversation moved between deployments from one turn to the next.
        moved = df.groupby("conversation_id")["deployment"].nunique()
        assert (moved > 1).any()
        table = result.summary.deployments.set_index("deployment")
        assert list(table.columns)[:3] == ["group", "requests", "errors"]
        for server in (a, b):
            row = table.loc[deployment_of(server)]
            assert row["requests"] == len(server.requests)
            assert row["errors"] == 0
            assert row["breaker"] == "closed"
            answered = df[df["deployment"] == deployment_of(server)]
            tokens = answered["prompt_tokens"].sum() + answered["completion_tokens"].sum()
            assert row["tokens"] == tokens
            assert row["latency_p50"] > 0


def test_a_failing_deployment_opens_its_breaker_and_the_group_answers_everything():
    events: list[Event] = []
    with (
        TestServer(shared_history=True) as good,
        TestServer(shared_history=True, faults={"server_error": 1.0}) as bad,
    ):
        result = nbllm.run(
            dataset(10, 2),
            model="grp",
            router=[entry(good), entry(bad)],
            allowed_fails=2,
            cooldown_s=30,
            concurrency=4,
            retries=3,
            listeners=[events.append],
            **FAST,
        )
        assert result.summary.turns_ok == 20
        assert set(result.df["deployment"]) == {deployment_of(good)}
        # Two failures opened it; no traffic after that (the cooldown outlasts the run).
        assert len(bad.requests) <= 2 + 4  # at most those already in flight as it opened
        row = result.summary.deployments.set_index("deployment").loc[deployment_of(bad)]
        assert row["breaker_trips"] == 1
        assert row["breaker"] == "open"
        assert row["errors"] == row["requests"] == len(bad.requests)
        opened = [e for e in events if isinstance(e, BreakerChanged)]
        assert [(e.deployment, e.state) for e in opened] == [(deployment_of(bad), "open")]
        # A failure that was the deployment's fault is retried elsewhere at once.
        assert result.df["attempts"].max() <= 2


def test_a_deployments_parallel_cap_holds():
    with TestServer(latency=0.05, shared_history=True) as a:
        result = nbllm.run(
            dataset(16, 1),
            model="grp",
            router=[entry(a, max_parallel_requests=2)],
            concurrency=16,
            **FAST,
        )
        assert result.summary.turns_ok == 16
        assert a.max_in_flight == 2


def test_the_checkpoint_survives_adding_a_deployment(tmp_path):
    path = tmp_path / "run.sqlite"
    options = {"model": "grp", "checkpoint": path, "cache": False, "progress": False}
    with TestServer(shared_history=True) as a, TestServer(shared_history=True) as b:
        first = nbllm.run(dataset(6, 2), router=[entry(a)], **options)
        assert first.summary.turns_ok == 12
        sent = len(a.requests)
        again = nbllm.run(dataset(6, 2), router=[entry(a), entry(b)], **options)
        assert again.summary.resumed == 12
        assert len(a.requests) == sent and len(b.requests) == 0


def test_a_deployments_own_price_feeds_the_budget_cap():
    with TestServer(shared_history=True) as a:
        result = nbllm.run(
            dataset(40, 1),
            model="grp",
            router=[entry(a, cost_per_1k_tokens=10.0)],
            max_cost_usd=0.5,
            concurrency=1,
            **FAST,
        )
        assert result.summary.stop_reason == "budget: max_cost_usd=0.5 reached"
        assert 0 < result.summary.turns_ok < 40
        table = result.summary.deployments
        assert table["cost_usd"].iloc[0] == pytest.approx(result.summary.cost_usd)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"routing": "least-busy"}, "routing= applies to the deployments of router="),
        ({"router": "R", "api_base": "http://127.0.0.1:9/v1"}, "api_base= and router="),
        ({"router": "R", "model": "nope"}, "model= names 'nope'"),
        ({"router": "R", "routing": "fastest"}, "routing= expected one of"),
        ({"router": "R", "fallbacks": [{"grp": ["nope"]}]}, "names group 'nope'"),
        ({"router": "R", "allowed_fails": 0}, "allowed_fails= expected a whole number >= 1"),
        ({"router": "R", "cooldown_s": -1}, "cooldown_s= expected a number >= 0"),
        ({"router": "R", "engine": "torch"}, "cannot serve router= deployments"),
    ],
)
def test_bad_routing_input_is_refused_before_any_request(options, message):
    with TestServer() as a:
        if options.get("router") == "R":
            options = {**options, "router": [entry(a)]}
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            nbllm.run(dataset(2, 1), **{"model": "grp", **options, **FAST})
        assert a.requests == []


def test_several_groups_need_model_and_a_local_model_is_no_deployment(tmp_path):
    with TestServer() as a:
        router = [entry(a, group="one"), entry(a, group="two")]
        with pytest.raises(ConfigError, match="model= is required with router="):
            nbllm.run(dataset(2, 1), router=router, **FAST)
        local = tmp_path / "model.gguf"
        local.write_bytes(b"GGUF")
        router = [{"model_name": "g", "litellm_params": {"model": str(local)}}]
        with pytest.raises(ConfigError, match=r"model_list\[0\].*a model on this machine"):
            nbllm.run(dataset(2, 1), router=router, **FAST)


async def test_usage_based_routing_reads_an_auto_limit_in_force():
    """A deployment with rpm="auto" is measured against the limit it has found, which the
    lane hands to the router's load after each answer."""
    from nbllm.engines import FakeEngine
    from nbllm.executor.deployments import load_deployments
    from nbllm.executor.lanes import Routes, build_lanes
    from nbllm.executor.limits import RunLimits
    from nbllm.executor.routing import routing_options
    from nbllm.types import ChatResponse

    listed = load_deployments(
        [{"model_name": "g", "litellm_params": {"model": "m", "rpm": "auto", "max_rpm": 100}}]
    )
    routes = Routes(listed, "g", routing_options(listed, routing="usage-based"), {
        d.id: FakeEngine() for d in listed
    })  # fmt: skip

    def limits(deployment: str, own: dict[str, object]) -> RunLimits:
        return RunLimits(own["rpm"], None, 60.0, max_rpm=own["max_rpm"], deployment=deployment,
                         emit=lambda event: None)  # type: ignore[arg-type]  # fmt: skip

    lanes = build_lanes(routes, "g", {}, None, limits, lambda event: None)
    (lane,) = lanes.lanes
    assert lane.load is not None and lane.load.rpm is None
    lane.started()
    lane.answered(0.1, ChatResponse(text="ok", model="m"), None)
    assert lane.load.rpm == lane.limits.adaptive["rpm"].limit == 50  # half the ceiling
