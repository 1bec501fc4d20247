"""Prometheus metrics: /metrics scraped over HTTP while a run goes and after it, against the
test server; the counters must equal the result's rows."""

from __future__ import annotations

import socket
import sys
import time
import urllib.request
from typing import Any

import pytest

import nbllm
from nbllm import metrics
from nbllm.errors import ConfigError
from nbllm.executor.events import TurnFinished
from nbllm.executor.stats import RunStats
from nbllm.retry import RetryPolicy
from nbllm.testing import TestServer

FAST = {"checkpoint": False, "cache": False, "progress": False}
QUICK_RETRIES = RetryPolicy(retries=6, initial=0.01, maximum=0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on /metrics, by (name, sorted labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def of_run(samples: dict[Any, float], name: str, run: str, **labels: str) -> float:
    """The sum of ``name``'s samples of ``run`` whose labels include ``labels``."""
    return sum(
        value
        for (n, got), value in samples.items()
        if n == name
        and dict(got).get("run") == run
        and all(dict(got).get(k) == v for k, v in labels.items())
    )


def runs_on(samples: dict[Any, float]) -> set[str]:
    return {dict(labels)["run"] for (_, labels) in samples if "run" in dict(labels)}


@pytest.fixture
def port():
    port = free_port()
    yield port
    exporter = metrics._exporters.get(("127.0.0.1", port))
    if exporter is not None:
        exporter.close()


def data(n: int = 12, turns: int = 3) -> list[dict[str, object]]:
    return [{"id": i, "turns": [f"q{i}.{k}" for k in range(turns)]} for i in range(n)]


def test_metrics_during_and_after_a_run_equal_the_rows(port):
    during: list[dict[Any, float]] = []

    def look(event: object) -> None:
        if isinstance(event, TurnFinished) and not during:
            during.append(scrape(port))  # the endpoint answers while the run goes

    server = TestServer(latency=0.01, faults={"server_error": 0.15}, seed=4, prompt_cache=True)
    with server:
        result = nbllm.run(
            data(),
            model="m",
            api_base=server.url,
            metrics_port=port,
            retries=QUICK_RETRIES,
            listeners=[look],
            **FAST,
        )
        sent = len(server.requests)
        deployment = "m@" + server.url.split("//")[1].split("/")[0]
    after = scrape(port)
    (run,) = runs_on(after)
    assert during and run in runs_on(during[0])
    df = result.df
    ok = df["error"].isna()
    assert of_run(after, "nbllm_turns_total", run, status="ok") == ok.sum()
    assert (
        of_run(after, "nbllm_turns_total", run, status="failed")
        == ((~ok) & ~df["error"].str.startswith("skipped").fillna(False)).sum()
    )
    assert of_run(after, "nbllm_turns_total", run, status="cached") == 0
    # Every request the server saw is one attempt, and one observation of the histogram.
    assert of_run(after, "nbllm_requests_total", run) == sent
    assert of_run(after, "nbllm_request_duration_seconds_count", run) == sent
    errors = of_run(after, "nbllm_requests_total", run, outcome="error")
    assert errors == sent - ok.sum() and errors > 0
    assert of_run(after, "nbllm_retries_total", run, reason="ServerError") == errors
    assert of_run(after, "nbllm_tokens_total", run, kind="prompt") == df["prompt_tokens"].sum()
    assert of_run(after, "nbllm_tokens_total", run, kind="completion") == (
        df["completion_tokens"].sum()
    )
    cached = of_run(after, "nbllm_tokens_total", run, kind="cached")
    assert cached == df["cached_tokens"].sum() > 0
    assert of_run(after, "nbllm_queue_wait_seconds_count", run) == len(df)
    assert of_run(after, "nbllm_requests_in_flight", run) == 0
    labels = {dict(k[1]).get("deployment") for k in after if k[0] == "nbllm_requests_total"}
    assert labels == {deployment}


def test_prompt_cached_tokens_reach_the_rows_the_summary_and_metrics_alike(port):
    """A run over HTTP against the test server's prompt cache: a conversation's first turn
    has nothing cached, each later one the tokens of the messages an earlier request began
    with, as the server counts them; the summary, the live view and /metrics add them up
    alike."""
    stats = RunStats()
    with TestServer(prompt_cache=True) as server:
        options = {"metrics_port": port, "listeners": [stats], **FAST}
        result = nbllm.run(data(6, 3), model="m", api_base=server.url, **options)
    after = scrape(port)
    (run,) = runs_on(after)
    df = result.df
    assert df["error"].isna().all()
    assert (df.loc[df["turn"] == 0, "cached_tokens"] == 0).all()
    assert (df.loc[df["turn"] > 0, "cached_tokens"] > 0).all()
    for _, rows in df.groupby("conversation_id"):
        questions, answers = list(rows["question"]), list(rows["answer"])
        for k in range(1, len(rows)):
            # Turn k-1's request: the questions up to k-1 and the answers before it.
            chars = sum(map(len, questions[:k])) + sum(map(len, answers[: k - 1]))
            assert rows["cached_tokens"].iloc[k] == max(1, chars // 4)
    total = df["cached_tokens"].sum()
    summary = result.summary
    assert summary.cached_tokens == total
    assert summary.cached_tokens_share == pytest.approx(total / df["prompt_tokens"].sum())
    assert "cached_tokens_share" in str(summary)
    snap = stats.snapshot()
    assert (snap.cached_tokens, snap.cached_tokens_share) == (total, summary.cached_tokens_share)
    assert of_run(after, "nbllm_tokens_total", run, kind="cached") == total


def test_two_runs_share_the_endpoint_and_a_finished_run_drops_out(port, monkeypatch):
    monkeypatch.setattr(metrics, "FINISHED_RUN_GRACE_S", 0.5)
    with TestServer() as server:
        options = {"model": "m", "api_base": server.url, "metrics_port": port, **FAST}
        nbllm.run(data(2, 1), **options)
        nbllm.run(data(3, 1), **options)
        both = scrape(port)
    first, second = sorted(runs_on(both), key=lambda r: int(r.split("-")[1]))
    assert of_run(both, "nbllm_turns_total", first, status="ok") == 2
    assert of_run(both, "nbllm_turns_total", second, status="ok") == 3
    deadline = time.monotonic() + 5
    while runs_on(scrape(port)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert runs_on(scrape(port)) == set()


def test_cached_and_resumed_rows_count_as_such(port, tmp_path):
    with TestServer() as server:
        options = {"model": "m", "api_base": server.url, "metrics_port": port, "progress": False}
        nbllm.run(data(2, 2), checkpoint=tmp_path / "c.sqlite", cache=False, **options)
        nbllm.run(data(2, 2), checkpoint=tmp_path / "c.sqlite", cache=False, **options)
        nbllm.run(data(2, 2), checkpoint=False, cache=tmp_path / "cache.sqlite", **options)
        nbllm.run(data(2, 2), checkpoint=False, cache=tmp_path / "cache.sqlite", **options)
        samples = scrape(port)
    counts = sorted(
        (
            of_run(samples, "nbllm_turns_total", run, status="ok"),
            of_run(samples, "nbllm_turns_total", run, status="resumed"),
            of_run(samples, "nbllm_turns_total", run, status="cached"),
        )
        for run in runs_on(samples)
    )
    assert counts == [(0, 0, 4), (0, 4, 0), (4, 0, 0), (4, 0, 0)]


def test_a_port_in_use_is_refused_naming_it_before_any_request(port):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        with TestServer() as server:
            with pytest.raises(ConfigError, match=f"metrics_port={port}"):
                nbllm.run(data(1, 1), model="m", api_base=server.url, metrics_port=port, **FAST)
            assert len(server.requests) == 0


def test_without_prometheus_client_a_port_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ConfigError, match=r"nbllm\[metrics\]"):
        nbllm.run(
            data(1, 1), engine=nbllm.FakeEngine(), model="m", metrics_port=free_port(), **FAST
        )


def test_the_port_may_come_from_the_environment(port, monkeypatch):
    monkeypatch.setenv("NBLLM_METRICS_PORT", str(port))
    nbllm.run(data(2, 1), engine=nbllm.FakeEngine(), model="m", **FAST)
    assert len(runs_on(scrape(port))) == 1
    monkeypatch.setenv("NBLLM_METRICS_PORT", "not-a-port")
    with pytest.raises(ConfigError, match="NBLLM_METRICS_PORT"):
        nbllm.run(data(1, 1), engine=nbllm.FakeEngine(), model="m", **FAST)
