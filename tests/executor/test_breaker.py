"""CircuitBreaker: opens on deployment failures only, probes once after the cooldown,
never stays wedged half-open. A fake clock (a number the test moves) stands in for time.
"""

from __future__ import annotations

import pytest

from nbllm.errors import (
    AuthenticationError,
    ConfigError,
    ConnectionFailed,
    EngineError,
    RateLimitError,
    RequestRejected,
    RequestTimeout,
    ServerError,
)
from nbllm.executor.breaker import BreakerState, CircuitBreaker

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(**options) -> tuple[CircuitBreaker, Clock, list[tuple[BreakerState, BreakerState]]]:
    clock = Clock()
    changes: list[tuple[BreakerState, BreakerState]] = []
    options.setdefault("allowed_fails", 3)
    options.setdefault("cooldown_s", 5.0)
    breaker = CircuitBreaker(
        clock=clock, on_change=lambda old, new: changes.append((old, new)), **options
    )
    return breaker, clock, changes


def down() -> ServerError:
    return ServerError("HTTP 503", status=503)


def test_allowed_fails_consecutive_failures_open_it_and_it_then_refuses():
    breaker, clock, changes = make()
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure(down())
    assert breaker.state is CLOSED
    assert breaker.allow()
    breaker.record_failure(down())
    assert breaker.state is OPEN
    assert breaker.trips == 1
    assert changes == [(CLOSED, OPEN)]
    assert not breaker.allow()
    assert breaker.retry_in() == pytest.approx(5.0)
    clock.now += 3.0
    assert not breaker.allow()
    assert breaker.retry_in() == pytest.approx(2.0)


def test_a_success_resets_the_count():
    breaker, _, _ = make()
    for _ in range(10):
        breaker.record_failure(down())
        breaker.record_failure(down())
        breaker.record_success()  # one request in three fails: the deployment stays in use
    assert breaker.state is CLOSED
    assert breaker.trips == 0


def test_after_the_cooldown_exactly_one_probe_goes_and_its_success_closes():
    breaker, clock, changes = make(allowed_fails=1)
    breaker.record_failure(ConnectionFailed("refused"))
    clock.now += 5.0
    assert breaker.retry_in() == 0.0
    assert breaker.allow()  # the probe
    assert breaker.state is HALF_OPEN
    assert [breaker.allow() for _ in range(5)] == [False] * 5  # nobody else meanwhile
    breaker.record_success()
    assert breaker.state is CLOSED
    assert all(breaker.allow() for _ in range(5))
    assert changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]


def test_a_failed_probe_opens_it_for_another_cooldown():
    breaker, clock, changes = make(allowed_fails=2)
    breaker.record_failure(RequestTimeout("no answer"))
    breaker.record_failure(RequestTimeout("no answer"))
    clock.now += 5.0
    assert breaker.allow()
    breaker.record_failure(RequestTimeout("no answer"))  # one failure is enough half-open
    assert breaker.state is OPEN
    assert breaker.trips == 2
    assert not breaker.allow()
    assert breaker.retry_in() == pytest.approx(5.0)  # counted from the probe's failure
    clock.now += 5.0
    assert breaker.allow()
    assert changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN), (OPEN, HALF_OPEN)]


def test_a_released_probe_lets_the_next_one_go():
    breaker, clock, _ = make(allowed_fails=1)
    breaker.record_failure(down())
    clock.now += 5.0
    assert breaker.allow()
    breaker.release_probe()  # the probe's turn was cancelled
    assert breaker.state is HALF_OPEN
    assert breaker.retry_in() == 0.0
    assert breaker.allow()
    assert not breaker.allow()


def test_a_probe_that_never_reports_back_times_out():
    breaker, clock, _ = make(allowed_fails=1, probe_timeout_s=30.0)
    breaker.record_failure(down())
    clock.now += 5.0
    assert breaker.allow()
    clock.now += 29.0
    assert not breaker.allow()
    assert breaker.retry_in() == pytest.approx(1.0)
    clock.now += 1.0
    assert breaker.allow()  # the lost probe no longer holds the deployment
    assert not breaker.allow()


