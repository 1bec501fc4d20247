"""Tests for nbllm.testing: the local OpenAI-compatible server the rest of the suite relies on.

Every test talks to the server over real HTTP and stops the server it started.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from nbllm.engines import OpenAIEngine
from nbllm.errors import ConfigError
from nbllm.testing import (
    URL_LINE_PREFIX,
    Fault,
    RequestLogEntry,
    TestServer,
    messages_key,
    read_log,
    start_subprocess,
)
from nbllm.testing.__main__ import build_parser
from nbllm.testing.launcher import _cli_args
from nbllm.types import ChatRequest

USER1 = [{"role": "user", "content": "What is 2 + 2?"}]


def post_sync(
    url: str, body: Any, headers: dict[str, str] | None = None, timeout: float = 5.0
) -> tuple[int, dict[str, str], Any]:
    """POST JSON with urllib (no event loop needed); returns status, headers, parsed body."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(
        url + "/chat/completions",
        data=data,
        headers={"Content-Type": "application/json", **(headers or {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), json.loads(err.read())


async def post(
    session: aiohttp.ClientSession, url: str, messages: list[dict[str, str]], **headers: str
) -> tuple[int, Any, Any]:
    async with session.post(
        url + "/chat/completions", json={"model": "m", "messages": messages}, headers=headers
    ) as resp:
        return resp.status, resp.headers, await resp.json()


def max_in_window(times: list[float], window_s: float) -> int:
    """The most events any half-open window (t - window_s, t] holds."""
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - window_s:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


# --------------------------------------------------------------------------- answering


async def test_answers_openai_shaped_json_over_http() -> None:
    async with TestServer() as server, aiohttp.ClientSession() as session:
        status, _, body = await post(session, server.url, USER1, **{"X-Conversation-Id": "c1"})
        assert status == 200
        key = messages_key(USER1)
        answer = f"Answer to turn 0: What is 2 + 2? [{key[:8]}]"
        assert body["object"] == "chat.completion"
        assert body["id"].startswith("chatcmpl-")
        assert body["model"] == "m"
        assert isinstance(body["created"], int)
        assert body["choices"] == [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer},
                "finish_reason": "stop",
            }
        ]
        usage = body["usage"]
        assert usage["prompt_tokens"] == max(1, len("What is 2 + 2?") // 4)
        assert usage["completion_tokens"] == len(answer) // 4
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

        [entry] = server.requests
        assert entry == RequestLogEntry(entry.t, "c1", key, 200, 1, 0)
        assert server.accepted_times == [entry.t]

        async with session.get(server.url + "/models") as resp:
            assert (await resp.json())["data"][0]["id"] == "nbllm-test"
        async with session.get(server.url.removesuffix("/v1") + "/health") as resp:
            assert resp.status == 200
            assert await resp.json() == {"status": "ok"}


async def test_openai_client_parses_the_response() -> None:
    async with (
        TestServer() as server,
        openai.AsyncOpenAI(base_url=server.url, api_key="x", max_retries=0) as client,
    ):
        completion = await client.chat.completions.create(model="gpt-test", messages=USER1)  # type: ignore[arg-type]
        assert completion.model == "gpt-test"
        assert completion.choices[0].message.content.startswith("Answer to turn 0: ")  # type: ignore[union-attr]
        assert completion.choices[0].finish_reason == "stop"
        assert completion.usage is not None and completion.usage.total_tokens > 0


async def test_max_tokens_cuts_the_answer_and_says_length() -> None:
    """As a real model: an answer longer than max_tokens is cut there, finish_reason "length"."""
    async with TestServer() as server, OpenAIEngine(server.url) as client:
        whole = await client.complete(ChatRequest("m", USER1))
        fits = await client.complete(ChatRequest("m", USER1, {"max_tokens": 100}))
        cut = await client.complete(ChatRequest("m", USER1, {"max_completion_tokens": 3}))
    assert whole.finish_reason == fits.finish_reason == "stop"
    assert fits.text == whole.text
    assert cut.finish_reason == "length"
    assert cut.text == whole.text[:12]
    assert cut.completion_tokens == 3


async def test_prompt_cache_says_the_tokens_of_the_longest_start_answered_before() -> None:
    first = [{"role": "user", "content": "What is 2 + 2? Think it through."}]  # 32 characters
    async with TestServer(prompt_cache=True) as server, OpenAIEngine(server.url) as client:
        turn_0 = await client.complete(ChatRequest("m", first))
        history = [*first, {"role": "assistant", "content": turn_0.text}]
        turn_1 = await client.complete(
            ChatRequest("m", [*history, {"role": "user", "content": "And 3 + 3?"}])
        )
        again = await client.complete(ChatRequest("m", first))
        other = await client.complete(ChatRequest("m", [{"role": "user", "content": "Hi"}]))
    assert turn_0.cached_tokens == 0  # nothing asked before
    assert turn_1.cached_tokens == len(first[0]["content"]) // 4 == 8  # turn 0's question
    assert again.cached_tokens == again.prompt_tokens == 8  # all of it, asked before
    assert other.cached_tokens == 0

    async with TestServer() as server, OpenAIEngine(server.url) as client:
        assert (await client.complete(ChatRequest("m", first))).cached_tokens is None
        assert (await client.complete(ChatRequest("m", first))).cached_tokens is None  # off


def test_invalid_requests_get_openai_shaped_400() -> None:
    with TestServer() as server:
        bad_bodies: list[Any] = [
            b"not json",
            [1, 2],
            {"model": "m"},
            {"model": "m", "messages": []},
            {"model": "m", "messages": [{"role": "user"}]},
            {"model": "m", "messages": [{"role": "user", "content": 3}]},
            {"model": "m", "messages": USER1, "stream": True},
            {"model": "m", "messages": USER1, "max_tokens": 0},
            {"model": "m", "messages": USER1, "max_tokens": "5"},
        ]
        messages = []
        for body in bad_bodies:
            status, _, error = post_sync(server.url, body)
            assert status == 400, body
            assert error["error"]["type"] == "invalid_request_error"
            assert error["error"]["code"] is None
            messages.append(error["error"]["message"])
        assert all(messages)
        assert "stream" in messages[-3].lower()
        assert "'max_tokens' must be a whole number >= 1, got '5'" in messages[-1]
        assert server.stats()["by_status"] == {400: len(bad_bodies)}
        assert server.history_errors == 0


# --------------------------------------------------------------------------- history


async def test_history_check_accepts_real_answers_and_rejects_made_up_ones() -> None:
    async with TestServer() as server, aiohttp.ClientSession() as session:
        _, _, first = await post(session, server.url, USER1)
        answer = first["choices"][0]["message"]["content"]
        turn2 = [
            {"role": "system", "content": "Be brief."},
            *USER1,
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "And 3 + 3?"},
        ]
        # The system message changes the prefix: this first answer is for a different history.
        status, _, error = await post(session, server.url, turn2)
        assert status == 400
        assert error["error"]["message"] == "history mismatch at message 2"
        assert server.history_errors == 1

        good = [*USER1, {"role": "assistant", "content": answer}, turn2[-1]]
        status, _, second = await post(session, server.url, good)
        assert status == 200
        content = second["choices"][0]["message"]["content"]
        assert content.startswith("Answer to turn 1: And 3 + 3? [")
        assert server.requests[-1].turn == 1 and server.requests[-1].n_messages == 3

        made_up = [*USER1, {"role": "assistant", "content": "4"}, turn2[-1]]
        status, _, error = await post(session, server.url, made_up)
        assert status == 400
        assert error["error"]["message"] == "history mismatch at message 1"
        assert server.history_errors == 2
        assert server.stats()["history_errors"] == 2


