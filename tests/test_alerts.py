"""Threshold alerts: each rule fires once per cooldown, on a server made slow or failing,
and reaches the listeners, the logger, on_alert and the summary."""

from __future__ import annotations

import logging
from typing import Any

import pytest

import nbllm
from nbllm import alerts
from nbllm.alerts import AlertRules, AlertWatcher, alert_rules
from nbllm.errors import ConfigError
from nbllm.executor.events import Alert, AttemptFinished, RunStarted, TurnFinished
from nbllm.retry import RetryPolicy
from nbllm.testing import TestServer
from nbllm.types import ChatRequest, ChatResponse, TurnRecord

FAST = {"checkpoint": False, "cache": False, "progress": False}
QUICK = RetryPolicy(retries=8, initial=0.01, maximum=0.02)


def data(n: int, turns: int = 1) -> list[dict[str, object]]:
    return [{"id": i, "turns": [f"q{i}.{k}" for k in range(turns)]} for i in range(n)]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def attempt(outcome: str = "ok", latency: float = 0.1) -> AttemptFinished:
    error = None if outcome == "ok" else "ServerError"
    return AttemptFinished("c", 0, 1, "m", "m", outcome, error, latency, 0.0, 0.0)


def answered(cost: float | None = None) -> TurnFinished:
    return TurnFinished(TurnRecord("c", 0, "q", answer="a", cost_usd=cost), 0, 0.0)


# --------------------------------------------------------------------------- the rules


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"error_rat": 0.1}, r"no rule 'error_rat' \(did you mean 'error_rate'\?\)"),
        ({"error_rate": "high"}, "expected a number > 0"),
        ({"latency_p95_s": 0}, "expected a number > 0"),
        ("loud", "expected a dict"),
    ],
)
def test_bad_rules_are_refused_before_any_request(given, message):
    engine = nbllm.FakeEngine()
    with pytest.raises(ConfigError, match=message):
        nbllm.run(data(1), engine=engine, model="m", alerts=given, **FAST)
    assert engine.calls == 0


def test_defaults_apply_where_not_named_and_false_turns_rules_off():
    rules = alert_rules({"error_rate": 0.5, "gpu_memory": False, "window_s": 10})
    assert rules is not None
    assert rules.thresholds["error_rate"] == 0.5 and "gpu_memory" not in rules.thresholds
    assert rules.thresholds["latency_p95_s"] == alerts.DEFAULTS["latency_p95_s"]
    assert rules.window_s == 10 and rules.cooldown_s == alerts.SETTINGS["cooldown_s"]
    assert alert_rules(False) is None
    assert alert_rules(None) == AlertRules(dict(alerts.DEFAULTS))


def test_a_rule_fires_once_per_cooldown_not_in_a_storm():
    clock = Clock()
    watcher = AlertWatcher(AlertRules({"error_rate": 0.2}, window_s=10, cooldown_s=30), clock=clock)
    watcher(RunStarted(1, 1, "m", "fake", 0.0))
    for i in range(200):  # 100 s of attempts, half of them failing
        clock.now = i * 0.5
        watcher(attempt("error" if i % 2 else "ok"))
    times = [a.t for a in watcher.fired]
    assert [a.rule for a in watcher.fired] == ["error_rate"] * 4  # at 10 s, 40 s, 70 s, 100 s
    assert len(times) == 4


def test_throughput_falling_by_half_fires():
    clock = Clock()
    rules = AlertRules({"throughput_drop": 0.5}, window_s=10, cooldown_s=300)
    watcher = AlertWatcher(rules, clock=clock)
    for i in range(100):  # 10 answers a second for 10 s
        clock.now = i * 0.1
        watcher(answered())
        watcher(attempt())
    assert watcher.fired == []
    for i in range(30):  # then 2 a second
        clock.now = 10 + i * 0.5
        watcher(answered())
        watcher(attempt())
    assert [a.rule for a in watcher.fired] == ["throughput_drop"]
    assert watcher.fired[0].value < 0.5


def test_gpu_memory_over_the_threshold_fires(monkeypatch):
    class Memory:
        used, total = 97, 100

    class Nvml:
        @staticmethod
        def nvmlDeviceGetMemoryInfo(handle: Any) -> Memory:
            return Memory()

    class Devices:
        nvml = Nvml

        def __iter__(self) -> Any:
            return iter([type("D", (), {"index": 0, "handle": None})()])

        def __enter__(self) -> Devices:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    monkeypatch.setattr(alerts, "open_nvml", Devices)
    watcher = AlertWatcher(AlertRules({"gpu_memory": 0.95}), clock=Clock())
    watcher(attempt())
    (fired,) = watcher.fired
    assert fired.rule == "gpu_memory" and "GPU 0 memory is 97% full" in fired.message


# --------------------------------------------------------------------------- runs


def test_a_failing_server_raises_one_error_alert_everywhere(caplog):
    seen: list[Alert] = []
    heard: list[Any] = []
    with (
        TestServer(faults={"server_error": 0.5}, seed=2) as server,
        caplog.at_level(logging.WARNING, logger="nbllm"),
    ):
        result = nbllm.run(
            data(60),
            model="m",
            api_base=server.url,
            retries=QUICK,
            alerts={"error_rate": 0.2},
            on_alert=seen.append,
            listeners=[lambda e: heard.append(e) if isinstance(e, Alert) else None],
            **FAST,
        )
    assert [a.rule for a in result.alerts] == ["error_rate"]
    assert seen == list(result.alerts) == heard
    assert result.summary.alerts == (result.alerts[0].message,)
    assert "attempts failed" in result.alerts[0].message
    assert sum("nbllm alert" in r.getMessage() for r in caplog.records) == 1
    assert "alerts" in str(result.summary) and result.alerts[0].message in str(result.summary)


def test_a_slow_server_raises_a_latency_alert():
    with TestServer(latency=0.15) as server:
        result = nbllm.run(
            data(30), model="m", api_base=server.url, alerts={"latency_p95_s": 0.1}, **FAST
        )
    assert [a.rule for a in result.alerts] == ["latency_p95_s"]
    assert result.alerts[0].value >= 0.15


def test_429s_raise_a_rate_limited_alert():
    with TestServer(rpm=10, window_s=0.5, retry_after=0.05) as server:
        result = nbllm.run(
            data(40),
            model="m",
            api_base=server.url,
            retries=RetryPolicy(retries=30, initial=0.01, maximum=0.05),
            alerts={"rate_limited_rate": 0.1},
            **FAST,
        )
    assert result.summary.turns_ok == 40
    assert [a.rule for a in result.alerts] == ["rate_limited_rate"]


def test_spending_past_a_share_of_the_cap_raises_an_alert():
    def priced(request: ChatRequest) -> ChatResponse:
        return ChatResponse("a", "m", 1, 1, cost_usd=0.1)

    result = nbllm.run(
        data(20),
        engine=nbllm.FakeEngine(priced),
        model="m",
        max_cost_usd=1.0,
        concurrency=1,
        alerts={"spend_share": 0.5},
        **FAST,
    )
    (fired,) = [a for a in result.alerts if a.rule == "spend_share"]
    assert 0.5 < fired.value <= 0.7 and "of max_cost_usd" in fired.message


def test_no_alerts_with_alerts_false():
    with TestServer(latency=0.15) as server:
        result = nbllm.run(data(25), model="m", api_base=server.url, alerts=False, **FAST)
    assert result.alerts == () and result.summary.alerts == ()
