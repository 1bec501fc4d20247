"""No key leaves nbllm: not through a result, a summary, an event, a repr, a file, a log record,
the command's output or the magic's, whatever a careless server quotes back.

Every run here talks over real HTTP on 127.0.0.1 to ``EchoServer`` (tests/secret_servers.py),
whose 401, 400 and 500 answers quote every header and the body it received, as real servers
and proxies do. The key, an ``extra_headers`` value, ``extra_body={"api_key": ...}`` and
``metadata={"auth_token": ...}`` are sentinels that must appear nowhere nbllm writes or shows.
A second part checks what reaches a server of one's own: never a provider key from the
environment, only ``NBLLM_API_KEY`` or what was passed.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from secret_servers import EchoServer

import nbllm
from nbllm.api import prepare_run
from nbllm.engines import Engine, OpenAIEngine
from nbllm.errors import AuthenticationError, ServerError
from nbllm.executor.events import RetryScheduled
from nbllm.serve import EngineServer
from nbllm.types import ChatRequest, ChatResponse

KEY = "sk-nbllm-test-sentinel-not-a-key"
HEADER_SECRET = "hdrSENTINEL2-5f1e9a77"
BODY_SECRET = "bodySENTINEL3-8c2d4b11"
METADATA_SECRET = "metaSENTINEL4-3a7e6c05"
URL_PASSWORD = "urlSENTINEL5-9b0f2d64"
SERVE_KEY = "serveSENTINEL6-4d8a1e23"
SECRETS = (KEY, HEADER_SECRET, BODY_SECRET, METADATA_SECRET, URL_PASSWORD, SERVE_KEY)

#: Sampling parameters that carry credentials, as users pass them to the OpenAI client.
SECRET_PARAMS: dict[str, Any] = {
    "extra_headers": {"X-Api-Key": HEADER_SECRET},
    "extra_body": {"api_key": BODY_SECRET},
    "metadata": {"auth_token": METADATA_SECRET},
}
DATA = [{"id": "a", "turns": ["hello", "and again"]}, {"id": "b", "turns": ["hi"]}]
#: One retry, no backoff: a 500 gives a RetryScheduled event without a sleep.
ONE_RETRY = nbllm.RetryPolicy(retries=1, initial=0)

#: engine, model, the path under the server's mode (Gemini's api_base has no /v1).
ENGINES = {
    "openai": ("openai", "m", "/v1"),
    "litellm-openai": ("litellm", "openai/m", "/v1"),
    "litellm-gemini": ("litellm", "gemini/gemini-1.5-flash", "/v1beta"),
}
PROVIDER_KEYS = {
    "OPENAI_API_KEY": "sk-envOPENAI-SENTINEL-11111111",
    "HOSTED_VLLM_API_KEY": "envHOSTEDVLLM-SENTINEL-2222",
    "ANTHROPIC_API_KEY": "sk-ant-envANTHROPIC-SENTINEL-3333",
    "GEMINI_API_KEY": "envGEMINI-SENTINEL-44444444",
}
NBLLM_KEY = "envNBLLM-SENTINEL-55555555"

# litellm keeps an aiohttp session per provider (text-completion-openai, hosted_vllm, ...)
# after its engine is closed and its loop is gone; collected later, it warns "Unclosed
# connector". A matter of resources, not of secrets, and not what this suite checks.
pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


# --------------------------------------------------------------------------- where to look


def leaks(places: Mapping[str, str | bytes], secrets: Iterable[str] = SECRETS) -> list[str]:
    """``"place: secret ...context..."`` for every secret found in a place's text."""
    found = []
    for place, text in places.items():
        for secret in secrets:
            needle: str | bytes = secret.encode() if isinstance(text, bytes) else secret
            at = text.find(needle)  # type: ignore[arg-type]
            if at >= 0:
                context = text[max(0, at - 80) : at + len(secret) + 20]
                found.append(f"{place}: {secret} in ...{context!r}...")
    return found


def assert_no_secret(places: Mapping[str, str | bytes], secrets: Iterable[str] = SECRETS) -> None:
    found = leaks(places, secrets)
    assert not found, "secrets leaked:\n" + "\n".join(found)


