"""The router picks a deployment by its strategy on crafted loads, skips open breakers,
keeps to the lowest order and falls back group by group; loads run on a fake clock."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from helpers import FakeClock

from nbllm.errors import ConfigError
from nbllm.executor.deployments import Deployment, DeploymentList, load_deployments
from nbllm.executor.routing import LATENCY_WEIGHT, DeploymentLoad, Router, routing_options


def deployments(*specs: tuple[str, str, dict[str, object]], **settings: object) -> DeploymentList:
    """``(group, name, litellm_params)`` each; ids are ``name@h``."""
    entries = [
        {"model_name": g, "litellm_params": {"model": f"openai/{n}", "api_base": "http://h/", **p}}
        for g, n, p in specs
    ]
    return load_deployments({"model_list": entries, "router_settings": settings})


def router(listed: DeploymentList, strategy: str, *, is_open=None, seed: int = 1, **options):
    chosen = routing_options(listed, routing=strategy, **options)
    return Router(listed, chosen, is_open=is_open, rng=random.Random(seed))


def loads_of(listed: DeploymentList, clock: FakeClock) -> dict[str, DeploymentLoad]:
    return {d.id: DeploymentLoad(clock=clock) for d in listed}


def ids_of(picks: list[Deployment | None]) -> Counter[str | None]:
    return Counter(d.id if d is not None else None for d in picks)


# --------------------------------------------------------------------------- strategies


def test_simple_shuffle_follows_the_weights():
    listed = deployments(("g", "a", {"weight": 1}), ("g", "b", {"weight": 3}))
    chooser = router(listed, "simple-shuffle", seed=7)
    counts = ids_of([chooser.pick("g", {}) for _ in range(8000)])
    assert set(counts) == {"a@h", "b@h"}
    assert counts["b@h"] / 8000 == pytest.approx(0.75, abs=0.02)


def test_simple_shuffle_by_rpm_when_no_weight_is_given():
    listed = deployments(("g", "a", {"rpm": 100}), ("g", "b", {"rpm": 900}))
    chooser = router(listed, "simple-shuffle", seed=3)
    counts = ids_of([chooser.pick("g", {}) for _ in range(5000)])
    assert counts["b@h"] / 5000 == pytest.approx(0.9, abs=0.02)


def test_the_same_seed_gives_the_same_picks():
    listed = deployments(("g", "a", {}), ("g", "b", {}), ("g", "c", {}))
    one, two = router(listed, "simple-shuffle", seed=5), router(listed, "simple-shuffle", seed=5)
    picks = [one.pick("g", {}) for _ in range(50)]
    assert picks == [two.pick("g", {}) for _ in range(50)]
    assert len(set(picks)) == 3


def test_least_busy_picks_the_fewest_in_flight():
    clock = FakeClock(1000.0)
    listed = deployments(("g", "a", {}), ("g", "b", {}), ("g", "c", {}))
    loads = loads_of(listed, clock)
    for name, busy in (("a@h", 3), ("b@h", 1), ("c@h", 2)):
        for _ in range(busy):
            loads[name].start()
    chooser = router(listed, "least-busy")
    assert {chooser.pick("g", loads).id for _ in range(20)} == {"b@h"}  # type: ignore[union-attr]
    loads["b@h"].start()
    loads["b@h"].start()  # now a 3, b 3, c 2
    assert chooser.pick("g", loads).id == "c@h"  # type: ignore[union-attr]
    loads["c@h"].start()  # all 3: ties go to any of them
    assert ids_of([chooser.pick("g", loads) for _ in range(60)]).keys() == {"a@h", "b@h", "c@h"}


def test_latency_based_measures_each_then_keeps_to_the_fastest():
    clock = FakeClock(1000.0)
    listed = deployments(("g", "a", {}), ("g", "b", {}), ("g", "c", {}))
    loads = loads_of(listed, clock)
    chooser = router(listed, "latency-based")
    # Unmeasured and idle first: the first three requests go to three different deployments.
    started = []
    for _ in range(3):
        d = chooser.pick("g", loads)
        assert d is not None
        loads[d.id].start()
        started.append(d.id)
    assert sorted(started) == ["a@h", "b@h", "c@h"]
    for name, latency in (("a@h", 0.9), ("b@h", 0.2), ("c@h", 0.5)):
        loads[name].finish(latency_s=latency, tokens=10)
    assert {chooser.pick("g", loads).id for _ in range(20)} == {"b@h"}  # type: ignore[union-attr]
    # b slows down: its mean moves by LATENCY_WEIGHT of each new sample, and c takes over.
    loads["b@h"].start()
    loads["b@h"].finish(latency_s=2.0)
    assert loads["b@h"].latency_s == pytest.approx(0.2 + LATENCY_WEIGHT * 1.8)
    assert chooser.pick("g", loads).id == "c@h"  # type: ignore[union-attr]


def test_latency_based_measures_again_what_it_has_not_heard_from_in_a_window():
    clock = FakeClock(1000.0)
    listed = deployments(("g", "a", {}), ("g", "b", {}))
    loads = loads_of(listed, clock)
    chooser = router(listed, "latency-based")
    for name, latency in (("a@h", 0.1), ("b@h", 3.0)):
        loads[name].start()
        loads[name].finish(latency_s=latency)
    clock.now += 45
    loads["a@h"].start()
    loads["a@h"].finish(latency_s=0.1)
    assert chooser.pick("g", loads).id == "a@h"  # type: ignore[union-attr]
    clock.now += 30  # b's only sample is now older than the 60 s window
    assert chooser.pick("g", loads).id == "b@h"  # type: ignore[union-attr]
    loads["b@h"].start()  # its probe is under way: the rest go to the fastest
    assert chooser.pick("g", loads).id == "a@h"  # type: ignore[union-attr]


def test_latency_based_spreads_while_none_is_measured_yet():
    clock = FakeClock(1000.0)
    listed = deployments(("g", "a", {}), ("g", "b", {}))
    loads = loads_of(listed, clock)
    chooser = router(listed, "latency-based")
    for _ in range(6):
        d = chooser.pick("g", loads)
        assert d is not None
        loads[d.id].start()
    assert [loads[i].in_flight for i in ("a@h", "b@h")] == [3, 3]


def test_usage_based_picks_the_lowest_share_of_its_own_limit():
    clock = FakeClock(1000.0)
    listed = deployments(
        ("g", "a", {"rpm": 100}), ("g", "b", {"rpm": 10}), ("g", "c", {"tpm": 1000})
    )
    loads = loads_of(listed, clock)
    for _ in range(20):
        loads["a@h"].start()
        loads["a@h"].finish(latency_s=0.1)  # 20 of 100 rpm: 0.2
    for _ in range(3):
        loads["b@h"].start()
        loads["b@h"].finish(latency_s=0.1)  # 3 of 10 rpm: 0.3
    loads["c@h"].start()
    loads["c@h"].finish(latency_s=0.1, tokens=400)  # 400 of 1000 tpm: 0.4
    chooser = router(listed, "usage-based")
    assert chooser.pick("g", loads).id == "a@h"  # type: ignore[union-attr]
    # The window moves on: a's requests expire, c's tokens too; b's later ones stay.
    clock.now += 30
    loads["b@h"].start()
    loads["b@h"].finish()  # 4 of 10
    clock.now += 31
    assert loads["a@h"].requests_in_window == 0 and loads["c@h"].tokens_in_window == 0
    assert loads["b@h"].requests_in_window == 1
    assert chooser.pick("g", loads).id in {"a@h", "c@h"}  # type: ignore[union-attr]
    # A limit set while running (an adapted "auto" limit) counts instead of the list's.
    for _ in range(15):
        loads["a@h"].start()  # a: 15 of 100 = 0.15
    loads["c@h"].start()
    loads["c@h"].finish(tokens=50)  # c: 50 of 1000 tpm = 0.05; b: 1 of 10 = 0.1
    assert chooser.pick("g", loads).id == "c@h"  # type: ignore[union-attr]
    loads["a@h"].rpm = 1000.0  # a: 15 of 1000 = 0.015
    assert chooser.pick("g", loads).id == "a@h"  # type: ignore[union-attr]


def test_usage_based_measures_one_without_limits_against_the_largest_rpm():
    clock = FakeClock(1000.0)
    listed = deployments(("g", "a", {"rpm": 100}), ("g", "n", {}))
    loads = loads_of(listed, clock)
    for name, sent in (("a@h", 10), ("n@h", 5)):
        for _ in range(sent):
            loads[name].start()
    chooser = router(listed, "usage-based")
    assert chooser.pick("g", loads).id == "n@h"  # type: ignore[union-attr]  # 5/100 < 10/100
    for _ in range(10):
        loads["n@h"].start()
    assert chooser.pick("g", loads).id == "a@h"  # type: ignore[union-attr]  # 15/100 > 10/100


def test_usage_based_counts_requests_sent_not_only_answered():
    clock = FakeClock(1000.0)
    listed = deployments(("g", "a", {"rpm": 60}), ("g", "b", {"rpm": 60}))
    loads = loads_of(listed, clock)
    chooser = router(listed, "usage-based")
    picks = []
    for _ in range(10):
        d = chooser.pick("g", loads)
        assert d is not None
        loads[d.id].start()  # none has finished yet
        picks.append(d.id)
    assert Counter(picks) == {"a@h": 5, "b@h": 5}


# --------------------------------------------------------------------------- availability


def test_open_breakers_are_skipped():
    listed = deployments(("g", "a", {}), ("g", "b", {}), ("g", "c", {}))
    is_open = {"a@h", "c@h"}
    for strategy in ("simple-shuffle", "least-busy", "latency-based", "usage-based"):
        chooser = router(listed, strategy, is_open=lambda d: d.id in is_open)
        assert {chooser.pick("g", {}).id for _ in range(30)} == {"b@h"}  # type: ignore[union-attr]


def test_order_keeps_to_the_lowest_available_order():
    listed = deployments(
        ("g", "spare", {}),
        ("g", "second", {"order": 2}),
        ("g", "first-a", {"order": 1}),
        ("g", "first-b", {"order": 1}),
    )
    down: set[str] = set()
    chooser = router(listed, "simple-shuffle", is_open=lambda d: d.id in down)
    assert ids_of([chooser.pick("g", {}) for _ in range(100)]).keys() == {"first-a@h", "first-b@h"}
    down |= {"first-a@h", "first-b@h"}
    assert chooser.pick("g", {}).id == "second@h"  # type: ignore[union-attr]
    down.add("second@h")  # without an order: after every one with an order
    assert chooser.pick("g", {}).id == "spare@h"  # type: ignore[union-attr]
    down.discard("first-b@h")
    assert chooser.pick("g", {}).id == "first-b@h"  # type: ignore[union-attr]


def test_a_deployment_with_free_slots_is_preferred_to_a_full_one():
    clock = FakeClock(1000.0)
    listed = deployments(
        ("g", "small", {"max_parallel_requests": 2, "weight": 100}), ("g", "big", {"weight": 1})
    )
    loads = loads_of(listed, clock)
    chooser = router(listed, "simple-shuffle")
    loads["small@h"].start()
    loads["small@h"].start()  # full
    assert {chooser.pick("g", loads).id for _ in range(30)} == {"big@h"}  # type: ignore[union-attr]
    only_small = deployments(("g", "small", {"max_parallel_requests": 1}))
    loads = loads_of(only_small, clock)
    loads["small@h"].start()
    # Full is busy, not broken: the request still goes there and queues for its slot.
    assert router(only_small, "least-busy").pick("g", loads).id == "small@h"  # type: ignore[union-attr]


def test_fallback_groups_are_tried_in_order_when_a_group_has_none_available():
    listed = deployments(
        ("main", "m1", {}), ("main", "m2", {}), ("second", "s", {}), ("third", "t", {})
    )
    down: set[str] = set()
    chooser = router(
        listed,
        "least-busy",
        is_open=lambda d: d.id in down,
        fallbacks=[{"main": ["second", "third"]}],
    )
    assert chooser.pick("main", {}).group == "main"  # type: ignore[union-attr]
    down.add("m1@h")
    assert chooser.pick("main", {}).id == "m2@h"  # type: ignore[union-attr]
    down.add("m2@h")
    assert chooser.pick("main", {}).id == "s@h"  # type: ignore[union-attr]
    down.add("s@h")
    assert chooser.pick("main", {}).id == "t@h"  # type: ignore[union-attr]
    down.add("t@h")
    assert chooser.pick("main", {}) is None  # the caller waits for a breaker to let a probe go
    # A fallback group's own fallbacks are not followed, as in litellm.
    down = {"s@h"}
    assert chooser.pick("second", {}) is None


def test_fallbacks_from_the_file_are_used_when_the_run_gives_none():
    listed = deployments(("a", "x", {}), ("b", "y", {}), fallbacks=[{"a": ["b"]}])
    chooser = Router(listed, is_open=lambda d: d.group == "a", rng=random.Random(0))
    assert chooser.pick("a", {}).id == "y@h"  # type: ignore[union-attr]
    assert "simple-shuffle" in repr(chooser)


def test_an_unknown_group_is_a_config_error():
    listed = deployments(("gpt", "a", {}))
    with pytest.raises(ConfigError, match=r"model= names 'gtp'.*did you mean 'gpt'"):
        router(listed, "least-busy").pick("gtp", {})


# --------------------------------------------------------------------------- load


def test_a_load_counts_in_flight_and_refuses_a_finish_without_a_start():
    clock = FakeClock(1000.0)
    load = DeploymentLoad(clock=clock, window_s=10)
    load.start()
    load.start()
    load.finish(latency_s=1.0, tokens=5)
    load.finish(latency_s=None, tokens=3)  # a failure: no latency sample
    assert (load.in_flight, load.latency_s) == (0, 1.0)
    assert (load.requests_in_window, load.tokens_in_window) == (2, 8)
    with pytest.raises(RuntimeError, match="finish\\(\\) without a start\\(\\)"):
        load.finish()
    clock.now += 10
    assert (load.requests_in_window, load.tokens_in_window) == (0, 0)
    assert "in_flight=0" in repr(load)