def test_messages_key_ignores_extra_message_fields() -> None:
    plain: list[dict[str, Any]] = [
        {"role": "user", "content": "héllo"},
        {"role": "assistant", "content": "x"},
    ]
    echoed = [plain[0], {"role": "assistant", "content": "x", "refusal": None}]
    assert messages_key(plain) == messages_key(echoed)
    assert messages_key(plain) != messages_key(plain[:1])
    assert len(messages_key(plain)) == 64


# --------------------------------------------------------------------------- rate limit


async def test_rpm_sliding_window_gives_429_then_recovers() -> None:
    async with (
        TestServer(rpm=5, window_s=1.0, retry_after=1.0) as server,
        aiohttp.ClientSession() as session,
    ):
        results = [await post(session, server.url, USER1) for _ in range(6)]
        assert [status for status, _, _ in results] == [200] * 5 + [429]
        ok_headers = results[0][1]
        assert ok_headers["x-ratelimit-limit-requests"] == "5"
        assert ok_headers["x-ratelimit-remaining-requests"] == "4"
        status, headers, error = results[-1]
        assert headers["Retry-After"] == "1"
        assert headers["retry-after-ms"] == "1000"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert error["error"]["type"] == "rate_limit_error"

        await asyncio.sleep(1.05)
        status, _, _ = await post(session, server.url, USER1)
        assert status == 200
        assert len(server.accepted_times) == 6
        assert max_in_window(server.accepted_times, 1.0) <= 5


