"""Environment keys stay with their provider; reprs, listings and messages hide secrets.

A provider key in the environment goes only to that provider's own host: a server at any
other ``api_base`` gets ``NBLLM_API_KEY`` or no key (litellm: the placeholder ``EMPTY``),
whatever the engine and the model's prefix. A recording server on loopback keeps every
header and URL it received, so the tests check what really left the process.
"""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import warnings
from collections.abc import Iterator

import pytest
from aiohttp import web

import nbllm
from nbllm import prepare
from nbllm.api import check_run, prepare_run
from nbllm.engines import LiteLLMEngine
from nbllm.engines.keys import PLACEHOLDER_KEY, key_for_api_base, provider_key_names
from nbllm.engines.litellm import import_litellm
from nbllm.jobs import submit
from nbllm.types import ChatRequest

RECORDS = [{"id": "a", "turns": ["hi"]}]
NBLLM_KEY = "nbllm-own-server-key-4711"
# One sentinel per provider variable that litellm could pick for a model prefix.
ENV_KEYS = {
    "OPENAI_API_KEY": "sk-openai-env-sentinel-0001",
    "HOSTED_VLLM_API_KEY": "hosted-vllm-env-sentinel-0002",
    "ANTHROPIC_API_KEY": "sk-ant-env-sentinel-0003",
    "GEMINI_API_KEY": "gemini-env-sentinel-0004",
    "GOOGLE_API_KEY": "google-env-sentinel-0005",
}
PASSWORD = "pw-sentinel-9931"
FAST = {"checkpoint": False, "cache": False, "progress": False, "retries": 0}


# --------------------------------------------------------------------------- a recording server


def _completion(path: str) -> dict[str, object]:
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    if path.endswith("/chat/completions"):
        message = {"role": "assistant", "content": "ok"}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return {
            "id": "c",
            "object": "chat.completion",
            "created": 0,
            "model": "m",
            "choices": [choice],
            "usage": usage,
        }
    choice = {"index": 0, "text": "ok", "finish_reason": "stop", "logprobs": None}
    return {
        "id": "c",
        "object": "text_completion",
        "created": 0,
        "model": "m",
        "choices": [choice],
        "usage": usage,
    }


