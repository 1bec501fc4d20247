"""Stopping keeps every answer that arrived: a first stop lets requests in flight finish,
a second (or the grace running out) cancels them; a run that cannot connect stops at once."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time

import pytest
from helpers import on_fake_clock

from nbllm import ChatRequest, Conversation, FakeEngine, RetryPolicy, ServerError
from nbllm.errors import ConnectionFailed, RequestTimeout
from nbllm.executor import Executor, RequestSent, RunFinished
from nbllm.executor.events import Event, StopRequested
from nbllm.executor.unreachable import unreachable_reason


def conversations(n: int, turns: int = 3) -> list[Conversation]:
    return [
        Conversation(id=f"c{i}", questions=tuple(f"c{i} q{k}" for k in range(turns)))
        for i in range(n)
    ]


def answer_of(request: ChatRequest) -> str:
    return "answer to " + request.messages[-1]["content"]


def not_run(result) -> int:
    return int(result.df["error"].str.startswith("not run").sum())


@on_fake_clock
async def test_a_first_stop_lets_the_requests_in_flight_finish_and_keeps_their_answers():
    executor: Executor
    events: list[Event] = []

    async def handler(request: ChatRequest) -> str:
        await asyncio.sleep(1.0)
        if request.messages[-1]["content"] == "c0 q1":
            executor.stop()
        return answer_of(request)

    executor = Executor(FakeEngine(handler), model="m", concurrency=4, listeners=[events.append])
    result = await executor.run(conversations(8))
    sent = sum(isinstance(e, RequestSent) for e in events)
    assert result.interrupted
    # Every request sent was answered and kept: 4 first turns, the other 4 conversations'
    # first turns (more turns left: they go first), then the 4 second turns in flight
    # when the stop came.
    assert sent == result.summary.turns_ok == 12
    assert not_run(result) == 24 - 12
    (stop,) = [e for e in events if isinstance(e, StopRequested)]
    assert stop.grace_s == 10.0 and stop.in_flight == 4
    assert isinstance(events[-1], RunFinished) and events[-1].interrupted


@on_fake_clock
async def test_a_second_stop_cancels_the_requests_in_flight():
    executor: Executor
    loop = asyncio.get_running_loop()

    async def handler(request: ChatRequest) -> str:
        if request.messages[-1]["content"].endswith("q1"):
            if request.messages[-1]["content"] == "c0 q1":
                executor.stop()
                loop.call_later(0.5, executor.stop)
            await asyncio.sleep(60)
        return answer_of(request)

    executor = Executor(FakeEngine(handler), model="m", concurrency=4)
    t0 = loop.time()
    result = await executor.run(conversations(4))
    assert loop.time() - t0 < 1
    assert result.interrupted and result.summary.turns_ok == 4  # the first turns
    assert set(result.df[result.df["error"].isna()]["turn"]) == {0}


@on_fake_clock
async def test_the_grace_running_out_cancels_the_requests_in_flight():
    executor: Executor
    loop = asyncio.get_running_loop()

    async def handler(request: ChatRequest) -> str:
        if request.messages[-1]["content"] == "c0 q0":
            executor.stop()
            return answer_of(request)
        await asyncio.sleep(60)
        return answer_of(request)

    executor = Executor(FakeEngine(handler), model="m", concurrency=4, stop_grace_s=2.5)
    t0 = loop.time()
    result = await executor.run(conversations(4))
    assert loop.time() - t0 == pytest.approx(2.5)
    assert result.interrupted and result.summary.turns_ok == 1


@on_fake_clock
async def test_an_answer_that_arrives_as_the_cancel_comes_is_kept():
    """The answer is in before the worker that asked for it resumes; a cancel then must
    not drop it (the server has answered: it would be asked again on the next run)."""
    executor: Executor
    recorded: list[str] = []

    async def handler(request: ChatRequest) -> str:
        await asyncio.sleep(1.0)
        executor.stop()
        executor.stop()  # both are handled on the loop before the worker resumes
        return answer_of(request)

    def listener(event: Event) -> None:
        if isinstance(event, RequestSent):
            recorded.append(str(event.conversation_id))

    executor = Executor(FakeEngine(handler), model="m", concurrency=3, listeners=[listener])
    result = await executor.run(conversations(3))
    assert len(recorded) == 3
    assert result.summary.turns_ok == 3


@on_fake_clock
async def test_a_stop_ends_waits_for_a_retry_or_a_slot_at_once():
    executor: Executor
    loop = asyncio.get_running_loop()

    async def handler(request: ChatRequest) -> str:
        if request.messages[-1]["content"] == "c0 q0":
            loop.call_later(0.1, executor.stop)
            raise ServerError("HTTP 500: busy", status=500)
        await asyncio.sleep(0.5)
        return answer_of(request)

    slow_retries = RetryPolicy(retries=5, initial=30.0)
    executor = Executor(FakeEngine(handler), model="m", concurrency=2, retry=slow_retries)
    t0 = loop.time()
    result = await executor.run(conversations(6))
    assert loop.time() - t0 < 1  # neither the 30 s backoff nor the queue waited out
    assert result.interrupted
    assert result.df.loc[0, "error"].startswith("not run")  # its retry never went
    assert result.summary.turns_ok == 2  # the two in flight beside it (c0's slot was freed)


@on_fake_clock
async def test_a_stop_before_the_run_sends_nothing():
    engine = FakeEngine(answer_of)
    executor = Executor(engine, model="m")
    executor.stop()
    result = await executor.run(conversations(3))
    assert engine.calls == 0 and result.interrupted and not_run(result) == 9
    again = await executor.run(conversations(3))  # a stop is for one run only
    assert again.summary.turns_ok == 9 and not again.interrupted


def refused() -> ConnectionFailed:
    error = ConnectionFailed("connection to http://127.0.0.1:9/v1 failed")
    error.__cause__ = ConnectionRefusedError(111, "Connect call failed")
    return error


@on_fake_clock
async def test_a_run_that_cannot_connect_stops_at_once_with_its_reason():
    loop = asyncio.get_running_loop()
    events: list[Event] = []

    def handler(request: ChatRequest) -> str:
        raise refused()

    engine = FakeEngine(handler)
    engine.api_base = "http://user:secret@127.0.0.1:9/v1"  # type: ignore[attr-defined]
    t0 = loop.time()
    result = await Executor(engine, model="m", concurrency=2, listeners=[events.append]).run(
        conversations(5)
    )
    assert loop.time() - t0 < 5  # not the half minute of five retries
    reason = "cannot reach http://127.0.0.1:9/v1: connection refused"
    assert result.stop_reason == reason
    assert not result.interrupted
    assert (result.df["error"] == f"not run: {reason}").all()
    # The third failure ends it; the other slot's attempt had already gone beside it.
    assert engine.calls == 4
    assert isinstance(events[-1], RunFinished) and events[-1].stop_reason == reason
    assert events[-1].turns_failed == 0


@on_fake_clock
async def test_a_server_that_answered_once_is_retried_as_usual():
    answered = False

    def handler(request: ChatRequest) -> str:
        nonlocal answered
        if not answered:
            answered = True
            return answer_of(request)
        raise refused()

    fast = RetryPolicy(retries=2, initial=0.1)
    result = await Executor(FakeEngine(handler), model="m", concurrency=1, retry=fast).run(
        conversations(3, turns=1)
    )
    assert result.stop_reason is None
    assert result.summary.turns_ok == 1
    assert result.df["error"].str.startswith("ConnectionFailed").sum() == 2


def chained(outer: Exception, inner: BaseException) -> Exception:
    outer.__cause__ = inner
    return outer


REFUSED = ConnectionRefusedError(111, "refused")
NO_HOST = socket.gaierror(-2, "Name or service not known")
BAD_CERT = ssl.SSLCertVerificationError()


class BareSSLError(ssl.SSLError):
    """As aiohttp's: an SSLError without its fields, wrapping the one that has them."""

    def __init__(self, inner: ssl.SSLError | None = None) -> None:
        Exception.__init__(self, "TLS failed")
        self.__cause__ = inner