def result_texts(result: nbllm.RunResult) -> dict[str, str]:
    """Every form of a result a user reads: each cell of df, the summary, the result's repr."""
    df = result.df
    places = {
        f"df[{column!r}][{i}]": str(value)
        for column in df.columns
        for i, value in enumerate(df[column])
    }
    summary = result.summary
    summary_frame = pd.DataFrame([summary.to_dict()])
    places.update(
        {
            "df.to_string()": df.to_string(),
            "df.to_json()": df.to_json(date_format="iso"),
            "repr(result)": repr(result),
            "result.verdict": result.verdict,
            "str(summary)": str(summary),
            "repr(summary)": repr(summary),
            "summary._repr_html_()": summary._repr_html_(),
            "summary.to_dict()": json.dumps(summary.to_dict(), default=str),
            "summary as a DataFrame": summary_frame.to_string()
            + summary_frame.to_json(date_format="iso"),
        }
    )
    return places


def event_texts(events: list[Any]) -> dict[str, str]:
    return {f"event {i} {type(e).__name__}": repr(e) for i, e in enumerate(events)}


def log_texts(caplog: pytest.LogCaptureFixture) -> dict[str, str]:
    """nbllm's log records at every level, and every library's from INFO up.

    The OpenAI client and litellm log whole requests (headers, ``extra_body``) at DEBUG by
    design; a user who turns their DEBUG on has asked for that.
    """
    places = {}
    for i, record in enumerate(caplog.records):
        if record.name.split(".")[0] == "nbllm" or record.levelno >= logging.INFO:
            places[f"log record {i} ({record.name}, {record.levelname})"] = "".join(
                (record.getMessage(), str(record.exc_text or ""), repr(record.args))
            )
    return places