async def test_rpm_is_never_exceeded_under_concurrency() -> None:
    async with (
        TestServer(rpm=10, window_s=0.5, latency=(0.0, 0.02)) as server,
        aiohttp.ClientSession() as session,
    ):
        deadline = time.monotonic() + 1.2

        async def worker() -> None:
            while time.monotonic() < deadline:
                status, _, _ = await post(session, server.url, USER1)
                if status == 429:
                    await asyncio.sleep(0.01)

        await asyncio.gather(*(worker() for _ in range(8)))
        assert len(server.accepted_times) >= 20
        assert max_in_window(server.accepted_times, 0.5) <= 10
        assert server.max_in_flight > 1


def test_sub_second_retry_after_is_sent_as_a_float() -> None:
    with TestServer(rpm=1, retry_after=0.25) as server:
        assert post_sync(server.url, {"messages": USER1})[0] == 200
        status, headers, _ = post_sync(server.url, {"messages": USER1})
        assert status == 429
        assert headers["Retry-After"] == "0.25"
        assert headers["retry-after-ms"] == "250"


# --------------------------------------------------------------------------- faults


async def test_drop_fault_closes_the_connection_without_a_response() -> None:
    async with (
        TestServer(faults={Fault.DROP: 1.0}) as server,
        aiohttp.ClientSession() as session,
    ):
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await post(session, server.url, USER1)
        assert [e.status for e in server.requests] == [0]
        assert server.accepted_times == []


async def test_hang_fault_is_cut_short_by_stop() -> None:
    server = TestServer(faults={Fault.HANG: 1.0}, hang_s=30.0)
    await asyncio.to_thread(server.start)
    try:
        async with aiohttp.ClientSession() as session:
            pending = asyncio.ensure_future(post(session, server.url, USER1))
            for _ in range(200):  # wait until the request is being held
                if server.stats()["in_flight"] == 1:
                    break
                await asyncio.sleep(0.01)
            assert server.stats()["in_flight"] == 1
            t0 = time.monotonic()
            await asyncio.to_thread(server.stop)
            assert time.monotonic() - t0 < 2.0
            with pytest.raises(aiohttp.ClientConnectionError):
                await pending
    finally:
        server.stop()
    assert [e.status for e in server.requests] == [-1]


async def test_short_hang_then_answers_normally() -> None:
    async with (
        TestServer(faults={"hang": 1.0}, hang_s=0.2) as server,
        aiohttp.ClientSession() as session,
    ):
        t0 = time.monotonic()
        status, _, _ = await post(session, server.url, USER1)
        assert status == 200
        assert time.monotonic() - t0 >= 0.2


def test_server_error_and_unavailable_faults() -> None:
    with TestServer(faults={Fault.SERVER_ERROR: 1.0}) as server:
        status, _, error = post_sync(server.url, {"messages": USER1})
        assert status == 500
        assert error["error"]["type"] == "server_error"
    with TestServer(faults={Fault.UNAVAILABLE: 1.0}, retry_after=2.5) as server:
        status, headers, _ = post_sync(server.url, {"messages": USER1})
        assert status == 503
        assert headers["Retry-After"] == "3"
        assert headers["retry-after-ms"] == "2500"
        assert server.stats()["by_status"] == {503: 1}


def test_random_faults_follow_the_seed() -> None:
    def statuses(seed: int) -> list[int]:
        faults = {Fault.SERVER_ERROR: 0.3, Fault.UNAVAILABLE: 0.2}
        with TestServer(faults=faults, seed=seed) as server:
            return [post_sync(server.url, {"messages": USER1})[0] for _ in range(40)]

    first = statuses(1)
    assert first == statuses(1)
    assert {200, 500, 503} <= set(first)