WRONG_VERSION = ssl.SSLError(1, "wrong version number")
WRONG_VERSION.reason = "WRONG_VERSION_NUMBER"
BARE_WRONG_VERSION = BareSSLError(WRONG_VERSION)
TLS = "TLS handshake failed"
WRAPPED = chained(RuntimeError("wrapped"), REFUSED)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (chained(ConnectionFailed("x"), REFUSED), "connection refused"),
        (chained(ConnectionFailed("x"), NO_HOST), "host name not found"),
        (chained(ConnectionFailed("x"), BAD_CERT), "TLS certificate not trusted"),
        # litellm says a connection error with an HTTP 500; the OSError is in the chain
        (chained(ServerError("HTTP 500"), WRAPPED), "connection refused"),
        (ConnectionFailed("Cannot connect to h:1 [Connect call failed]"), "connection refused"),
        (chained(ConnectionFailed("x"), BARE_WRONG_VERSION), f"{TLS} (WRONG_VERSION_NUMBER)"),
        (chained(ConnectionFailed("x"), BareSSLError()), TLS),
        (ConnectionFailed("connection reset by peer"), None),
        (ServerError("HTTP 500: Connection error."), None),
        (RequestTimeout("no answer"), None),
    ],
)  # fmt: skip
def test_what_counts_as_unreachable(error, reason):
    assert unreachable_reason(error) == reason


def test_a_stop_from_another_thread_reaches_the_run():
    import threading

    started = threading.Event()

    async def handler(request: ChatRequest) -> str:
        started.set()
        await asyncio.sleep(0.2)
        return answer_of(request)

    executor = Executor(FakeEngine(handler), model="m", concurrency=2)
    threading.Thread(target=lambda: started.wait(10) and executor.stop(), daemon=True).start()
    t0 = time.perf_counter()
    result = asyncio.run(executor.run(conversations(10)))
    assert time.perf_counter() - t0 < 5
    assert result.interrupted and result.summary.turns_ok == 2