class RecordingServer:
    """Answers OpenAI chat and text completions on 127.0.0.1 (anything else: 404) and keeps
    each request's path, query and headers in ``seen``."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="nbllm-test-recorder")
        self.url = ""

    async def _handle(self, request: web.Request) -> web.Response:
        self.seen.append(json.dumps([request.path_qs, dict(request.headers)]))
        await request.read()
        if request.path.endswith(("/chat/completions", "/completions")):
            return web.json_response(_completion(request.path))
        return web.json_response({"error": {"message": "no such route"}}, status=404)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/v1"

    def __enter__(self) -> RecordingServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def received(self) -> str:
        return "\n".join(self.seen)


# litellm's text-completion route leaves an aiohttp session bound to the run's closed loop;
# the garbage collector may find it in the middle of any later test here. Its warning is
# litellm's leak, not nbllm's, and this module is about keys.
pytestmark = pytest.mark.filterwarnings(
    "ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning"
)


@pytest.fixture(autouse=True, scope="module")
def _litellm_imported():
    """litellm's import (seconds, once a process) is no test's own time."""
    import_litellm()


@pytest.fixture
def litellm_left_as_found(recorder):
    """What litellm changes of itself stays in the test that made it change.

    Its gemini route adds a "cache" success callback to litellm's global lists, after which
    every answer is logged from a thread pool that lives as long as the process; its text
    completion route keeps an aiohttp session of the run's closed loop until collected.
    """
    litellm = import_litellm()
    names = (
        "success_callback",
        "_async_success_callback",
        "failure_callback",
        "_async_failure_callback",
        "callbacks",
    )
    saved = {name: list(getattr(litellm, name)) for name in names}
    yield
    for name, value in saved.items():
        setattr(litellm, name, value)
    if '"/v1/completions' in recorder.received():  # collected here, not in a later test
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)  # litellm's session, not nbllm's
            gc.collect()


@pytest.fixture
def env_keys(monkeypatch):
    for name, value in ENV_KEYS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("NBLLM_API_KEY", raising=False)


@pytest.fixture
def recorder() -> Iterator[RecordingServer]:
    with RecordingServer() as server:
        yield server


def _assert_no_environment_key(received: str) -> None:
    assert received, "the server received nothing"
    for name, value in ENV_KEYS.items():
        assert value not in received, f"{name} reached a foreign api_base"


# --------------------------------------------------------------------------- the rule


@pytest.mark.parametrize(
    ("api_base", "variable"),
    [
        ("https://api.openai.com/v1", "OPENAI_API_KEY"),
        ("https://API.OpenAI.com:443/v1/", "OPENAI_API_KEY"),
        ("https://api.anthropic.com", "ANTHROPIC_API_KEY"),
        ("https://generativelanguage.googleapis.com/v1beta", "GEMINI_API_KEY"),
        ("https://my-resource.openai.azure.com/openai", "AZURE_API_KEY"),
        ("https://api.mistral.ai/v1", "MISTRAL_API_KEY"),
        ("https://api.groq.com/openai/v1", "GROQ_API_KEY"),
        ("https://openrouter.ai/api/v1", "OPENROUTER_API_KEY"),
        # any other host, or one only dressed up as a provider's: NBLLM_API_KEY
        ("http://api.openai.com/v1", "NBLLM_API_KEY"),  # not over https
        ("https://api.openai.com.evil.example/v1", "NBLLM_API_KEY"),
        ("https://evil.example/api.openai.com/v1", "NBLLM_API_KEY"),
        ("https://api.openai.com@evil.example/v1", "NBLLM_API_KEY"),
        ("https://evil.example\\@api.openai.com/v1", "NBLLM_API_KEY"),
        ("https://openai.azure.com.evil.example/", "NBLLM_API_KEY"),
        ("https://api.openai.com./v1", "NBLLM_API_KEY"),
        ("http://127.0.0.1:8000/v1", "NBLLM_API_KEY"),
        ("http://[::1]:8000/v1", "NBLLM_API_KEY"),
    ],
)
def test_an_environment_key_goes_only_to_its_providers_own_host(monkeypatch, api_base, variable):
    for name in (
        "OPENAI_API_KEY",
        "ANTHROPIC_API_KEY",
        "GEMINI_API_KEY",
        "AZURE_API_KEY",
        "MISTRAL_API_KEY",
        "GROQ_API_KEY",
        "OPENROUTER_API_KEY",
        "NBLLM_API_KEY",
    ):
        monkeypatch.setenv(name, f"value-of-{name}")
    assert key_for_api_base(api_base, None) == f"value-of-{variable}"


def test_an_explicit_key_wins_and_no_api_base_leaves_the_provider_to_litellm(env_keys):
    assert key_for_api_base("http://127.0.0.1:1/v1", "sk-given") == "sk-given"
    assert key_for_api_base("https://api.openai.com/v1", "sk-given") == "sk-given"
    # The provider's own host: litellm reads the provider's variable itself.
    assert key_for_api_base(None, None) is None
    # A server of one's own without NBLLM_API_KEY gets no key at all.
    assert key_for_api_base("http://127.0.0.1:1/v1", None) is None
    assert provider_key_names("http://127.0.0.1:1/v1") == ()


def test_a_providers_own_host_without_its_key_is_refused_before_any_request(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(nbllm.ConfigError) as refused:
        nbllm.run(RECORDS, model="gpt-4o-mini", api_base="https://api.openai.com/v1", **FAST)
    assert str(refused.value) == (
        "api_base='https://api.openai.com/v1' needs OPENAI_API_KEY in the environment "
        "(or pass api_key=)"
    )


def test_no_provider_key_is_demanded_for_a_server_of_ones_own(monkeypatch):
    for name in ENV_KEYS:
        monkeypatch.delenv(name, raising=False)
    for engine in ("auto", "openai", "litellm"):
        plan = prepare_run(
            RECORDS,
            nbllm.RunConfig(
                model="gpt-4o-mini",
                engine=engine,
                api_base="http://127.0.0.1:9/v1",
                checkpoint=False,
                cache=False,
            ),
        )
        plan.release()


# --------------------------------------------------------------------------- over the wire

RUNS = [
    pytest.param("gpt-4o-mini", "litellm", id="gpt-4o-mini-litellm"),
    pytest.param("text-completion-openai/x", "auto", id="text-completion-openai-auto"),
    pytest.param("hosted_vllm/x", "auto", id="hosted_vllm-auto"),
    pytest.param("hosted_vllm/x", "litellm", id="hosted_vllm-litellm"),
    pytest.param("openai/x", "openai", id="openai-openai"),
    pytest.param("openai/x", "litellm", id="openai-litellm"),
    pytest.param("x", "auto", id="no-prefix-auto"),
    pytest.param("anthropic/claude-3-5-haiku-20241022", "litellm", id="anthropic-litellm"),
    pytest.param("gemini/gemini-1.5-flash", "litellm", id="gemini-litellm"),
]
# Their servers speak another protocol: this one answers them 404, after the key has arrived.
NOT_OPENAI_SHAPED = {"anthropic/claude-3-5-haiku-20241022", "gemini/gemini-1.5-flash"}


@pytest.mark.parametrize(("model", "engine"), RUNS)
def test_no_environment_key_reaches_a_foreign_api_base(
    env_keys, recorder, litellm_left_as_found, model, engine
):
    result = nbllm.run(RECORDS, model=model, engine=engine, api_base=recorder.url, **FAST)
    _assert_no_environment_key(recorder.received())
    if model not in NOT_OPENAI_SHAPED:
        assert result.df["answer"].tolist() == ["ok"]
    if result.df["engine"][0].startswith("litellm"):  # it insists on a key: plainly none
        assert PLACEHOLDER_KEY in recorder.received()


@pytest.mark.parametrize(("model", "engine"), RUNS)
def test_nbllm_api_key_is_what_a_foreign_api_base_gets(
    env_keys, recorder, litellm_left_as_found, monkeypatch, model, engine
):
    monkeypatch.setenv("NBLLM_API_KEY", NBLLM_KEY)
    nbllm.run(RECORDS, model=model, engine=engine, api_base=recorder.url, **FAST)
    _assert_no_environment_key(recorder.received())
    assert NBLLM_KEY in recorder.received()


def test_a_server_named_in_the_parameters_gets_no_environment_key_either(
    env_keys, recorder, litellm_left_as_found
):
    # base_url= is one of litellm's own parameters, passed through as any other.
    result = nbllm.run(
        RECORDS, model="gpt-4o-mini", engine="litellm", base_url=recorder.url, **FAST
    )
    assert result.df["answer"].tolist() == ["ok"]
    _assert_no_environment_key(recorder.received())


async def test_a_litellm_engine_made_directly_keeps_environment_keys_home(
    env_keys, recorder, litellm_left_as_found
):
    async with LiteLLMEngine(api_base=recorder.url) as engine:
        answer = await engine.complete(
            ChatRequest("hosted_vllm/x", [{"role": "user", "content": "hi"}], {})
        )
        assert engine.secrets() == ()  # the placeholder is no secret
    assert answer.text == "ok"
    _assert_no_environment_key(recorder.received())
    given = LiteLLMEngine(api_base=recorder.url, api_key="sk-given-key-1234")
    assert given.secrets() == ("sk-given-key-1234",)


# --------------------------------------------------------------------------- reprs and messages

HEADER_VALUE = "Bearer sk-header-sentinel-5550"
NESTED_TOKEN = "nested-token-sentinel-5551"
PARAMS = {
    "extra_headers": {"Authorization": HEADER_VALUE, "X-Api-Key": "x-api-sentinel-5552"},
    "extra_body": {"metadata": {"auth_token": NESTED_TOKEN}, "items": [{"api-key": "li-5553"}]},
    "top_p": 0.5,
}
SECRETS = (
    HEADER_VALUE,
    "sk-header-sentinel",
    NESTED_TOKEN,
    "x-api-sentinel-5552",
    "li-5553",
    PASSWORD,
)


def _assert_hidden(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text


def test_run_config_repr_hides_headers_nested_credentials_and_url_passwords():
    config = nbllm.RunConfig(
        api_base=f"http://user:{PASSWORD}@127.0.0.1:9/v1",
        params=PARAMS,
        api_key="sk-key-sentinel-5554",
    )
    for text in (repr(config), str(config)):
        _assert_hidden(text)
        assert "sk-key-sentinel-5554" not in text
        assert "http://127.0.0.1:9/v1" in text
        assert "'top_p': 0.5" in text  # what is no secret is still shown
    assert config.params == PARAMS  # only the view hides them: the engine gets them


@pytest.mark.parametrize(
    "api_base", [f"ftp://user:{PASSWORD}@host/v1", f"user:{PASSWORD}@host", f"//user:{PASSWORD}@h"]
)
def test_a_refused_api_base_never_echoes_its_password(api_base):
    with pytest.raises(nbllm.ConfigError) as refused:
        nbllm.RunConfig(api_base=api_base)
    assert str(refused.value).startswith("api_base= expected an http(s) URL")
    assert PASSWORD not in str(refused.value)


def test_a_refused_params_never_echoes_a_credential():
    with pytest.raises(nbllm.ConfigError) as refused:
        nbllm.RunConfig(params=[("extra_headers", {"Authorization": HEADER_VALUE})])
    assert str(refused.value).startswith("params= expected a dict, got [['extra_headers'")
    _assert_hidden(str(refused.value))
    with pytest.raises(nbllm.ConfigError) as refused:
        nbllm.RunConfig(concurrency=0, params=PARAMS)
    _assert_hidden(str(refused.value))


def test_prepared_and_checked_runs_are_short_and_hide_secrets():
    many = [{"id": i, "turns": [f"question {i}"]} for i in range(500)]
    config = nbllm.RunConfig(
        model="m",
        engine="openai",
        params=PARAMS,
        checkpoint=False,
        cache=False,
        api_base=f"http://user:{PASSWORD}@127.0.0.1:9/v1",
    )
    checked = check_run(many, config)
    plan = prepare_run(many, config)
    try:
        for run in (checked, plan):
            for text in (repr(run), str(run)):
                _assert_hidden(text)
                assert "question 1" not in text and len(text) < 200, text
                assert "500 conversations" in text and "127.0.0.1:9" in text
    finally:
        plan.release()


def test_a_run_result_and_its_table_show_no_url_password():
    result = nbllm.run(
        RECORDS,
        model="m",
        engine="openai",
        api_base=f"http://user:{PASSWORD}@127.0.0.1:9/v1",
        **FAST,
        **PARAMS,
    )
    assert result.df["error"].notna().all()  # nothing listens there
    for text in (repr(result), result.verdict, str(result.summary), result.df.to_string()):
        _assert_hidden(text)


def test_a_failed_jobs_repr_masks_keys_in_its_error(monkeypatch):
    def leaky(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"could not load: Authorization: {HEADER_VALUE}")

    # A local model loads in the job's thread: its failure is the job's error.
    monkeypatch.setattr(prepare, "create_engine", leaky)
    job = submit(
        RECORDS, engine="torch", worker=False, checkpoint=False, cache=False, progress=False
    )
    with pytest.raises(RuntimeError):
        job.result(timeout=30)
    assert job.status == "failed"
    assert "RuntimeError" in repr(job)
    _assert_hidden(repr(job))


def test_llm_config_lists_api_base_without_its_password(shell, monkeypatch, capsys):
    monkeypatch.setenv("NBLLM_API_BASE", f"http://user:{PASSWORD}@10.0.0.7:8000/v1")
    shell.run_line_magic("llm_config", "")
    out = capsys.readouterr().out
    assert "http://10.0.0.7:8000/v1" in out and "$NBLLM_API_BASE" in out
    assert PASSWORD not in out

    monkeypatch.delenv("NBLLM_API_BASE")
    shell.run_line_magic("llm_config", f"api_base=http://user:{PASSWORD}@10.0.0.8:8000/v1")
    shell.run_line_magic("llm_config", "")
    shell.run_line_magic("config", "LlmBatchMagics")
    out = capsys.readouterr().out
    assert out.count("http://10.0.0.8:8000/v1") == 2
    assert PASSWORD not in out


def test_a_bad_api_base_in_the_environment_is_refused_without_its_password(shell, monkeypatch):
    monkeypatch.setenv("NBLLM_API_BASE", f"user:{PASSWORD}@10.0.0.7")
    shell.user_ns["records"] = RECORDS
    cell = shell.run_cell("%llm_batch records -m m")
    message = str(cell.error_in_exec)
    assert "$NBLLM_API_BASE: api_base= expected an http(s) URL" in message
    assert PASSWORD not in message
