"""The API engines over real HTTP, against nbllm's OpenAI-compatible test server on loopback."""

from __future__ import annotations

import collections
import http.server
import threading

import pytest
from helpers import run_executor

import nbllm
from nbllm import RetryPolicy
from nbllm.engines import FakeEngine, LiteLLMEngine, OpenAIEngine, create_engine
from nbllm.testing import Fault, TestServer
from nbllm.types import ChatResponse

FAST = RetryPolicy(retries=4, initial=0.0)
ENGINES = [
    pytest.param({"model": "nbllm-test"}, "openai", id="openai"),
    pytest.param({"model": "openai/nbllm-test", "engine": "litellm"}, "litellm", id="litellm"),
]


def dataset(n: int = 12) -> list[dict]:
    return [
        {
            "id": f"c{i}",
            "turns": [f"conversation {i}, question {k}" for k in range(1 + i % 4)],
            "context": "Revenue 2023: 120; 2024: 150.",
        }
        for i in range(n)
    ]


def n_turns(data: list[dict]) -> int:
    return sum(len(r["turns"]) for r in data)


@pytest.mark.parametrize(("options", "engine"), ENGINES)
def test_multi_turn_history_is_exactly_what_the_server_answered(options, engine):
    data = dataset()
    with TestServer() as server:
        result = nbllm.run(data, api_base=server.url, progress=False, **options)
    assert server.history_errors == 0
    assert result.summary.turns_ok == n_turns(data)
    assert set(result.df["engine"]) == {engine}
    assert result.df["answer"].str.startswith("Answer to turn").all()
    assert (result.df["prompt_tokens"] > 0).all()
    # One request per turn, and the deepest turn carried every earlier answer.
    assert len(server.requests) == n_turns(data)
    assert max(r.n_messages for r in server.requests) == 1 + 2 * 3 + 1


@pytest.mark.parametrize(("options", "engine"), ENGINES)
def test_injected_faults_end_as_retried_successes(options, engine):
    data = dataset(8)
    faults = {Fault.SERVER_ERROR: 1, Fault.UNAVAILABLE: 1, Fault.DROP: 1, Fault.HANG: 1}
    with TestServer(faults=faults, fault_first=1, hang_s=5, retry_after=0.01) as server:
        result = nbllm.run(
            data, api_base=server.url, retries=FAST, timeout=0.5, progress=False, **options
        )
    assert result.summary.turns_ok == n_turns(data), result.df["error"].dropna().tolist()
    assert (result.df["attempts"] == 2).all()
    assert result.summary.retries == n_turns(data)
    statuses = collections.Counter(r.status for r in server.requests)
    assert statuses[200] == n_turns(data)
    assert statuses[500] and statuses[503] and statuses[0]  # 0: a dropped connection


def test_random_faults_never_lose_a_row():
    data = dataset(30)
    faults = {Fault.SERVER_ERROR: 0.15, Fault.UNAVAILABLE: 0.1, Fault.DROP: 0.1, Fault.HANG: 0.05}
    with TestServer(faults=faults, hang_s=5, retry_after=0.01, seed=3) as server:
        result = nbllm.run(
            data, model="nbllm-test", api_base=server.url, timeout=0.3,
            retries=RetryPolicy(retries=1, initial=0.0), progress=False,
        )  # fmt: skip
    assert len(result.df) == n_turns(data)
    ok = result.df["error"].isna()
    assert result.df.loc[ok, "answer"].notna().all()
    assert result.df.loc[~ok, "answer"].isna().all()
    assert 0 < ok.sum() < len(ok)  # some succeeded, some ran out of retries
    # A request the client gave up on may never have reached the server's log.
    assert result.df["attempts"].sum() >= len(server.requests)


@pytest.mark.parametrize(("options", "engine"), ENGINES)
def test_429_with_retry_after_is_retried_and_counted(options, engine):
    data = dataset(6)
    with TestServer(rpm=4, window_s=0.5, retry_after=0.2) as server:
        result = nbllm.run(
            data, api_base=server.url, concurrency=8,
            retries=RetryPolicy(retries=10, initial=0.01), progress=False, **options,
        )  # fmt: skip
    rejected = sum(1 for r in server.requests if r.status == 429)
    assert rejected > 0
    assert result.summary.turns_ok == n_turns(data)
    assert result.summary.retries == rejected
    assert result.df["attempts"].sum() == len(server.requests)