def test_fault_first_fails_only_the_first_attempt() -> None:
    with TestServer(faults={Fault.SERVER_ERROR: 1.0}, fault_first=1) as server:
        other = [{"role": "user", "content": "another question"}]
        assert post_sync(server.url, {"messages": USER1})[0] == 500
        assert post_sync(server.url, {"messages": USER1})[0] == 200
        assert post_sync(server.url, {"messages": USER1})[0] == 200
        assert post_sync(server.url, {"messages": other})[0] == 500
        assert post_sync(server.url, {"messages": other})[0] == 200
        server.reset()
        assert server.requests == [] and server.accepted_times == []
        assert post_sync(server.url, {"messages": USER1})[0] == 500


def test_fault_first_rotates_through_the_configured_kinds() -> None:
    faults = {Fault.SERVER_ERROR: 1.0, Fault.UNAVAILABLE: 1.0}
    with TestServer(faults=faults, fault_first=2) as server:
        seen = [post_sync(server.url, {"messages": USER1})[0] for _ in range(3)]
        assert sorted(seen[:2]) == [500, 503]
        assert seen[2] == 200


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"faults": {Fault.DROP: 0.7, Fault.HANG: 0.7}}, "faults must be .* add up to at most 1"),
        ({"faults": {"explode": 0.1}}, "unknown fault 'explode'"),
        ({"faults": {"drop": "often"}}, "faults\\['drop'\\] must be a number, got 'often'"),
        ({"faults": {"drop": 1.5}}, "faults\\['drop'\\] must be a probability in \\[0, 1\\]"),
        ({"rpm": 0}, "rpm must be >= 1 or None, got 0"),
        ({"latency": -1.0}, "latency must be >= 0, got -1.0"),
        ({"latency": (0.2, 0.1)}, "latency must be a range with 0 <= low <= high"),
        ({"window_s": 0}, "window_s must be > 0, got 0"),
        ({"fault_first": -1}, "fault_first must be >= 0"),
        ({"hang_s": -1}, "hang_s must be >= 0, got -1"),
        ({"retry_after": "soon"}, "retry_after must be a number, got 'soon'"),
    ],
)
def test_invalid_options_are_refused_naming_the_option(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        TestServer(**options)


# --------------------------------------------------------------------------- auth


def test_api_key_is_required_when_set() -> None:
    with TestServer(api_key="sekret") as server:
        status, _, error = post_sync(server.url, {"messages": USER1})
        assert status == 401
        assert error["error"]["type"] == "invalid_request_error"
        wrong = {"Authorization": "Bearer nope"}
        assert post_sync(server.url, {"messages": USER1}, wrong)[0] == 401
        right = {"Authorization": "Bearer sekret"}
        assert post_sync(server.url, {"messages": USER1}, right)[0] == 200
        assert [e.status for e in server.requests] == [401, 401, 200]


# --------------------------------------------------------------------------- lifecycle


def test_stop_is_idempotent_and_releases_the_port() -> None:
    server = TestServer().start()
    assert server.start() is server  # already running: no second server
    port = server.port
    assert post_sync(server.url, {"messages": USER1})[0] == 200
    server.stop()
    server.stop()
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), 1):
        pass
    with TestServer(port=port) as again:
        assert again.port == port
        assert post_sync(again.url, {"messages": USER1})[0] == 200
    with pytest.raises(RuntimeError, match="not running"):
        _ = server.url


def test_start_fails_clearly_when_the_port_is_taken() -> None:
    with TestServer() as server, pytest.raises(OSError):
        TestServer(port=server.port).start()


async def test_latency_overlaps_across_concurrent_requests() -> None:
    async with (
        TestServer(latency=0.2) as server,
        aiohttp.ClientSession() as session,
    ):
        t0 = time.monotonic()
        convs = [[{"role": "user", "content": f"q{i}"}] for i in range(10)]
        results = await asyncio.gather(*(post(session, server.url, c) for c in convs))
        elapsed = time.monotonic() - t0
        assert all(status == 200 for status, _, _ in results)
        assert 0.2 <= elapsed < 1.5
        assert server.max_in_flight == 10


# --------------------------------------------------------------------------- subprocess / CLI


