"""RetryPolicy: what is retried, and how long it waits."""

from __future__ import annotations

import pytest

from nbllm import (
    AuthenticationError,
    ConfigError,
    RateLimitError,
    RequestRejected,
    RetryPolicy,
    ServerError,
)


def test_only_retryable_errors_are_retried_and_only_so_often():
    policy = RetryPolicy(retries=2)
    assert policy.attempts == 3
    assert policy.should_retry(ServerError("HTTP 500"), attempt=1)
    assert policy.should_retry(ServerError("HTTP 500"), attempt=2)
    assert not policy.should_retry(ServerError("HTTP 500"), attempt=3)
    assert not policy.should_retry(RequestRejected("HTTP 400"), attempt=1)
    # A refused or missing key stays refused: sending again only repeats the refusal.
    assert not policy.should_retry(AuthenticationError("HTTP 401", status=401), attempt=1)
    assert not policy.should_retry(AuthenticationError("no API key: Missing credentials"), 1)


def test_backoff_grows_exponentially_with_jitter_and_a_ceiling():
    policy = RetryPolicy(initial=1.0, multiplier=2.0, maximum=5.0)
    error = ServerError("HTTP 503")
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (9, 5.0)]:
        waits = [policy.delay(error, attempt) for _ in range(200)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits)
        assert len(set(waits)) > 100  # jittered, so clients do not retry in lockstep


def test_retry_after_is_a_floor_for_the_wait():
    policy = RetryPolicy(initial=0.1)
    assert policy.delay(RateLimitError("HTTP 429", retry_after=7.0), attempt=1) == 7.0


def test_no_backoff_for_tests():
    assert RetryPolicy(initial=0).delay(ServerError("HTTP 500"), attempt=3) == 0


def test_a_custom_rule_decides_what_is_retried():
    policy = RetryPolicy(retry_on=lambda e: e.status == 400)
    assert policy.should_retry(RequestRejected("HTTP 400", status=400), attempt=1)
    assert not policy.should_retry(ServerError("HTTP 500", status=500), attempt=1)


@pytest.mark.parametrize(
    "options",
    [{"retries": -1}, {"retries": 1.5}, {"retries": True}, {"initial": -1}, {"multiplier": 0.5}],
)
def test_bad_policies_are_refused(options):
    with pytest.raises(ConfigError):
        RetryPolicy(**options)


def test_one_policy_class_below_the_executor():
    import nbllm.executor
    import nbllm.retry

    assert nbllm.retry.RetryPolicy is nbllm.executor.RetryPolicy is RetryPolicy