@pytest.mark.parametrize(("options", "engine"), ENGINES)
def test_rpm_limit_is_never_exceeded_on_the_server(options, engine, short_minute):
    if engine == "litellm":
        # litellm's first call in a process sets itself up for about half a second after
        # the limiter let it go, so the first sends would reach the server late and share a
        # 2-second window with the next ones: not the limiter's doing, and gone once warm.
        with TestServer() as warm_up:
            run_executor(dataset(1), api_base=warm_up.url, **options)
    data = dataset(12)  # 30 turns against 12 per "minute" of 2 s
    # The server counts arrivals, the limiter sends: on a busy machine one send can reach
    # the server a few tens of milliseconds after the next. The server's window is 0.15 s
    # shorter to absorb that (the exact rule is tested on a fake clock in test_executor.py).
    with TestServer(rpm=12, window_s=short_minute - 0.15) as server:
        result = run_executor(
            data, api_base=server.url, rpm=12, concurrency=16, rate_window_s=short_minute,
            **options,
        )  # fmt: skip
    assert [r.status for r in server.requests if r.status != 200] == []
    assert result.summary.turns_ok == n_turns(data)
    # The budget is used, not wasted: 30 requests at 12 per 2 s need a little over 3 s.
    assert result.summary.wall_s < 6.5


@pytest.mark.parametrize(("options", "engine"), ENGINES)
def test_bad_credentials_are_not_retried_and_never_echoed(options, engine):
    with TestServer(api_key="sk-right-key") as server:
        bad = nbllm.run(
            dataset(2), api_base=server.url, api_key="sk-sentinel-wrong-key", retries=FAST,
            progress=False, **options,
        )  # fmt: skip
        good = nbllm.run(
            dataset(2), api_base=server.url, api_key="sk-right-key", progress=False, **options
        )
    assert bad.summary.turns_ok == 0
    assert bad.df["attempts"].iloc[0] == 1
    assert bad.df["error"].iloc[0].startswith("AuthenticationError")
    assert "sk-sentinel-wrong-key" not in bad.df.to_csv()
    assert "sk-sentinel-wrong-key" not in repr(bad)
    assert good.summary.turns_ok == good.summary.turns


@pytest.mark.parametrize(("options", "engine"), ENGINES)
def test_every_row_says_why_its_answer_ended(options, engine):
    """The provider's finish_reason reaches the df; the summary counts the cut answers."""
    data = [
        {"id": "short", "turns": ["hi"]},
        {"id": "long", "turns": ["a question whose answer is far longer than ten tokens"]},
    ]
    with TestServer() as server:
        result = nbllm.run(data, api_base=server.url, max_tokens=10, progress=False, **options)
    assert server.history_errors == 0
    assert result.df["finish_reason"].tolist() == ["stop", "length"]
    assert result.df["completion_tokens"].iloc[1] == 10
    assert result.summary.truncated == 1
    assert result.verdict.startswith("2/2 turns ok (1 cut short by max_tokens) in ")


async def test_the_fake_engine_cuts_an_answer_as_the_test_server_does():
    messages = [{"role": "user", "content": "a question whose answer runs past max_tokens"}]
    answer = f"You asked: {messages[0]['content']}"

    def same(request):
        return answer

    fake = FakeEngine(same)
    with TestServer() as server:
        async with OpenAIEngine(server.url) as client:
            served = await client.complete(nbllm.ChatRequest("m", messages, {"max_tokens": 4}))
    cut = await fake.complete(nbllm.ChatRequest("m", messages, {"max_tokens": 4}))
    assert (cut.text, cut.completion_tokens, cut.finish_reason) == (answer[:16], 4, "length")
    assert (served.completion_tokens, served.finish_reason) == (4, "length")
    assert len(served.text) == len(cut.text) == 16
    whole = await fake.complete(nbllm.ChatRequest("m", messages, {"max_tokens": 100}))
    assert (whole.text, whole.finish_reason) == (answer, "stop")
    # A handler's own ChatResponse is the answer as it is; one that says no reason stops.
    said = ChatResponse("x", "m", finish_reason="content_filter")
    assert (await FakeEngine(lambda r: said).complete(nbllm.ChatRequest("m", messages))) is said
    silent = await FakeEngine(lambda r: ChatResponse("x", "m")).complete(
        nbllm.ChatRequest("m", messages)
    )
    assert silent.finish_reason == "stop"