def test_cli_arguments_round_trip() -> None:
    args = _cli_args(
        {
            "latency": (0.1, 0.2),
            "rpm": 10,
            "window_s": 2.0,
            "faults": {Fault.DROP: 0.1, "unavailable": 0.2},
            "fault_first": 1,
            "api_key": "k",
            "log_path": Path("x.jsonl"),
            "prompt_cache": True,
        }
    )
    parsed = build_parser().parse_args(args)
    assert parsed.prompt_cache and not build_parser().parse_args([]).prompt_cache
    assert parsed.latency == (0.1, 0.2)
    assert parsed.rpm == 10 and parsed.window_s == 2.0 and parsed.fault_first == 1
    assert parsed.fault_rate == [(Fault.DROP, 0.1), (Fault.UNAVAILABLE, 0.2)]
    assert parsed.api_key == "k" and parsed.log == "x.jsonl"
    with pytest.raises(TypeError, match="unexpected option"):
        _cli_args({"latencyy": 1})


def test_start_subprocess_serves_and_logs(tmp_path: Path) -> None:
    log = tmp_path / "requests.jsonl"
    server = start_subprocess(log_path=log, api_key="k")
    try:
        assert server.url.startswith("http://127.0.0.1:") and server.url.endswith("/v1")
        auth = {"Authorization": "Bearer k", "X-Conversation-Id": "conv-7"}
        status, _, body = post_sync(server.url, {"model": "m", "messages": USER1}, auth)
        assert status == 200
        assert body["choices"][0]["message"]["content"].startswith("Answer to turn 0")
        assert post_sync(server.url, {"messages": USER1})[0] == 401
        lines = log.read_text().splitlines()
        assert len(lines) == 2
        first = json.loads(lines[0])
        assert set(first) == {"t", "conversation", "key", "status", "n_messages", "turn"}
        entries = read_log(log)
        assert [(e.status, e.conversation) for e in entries] == [(200, "conv-7"), (401, None)]
        assert entries[0].key == messages_key(USER1)
    finally:
        code = server.stop()
    assert code == 0  # SIGTERM is a graceful stop
    assert server.process.poll() == 0
    assert server.stop() == 0  # idempotent


def test_start_subprocess_refuses_a_bad_option_before_a_child_starts() -> None:
    with pytest.raises(ConfigError, match="TestServer rpm must be >= 1 or None, got 0"):
        start_subprocess(rpm=0, timeout=0.001)  # no child could start in that time


def test_start_subprocess_reports_startup_failure() -> None:
    with TestServer() as busy, pytest.raises(RuntimeError, match="failed to start") as info:
        start_subprocess(port=busy.port)
    assert "address" in str(info.value).lower() or "errno" in str(info.value).lower()


def test_url_line_prefix_matches_the_documented_line() -> None:
    assert URL_LINE_PREFIX == "nbllm test server listening on "


def test_public_names() -> None:
    import nbllm.testing

    assert sorted(nbllm.testing.__all__) == [
        "Fault",
        "RequestLogEntry",
        "SubprocessServer",
        "TestServer",
        "URL_LINE_PREFIX",
        "messages_key",
        "read_log",
        "start_subprocess",
    ]
    for name in nbllm.testing.__all__:
        assert hasattr(nbllm.testing, name), name


def test_a_subprocess_server_stops_when_its_parent_is_killed(tmp_path: Path) -> None:
    """A killed test run or benchmark leaves no test server behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from nbllm.testing import start_subprocess; "
            "s = start_subprocess(); print(s.pid, flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    child = None
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _runs(child):
            time.sleep(0.1)
        assert not _runs(child), "the test server still runs 10 s after its parent's kill"
    finally:
        parent.kill()
        parent.wait(10)
        if parent.stdout is not None:
            parent.stdout.close()
        if child is not None and _runs(child):
            os.kill(child, signal.SIGKILL)


def _runs(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, holding nothing, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_lognormal_latency_has_its_median_and_a_long_right_tail():
    import random
    import statistics

    from nbllm.testing.options import Latency

    latency, rng = Latency(0.1, 0.8), random.Random(3)
    draws = sorted(latency.draw(rng) for _ in range(4000))
    assert statistics.median(draws) == pytest.approx(0.1, rel=0.08)
    assert draws[int(0.95 * len(draws))] > 3 * 0.1  # exp(1.645 * 0.8) = 3.7 times the median
    with pytest.raises(ConfigError, match="one number"):
        TestServer(latency=(0.1, 0.2), latency_sigma=0.5)
    with pytest.raises(ConfigError, match="latency_sigma"):
        TestServer(latency=0.1, latency_sigma=-1)