def test_a_late_success_while_open_does_not_close_it():
    breaker, _, _ = make(allowed_fails=1)
    breaker.record_failure(down())
    breaker.record_success()  # a request sent before it opened, answered late
    assert breaker.state is OPEN
    assert not breaker.allow()


@pytest.mark.parametrize(
    "error",
    [
        ServerError("HTTP 500", status=500),
        ServerError("HTTP 408", status=408),
        RequestTimeout("no answer within 30 s"),
        ConnectionFailed("connection reset"),
        AuthenticationError("HTTP 401", status=401),
        AuthenticationError("HTTP 403", status=403),
        EngineError("the engine failed"),
        TimeoutError(),
        ConnectionResetError(),
    ],
)
def test_deployment_failures_count(error):
    breaker, _, _ = make(allowed_fails=1)
    assert breaker.counts(error)
    breaker.record_failure(error)
    assert breaker.state is OPEN


@pytest.mark.parametrize(
    "error",
    [
        RateLimitError("HTTP 429", status=429, retry_after=1.0),
        RequestRejected("HTTP 400", status=400),
        RequestRejected("HTTP 404", status=404),
        RequestRejected("HTTP 413", status=413),
        RequestRejected("HTTP 422", status=422),
        EngineError("HTTP 418", status=418),
        ValueError("a bug, not the deployment"),
    ],
)
def test_the_requests_own_faults_and_429s_do_not_count(error):
    breaker, _, _ = make(allowed_fails=1)
    assert not breaker.counts(error)
    for _ in range(5):
        breaker.record_failure(error)
    assert breaker.state is CLOSED


def test_a_neutral_failure_neither_resets_the_count_nor_wedges_a_probe():
    breaker, clock, _ = make(allowed_fails=2)
    breaker.record_failure(down())
    breaker.record_failure(RequestRejected("HTTP 400", status=400))
    breaker.record_failure(down())
    assert breaker.state is OPEN  # the 400 in between did not reset the count
    clock.now += 5.0
    assert breaker.allow()
    breaker.record_failure(RateLimitError("HTTP 429", status=429))  # alive but busy
    assert breaker.state is HALF_OPEN
    assert breaker.allow()  # another probe may go


def test_a_listener_that_raises_leaves_a_consistent_breaker():
    def listener(old, new):
        raise RuntimeError("dashboard broke")

    clock = Clock()
    breaker = CircuitBreaker(allowed_fails=1, clock=clock, on_change=listener)
    with pytest.raises(RuntimeError):
        breaker.record_failure(down())
    assert breaker.state is OPEN
    assert breaker.trips == 1


def test_defaults_are_litellms():
    breaker = CircuitBreaker()
    assert (breaker.allowed_fails, breaker.cooldown_s) == (3, 5.0)
    assert repr(breaker) == "CircuitBreaker(state=closed, failures=0/3, trips=0)"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"allowed_fails": 0}, "allowed_fails= expected a whole number >= 1, got 0"),
        ({"allowed_fails": 2.5}, "allowed_fails= expected a whole number >= 1, got 2.5"),
        ({"allowed_fails": True}, "allowed_fails= expected a whole number >= 1, got True"),
        ({"cooldown_s": -1}, "cooldown_s= expected a number of seconds > 0, got -1"),
        ({"cooldown_s": float("nan")}, "cooldown_s= expected a number of seconds > 0, got nan"),
        ({"probe_timeout_s": 0}, "probe_timeout_s= expected a number of seconds > 0, got 0"),
    ],
)
def test_bad_options_are_refused_naming_the_option(options, message):
    with pytest.raises(ConfigError) as caught:
        CircuitBreaker(**options)
    assert str(caught.value) == message


def test_available_answers_like_allow_without_claiming_the_probe():
    breaker, clock, changes = make(allowed_fails=1)
    assert breaker.available()
    breaker.record_failure(down())
    assert not breaker.available()
    clock.now += 5.0
    # A router may ask of every candidate, as often as it likes: nothing is claimed.
    assert all(breaker.available() for _ in range(3))
    assert breaker.state is OPEN
    assert breaker.allow()  # the one picked claims the probe
    assert not breaker.available()
    assert not breaker.allow()
    breaker.release_probe()
    assert breaker.available()
    assert changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN)]