def test_a_request_the_server_refuses_is_not_retried():
    with TestServer() as server:
        result = nbllm.run(
            dataset(1), model="nbllm-test", api_base=server.url, retries=FAST, progress=False,
            stream=True,  # the test server refuses streaming with a 400
        )  # fmt: skip
    assert result.df["error"].iloc[0].startswith("RequestRejected: HTTP 400")
    assert len(server.requests) == 1


def test_a_server_that_is_not_there_is_a_connection_error():
    with TestServer() as server:
        url = server.url
    result = nbllm.run(
        dataset(1), model="nbllm-test", api_base=url, retries=RetryPolicy(1, initial=0),
        progress=False,
    )  # fmt: skip
    assert result.df["error"].iloc[0].startswith("ConnectionFailed")
    assert result.df["attempts"].iloc[0] == 2


@pytest.mark.parametrize(
    ("model", "api_base", "expected"),
    [
        ("nbllm-test", "http://127.0.0.1:9/v1", OpenAIEngine),
        ("openai/gpt-4o-mini", "http://127.0.0.1:9/v1", OpenAIEngine),
        ("meta-llama/Llama-3.1-8B-Instruct", "http://127.0.0.1:9/v1", OpenAIEngine),
        ("anthropic/claude-3-5-haiku", "http://127.0.0.1:9/v1", LiteLLMEngine),
        ("openai/gpt-4o-mini", None, LiteLLMEngine),
    ],
)
async def test_auto_picks_the_lean_client_for_openai_compatible_servers(model, api_base, expected):
    engine = create_engine("auto", model=model, api_base=api_base)
    try:
        assert type(engine) is expected
    finally:
        await engine.aclose()


async def test_a_closed_engine_says_so():
    engine = OpenAIEngine("http://127.0.0.1:9/v1")
    await engine.aclose()
    with pytest.raises(nbllm.EngineError, match="closed"):
        await engine.complete(nbllm.ChatRequest("m", [{"role": "user", "content": "hi"}]))


class _Redirector(http.server.BaseHTTPRequestHandler):
    """Answers every POST with a 307 to ``server.location``, counting what it got."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.posts += 1  # type: ignore[attr-defined]
        self.send_response(307)
        self.send_header("Location", self.server.location)  # type: ignore[attr-defined]
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("relative", [False, True], ids=["other-port", "same-origin"])
def test_a_redirect_is_an_error_that_is_not_followed_nor_retried(relative):
    with TestServer() as recorder:
        redirector = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Redirector)
        redirector.posts = 0  # type: ignore[attr-defined]
        secret = "/v1/chat/completions?token=sk-redirect-secret"
        origin = f"http://127.0.0.1:{recorder.port}"
        redirector.location = secret if relative else origin + secret  # type: ignore[attr-defined]
        thread = threading.Thread(target=redirector.serve_forever, daemon=True)
        thread.start()
        try:
            base = f"http://127.0.0.1:{redirector.server_address[1]}/v1"
            result = nbllm.run(
                [{"id": "a", "turns": ["Revenue in 2019?"]}],
                model="nbllm-test",
                engine="openai",
                api_base=base,
                api_key="sk-sent-key",
                retries=FAST,
                progress=False,
                cache=False,
            )
        finally:
            redirector.shutdown()
            redirector.server_close()
            thread.join()
    (error,) = result.df["error"]
    expected = f"http://127.0.0.1:{redirector.server_address[1]}" if relative else origin
    assert "HTTP 307" in error
    assert f"redirected to {expected};" in error
    assert "token" not in error and "/chat" not in error and "sk-" not in error
    assert redirector.posts == 1  # type: ignore[attr-defined]
    assert recorder.requests == []


@pytest.mark.parametrize(
    "engine",
    [
        pytest.param(lambda url: OpenAIEngine(url), id="openai"),
        pytest.param(lambda url: LiteLLMEngine(api_base=url), id="litellm"),
    ],
)
async def test_both_api_engines_pass_on_the_providers_rate_limit_headers(engine):
    """What rpm="auto" reads to take a provider's limit at once, through either engine."""
    from nbllm.types import ChatRequest

    async with TestServer(rpm=50, window_s=5) as server:
        client = engine(server.url)
        try:
            request = ChatRequest("openai/nbllm-test", [{"role": "user", "content": "hi"}])
            response = await client.complete(request)
        finally:
            await client.aclose()
    assert response.rate_limits is not None
    assert response.rate_limits["x-ratelimit-limit-requests"] == "50"
    assert response.rate_limits["x-ratelimit-remaining-requests"] == "49"