def file_bytes(root: Path) -> dict[str, bytes]:
    """The raw bytes of every file under ``root``: checkpoints, the cache, their -wal files."""
    return {str(path): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


class RunWatcher:
    """A listener that keeps every event and, at each one, the raw bytes of the run's files:
    while the run goes, new rows sit in the -wal files, which are gone once it ends."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.events: list[Any] = []
        self.files: dict[str, bytes] = {}

    def __call__(self, event: Any) -> None:
        self.events.append(event)
        for path, raw in file_bytes(self.root).items():
            self.files[f"{path} after event {len(self.events)}"] = raw

    def places(self) -> dict[str, str | bytes]:
        """The events, the files seen during the run, and the files it left."""
        at_end = file_bytes(self.root)
        names = {Path(p).name for p in at_end}
        assert {"cache.sqlite", "checkpoint.sqlite"} <= names, sorted(names)
        return {**event_texts(self.events), **self.files, **at_end}


@pytest.fixture
def echo():
    with EchoServer() as server:
        yield server


@pytest.fixture(scope="module")
def litellm_logging_pool():
    """litellm's logging thread pool, started before the test that would start it.

    litellm starts it on a first callback and keeps it for the life of the process: it is
    litellm's, not a thread a test left running.
    """
    from litellm.litellm_core_utils.thread_pool_executor import executor

    # Tasks that overlap start new threads: hold 16 at once, so that the few a test's
    # requests submit together find threads already there.
    release = threading.Event()
    held = [executor.submit(release.wait, 10) for _ in range(16)]
    release.set()
    for future in held:
        future.result()


@pytest.fixture
def logs(caplog, litellm_logging_pool):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="nbllm")
    return caplog


@pytest.fixture
def no_provider_keys(monkeypatch):
    for name in (*PROVIDER_KEYS, "NBLLM_API_KEY", "GOOGLE_API_KEY", "NBLLM_API_BASE"):
        monkeypatch.delenv(name, raising=False)


# --------------------------------------------------------------------------- every engine


@pytest.mark.usefixtures("no_provider_keys")
@pytest.mark.parametrize("mode", ["401", "400", "500", "ok"])
@pytest.mark.parametrize("which", list(ENGINES))
def test_a_quoting_server_leaks_nothing(which, mode, echo, logs, capsys, _nbllm_dir):
    engine, model, suffix = ENGINES[which]
    watch = RunWatcher(_nbllm_dir)
    result = nbllm.run(
        DATA,
        model=model,
        engine=engine,
        api_base=echo.url(mode, suffix),
        api_key=KEY,
        retries=ONE_RETRY,
        progress=False,
        listeners=[watch],
        **SECRET_PARAMS,
    )
    # The server did receive the secrets, and its answers quoted them: the test can fail.
    assert KEY in echo.all_text() and HEADER_SECRET in echo.all_text()
    if mode == "ok":
        assert result.summary.turns_ok == 3, result.df["error"].tolist()
    else:
        assert result.summary.turns_ok == 0
        assert result.df["error"].notna().all()
    if mode == "500":
        assert any(isinstance(e, RetryScheduled) for e in watch.events)
    shown = capsys.readouterr()
    assert_no_secret(
        {
            "stdout": shown.out,
            "stderr": shown.err,
            **result_texts(result),
            **log_texts(logs),
            **watch.places(),
        }
    )


@pytest.mark.usefixtures("no_provider_keys")
@pytest.mark.parametrize("which", list(ENGINES))
def test_reprs_of_the_config_and_the_prepared_run_hide_secrets(which, echo):
    engine, model, suffix = ENGINES[which]
    api_base = echo.url("ok", suffix).replace("//", f"//user:{URL_PASSWORD}@", 1)
    config = nbllm.RunConfig(
        model=model,
        engine=engine,
        api_base=api_base,
        api_key=KEY,
        params=dict(SECRET_PARAMS),
        checkpoint=False,
        cache=False,
    )
    plan = prepare_run(DATA, config)
    try:
        places = {
            "repr(RunConfig)": repr(config),
            "str(RunConfig)": str(config),
            "repr(PreparedRun)": repr(plan),
            "repr(engine)": repr(plan.engine),
            "engine.describe()": plan.engine.describe(),
            "engine.identity()": plan.engine.identity(),
        }
    finally:
        plan.release()
    assert_no_secret(places)


def test_a_refused_api_base_does_not_show_its_password():
    with pytest.raises(nbllm.ConfigError) as refused:
        nbllm.run(DATA, model="m", api_base=f"ftp://user:{URL_PASSWORD}@example.com/v1")
    assert "api_base" in str(refused.value)
    assert_no_secret({"ConfigError": str(refused.value)})


# --------------------------------------------------------------------------- nbllm serve


@pytest.mark.usefixtures("no_provider_keys")
@pytest.mark.parametrize("mode", ["401", "400", "500", "ok"])
async def test_serve_in_front_of_a_quoting_server_leaks_nothing(mode, echo, logs, _nbllm_dir):
    watch = RunWatcher(_nbllm_dir)
    upstream = OpenAIEngine(echo.url(mode), api_key=KEY)
    async with EngineServer(upstream, model="m", api_key=SERVE_KEY) as server:
        result = await nbllm.arun(
            DATA,
            model="m",
            engine="openai",
            api_base=server.url,
            api_key=SERVE_KEY,
            retries=ONE_RETRY,
            progress=False,
            listeners=[watch],
            **SECRET_PARAMS,
        )
    assert KEY in echo.all_text()
    if mode == "ok":
        assert result.summary.turns_ok == 3, result.df["error"].tolist()
    else:
        assert result.summary.turns_ok == 0
    assert_no_secret(
        {
            **result_texts(result),
            **log_texts(logs),
            **watch.places(),
        }
    )


# --------------------------------------------------------------------------- a user's engine


class QuotingEngine(Engine):
    """An engine of a user's own whose errors quote its key and the request's headers."""

    name = "quoting"

    def __init__(self, error: type[Exception]) -> None:
        super().__init__()
        self.error = error
        self._key = KEY

    async def _complete(self, request: ChatRequest) -> ChatResponse:
        headers = request.params.get("extra_headers")
        message = f"refused Authorization: Bearer {self._key} with headers {headers}"
        raise self.error(message)


@pytest.mark.usefixtures("no_provider_keys")
@pytest.mark.parametrize("error", [AuthenticationError, ServerError, RuntimeError])
def test_an_engine_of_ones_own_leaks_nothing(error, logs, _nbllm_dir):
    watch = RunWatcher(_nbllm_dir)
    result = nbllm.run(
        DATA,
        model="m",
        engine=QuotingEngine(error),
        retries=ONE_RETRY,
        progress=False,
        listeners=[watch],
        **SECRET_PARAMS,
    )
    assert result.summary.turns_ok == 0
    if error is ServerError:
        assert any(isinstance(e, RetryScheduled) for e in watch.events)
    assert_no_secret(
        {
            **result_texts(result),
            **log_texts(logs),
            **watch.places(),
        }
    )


# --------------------------------------------------------------------------- the command


@pytest.mark.usefixtures("no_provider_keys")
@pytest.mark.parametrize("mode", ["401", "500"])
def test_the_command_leaks_nothing(mode, echo, tmp_path, _nbllm_dir):
    data = tmp_path / "convs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in DATA), encoding="utf-8")
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n", encoding="utf-8")
    key_file.chmod(0o600)
    out = tmp_path / "out.jsonl"
    command = [
        sys.executable,
        "-m",
        "nbllm",
        "run",
        str(data),
        "--model",
        "m",
        "--engine",
        "openai",
        "--api-base",
        echo.url(mode),
        "--api-key-file",
        str(key_file),
        "--retries",
        "0",
        "--out",
        str(out),
        "--no-progress",
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=60, env=os.environ.copy(), check=False
    )
    assert done.returncode == 1, done.stderr  # some turns failed
    assert KEY in echo.all_text()
    assert out.read_text(encoding="utf-8").count("\n") == 3
    assert_no_secret(
        {
            "stdout": done.stdout,
            "stderr": done.stderr,
            "--out file": out.read_text(encoding="utf-8"),
            **file_bytes(_nbllm_dir),
        }
    )


# --------------------------------------------------------------------------- the magic


@pytest.mark.usefixtures("no_provider_keys")
@pytest.mark.parametrize("mode", ["401", "400"])
def test_the_magic_leaks_nothing(mode, shell, echo, logs, capsys, monkeypatch, _nbllm_dir):
    monkeypatch.setenv("NBLLM_API_KEY", KEY)  # the magic takes no key on its line
    shell.user_ns["questions"] = pd.DataFrame({"q": ["hello", "hi"]})
    cell = shell.run_cell(
        f"%%llm_batch questions -m m --engine openai --api-base {echo.url(mode)}\nuser: {{q}}"
    )
    shown = capsys.readouterr()
    assert cell.error_before_exec is None
    assert KEY in echo.all_text()
    result = shell.user_ns["llm_result"]
    assert result.summary.turns_failed == 2
    assert_no_secret(
        {
            "stdout": shown.out,
            "stderr": shown.err,
            "cell error": repr(cell.error_in_exec),
            **result_texts(result),
            **log_texts(logs),
            **file_bytes(_nbllm_dir),
        }
    )


@pytest.mark.usefixtures("no_provider_keys")
def test_llm_config_shows_no_url_password(shell, capsys, monkeypatch):
    monkeypatch.setenv("NBLLM_API_BASE", f"http://user:{URL_PASSWORD}@127.0.0.1:9/v1")
    shell.run_line_magic("llm_config", "")
    shown = capsys.readouterr().out
    assert "127.0.0.1:9" in shown
    assert_no_secret({"%llm_config": shown})


# --------------------------------------------------------------------------- what is sent

#: model, engine, and the path under the server's mode.
OWN_SERVER_RUNS = [
    ("gpt-4o-mini", "litellm", "/v1"),
    ("text-completion-openai/x", "auto", "/v1"),
    ("hosted_vllm/x", "auto", "/v1"),
    ("hosted_vllm/x", "litellm", "/v1"),
    ("openai/x", "openai", "/v1"),
    ("openai/x", "litellm", "/v1"),
    ("gemini/gemini-1.5-flash", "litellm", "/v1beta"),
    ("anthropic/claude-3-5-haiku-20241022", "litellm", "/v1"),
]
OPENAI_COMPATIBLE = {"gpt-4o-mini", "text-completion-openai/x", "hosted_vllm/x", "openai/x"}


def _run_against(echo: EchoServer, model: str, engine: str, suffix: str) -> nbllm.RunResult:
    return nbllm.run(
        DATA[:1],
        model=model,
        engine=engine,
        api_base=echo.url("ok", suffix),
        retries=0,
        progress=False,
        checkpoint=False,
        cache=False,
    )


@pytest.mark.usefixtures("no_provider_keys")
@pytest.mark.parametrize(("model", "engine", "suffix"), OWN_SERVER_RUNS)
def test_environment_keys_never_reach_a_server_of_ones_own(
    model, engine, suffix, echo, monkeypatch, litellm_logging_pool
):
    for name, value in PROVIDER_KEYS.items():
        monkeypatch.setenv(name, value)
    _run_against(echo, model, engine, suffix)
    assert echo.requests, "no request reached the server"
    assert_no_secret(
        {f"request {i}": r.text() for i, r in enumerate(echo.requests)},
        PROVIDER_KEYS.values(),
    )


@pytest.mark.usefixtures("no_provider_keys")
@pytest.mark.parametrize(("model", "engine", "suffix"), OWN_SERVER_RUNS)
def test_nbllm_api_key_is_what_a_server_of_ones_own_gets(
    model, engine, suffix, echo, monkeypatch, litellm_logging_pool
):
    for name, value in PROVIDER_KEYS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("NBLLM_API_KEY", NBLLM_KEY)
    result = _run_against(echo, model, engine, suffix)
    assert echo.requests, "no request reached the server"
    for request in echo.requests:
        assert_no_secret({"request": request.text()}, PROVIDER_KEYS.values())
        if model in OPENAI_COMPATIBLE:
            assert request.header("Authorization") == f"Bearer {NBLLM_KEY}"
        else:  # the provider's own header, with the key meant for this server
            assert NBLLM_KEY in request.text()
    assert_no_secret(result_texts(result), (NBLLM_KEY,))
