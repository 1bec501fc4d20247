"""A server's 429 with Retry-After, end to end: from the header over real HTTP to the
moment the next requests reach the server, read from the ``TestServer``'s request log.

Promises pinned here (README, "Retries"): a request that got a 429 is sent again no
sooner than its Retry-After, and a 429 pauses every new send for that long, not only the
retry of the request that got it.
"""

from __future__ import annotations

import pytest

import nbllm
from nbllm import RetryPolicy
from nbllm.testing import TestServer

# No backoff of nbllm's own: only a Retry-After can make a retry wait.
NO_BACKOFF = RetryPolicy(retries=30, initial=0.0)
QUIET = {"progress": False, "checkpoint": False, "cache": False}
ENGINES = [
    pytest.param({"model": "nbllm-test"}, id="openai"),
    pytest.param({"model": "openai/nbllm-test", "engine": "litellm"}, id="litellm"),
]


def dataset(n: int, turns: int = 1) -> list[dict]:
    return [
        {"id": f"c{i}", "turns": [f"c{i} question {k}" for k in range(turns)]} for i in range(n)
    ]


@pytest.mark.parametrize("options", ENGINES)
def test_a_429_is_sent_again_no_sooner_than_its_retry_after(options):
    retry_after = 0.4
    data = dataset(6, turns=2)
    with TestServer(rpm=3, window_s=0.3, retry_after=retry_after) as server:
        result = nbllm.run(
            data, api_base=server.url, concurrency=4, retries=NO_BACKOFF, **QUIET, **options
        )
    log = sorted(server.requests, key=lambda entry: entry.t)
    rejected = [entry for entry in log if entry.status == 429]
    assert rejected, "the server never said 429: the test checks nothing"
    for entry in rejected:
        # The same request (same messages) comes back, no sooner than Retry-After.
        again = next(e for e in log if e.key == entry.key and e.t > entry.t)
        assert again.t - entry.t >= retry_after - 0.01, (entry, again)
    assert result.summary.turns_ok == 12, result.df["error"].dropna().tolist()
    assert server.history_errors == 0


def test_a_429_pauses_every_new_send_for_its_retry_after():
    """With 8 requests in flight, a 429 holds back all of them, not only its own retry.

    The server answers after ``latency``; requests that were already on their way when the
    429 came arrive within ``IN_FLIGHT_S`` of it, which is far less than ``latency``: so any
    request that arrives later but within Retry-After was sent during the pause.
    """
    retry_after, latency, in_flight_s = 0.6, 0.25, 0.1
    data = dataset(16)
    with TestServer(rpm=4, window_s=0.5, retry_after=retry_after, latency=latency) as server:
        result = nbllm.run(
            data, model="nbllm-test", api_base=server.url, concurrency=8, retries=NO_BACKOFF,
            **QUIET,
        )  # fmt: skip
    log = sorted(server.requests, key=lambda entry: entry.t)
    rejections = [entry.t for entry in log if entry.status == 429]
    assert rejections, "the server never said 429: the test checks nothing"
    assert server.max_in_flight > 1
    sent_in_pause = [
        (round(entry.t - t429, 3), entry.status)
        for t429 in rejections
        for entry in log
        if t429 + in_flight_s < entry.t < t429 + retry_after - 0.01
    ]
    assert sent_in_pause == []
    assert result.summary.turns_ok == 16, result.df["error"].dropna().tolist()
