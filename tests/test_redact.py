"""nbllm.redact: the one function that masks secrets in text, and parameters fit to show."""

from __future__ import annotations

import asyncio

import pytest

from nbllm.engines.base import Engine
from nbllm.errors import AuthenticationError, EngineError
from nbllm.redact import (
    HIDDEN,
    environment_secrets,
    hidden,
    is_secret_name,
    public_url,
    redact,
    redact_error,
    secret_values,
)
from nbllm.types import ChatRequest, ChatResponse

KEY = "sk-proj-test-sentinel-not-a-key"
PLAIN = "q8w7e6r5t4y3u2i1o0p9"  # a key with no recognisable shape


@pytest.mark.parametrize(
    "text",
    [
        f"HTTP 401: Incorrect API key provided: Bearer {PLAIN}",
        f"authorization: bearer {PLAIN}",
        f"{{'x-api-key': '{PLAIN}', 'content-type': 'json'}}",
        f'{{"X-Goog-Api-Key": "{PLAIN}"}}',
        f"x-goog-api-key: {PLAIN}",
        f'{{"api_key": "{PLAIN}"}}',
        f"password={PLAIN}&user=me",
        f"client_secret: {PLAIN}",
        f"GET https://generativelanguage.googleapis.com/v1/models?key={PLAIN}&alt=sse",
        f"connect to http://me:{PLAIN}@db.example.com:5432 failed",
        f"Authorization: Basic {PLAIN}",
    ],
)
def test_credential_shaped_text_is_masked_without_knowing_the_key(text: str) -> None:
    shown = redact(text)
    assert PLAIN not in shown
    assert "***" in shown


def test_openai_style_keys_are_masked_wherever_they_stand() -> None:
    assert KEY not in redact(f"the key {KEY} was refused")
    assert "sk-***" in redact(f"the key {KEY} was refused")


def test_given_secrets_and_environment_keys_are_masked_anywhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SOME_PROVIDER_API_KEY", "envSECRETvalue42")
    monkeypatch.setenv("HF_TOKEN", "hfSECRETvalue42")
    assert "envSECRETvalue42" in environment_secrets()
    text = f"echo {PLAIN} envSECRETvalue42 and hfSECRETvalue42"
    shown = redact(text, [PLAIN])
    assert "SECRET" not in shown and PLAIN not in shown


def test_ordinary_error_text_is_left_as_it_is() -> None:
    for text in (
        "HTTP 400: max_tokens=100000 is beyond the model's context of 8192 tokens",
        "prompt_tokens: 1234, completion_tokens: 56",
        "ConnectionFailed: connection to http://127.0.0.1:8000/v1 failed",
        "the token limit was exceeded; basic auth failed",
        "api_key= expected a string, got 3",
        "authorization: missing",
    ):
        assert redact(text) == text


def test_secret_names_split_on_dashes_underscores_dots_and_case() -> None:
    secret = ("X-Api-Key", "api_key", "auth_token", "aws_secret_access_key", "extra_headers")
    for name in (*secret, "apiKey", "Authorization", "x.goog.api.key", "Cookie"):
        assert is_secret_name(name), name
    for name in ("max_tokens", "temperature", "stop", "metadata", "top_k", "keywords"):
        assert not is_secret_name(name), name


def test_hidden_masks_nested_credentials_and_keeps_the_rest() -> None:
    params = {
        "temperature": 0.2,
        "extra_headers": {"X-Trace": "t1"},
        "extra_body": {"api_key": PLAIN, "options": [{"x-api-key": PLAIN, "n": 1}]},
        "metadata": {"auth_token": PLAIN, "user": "ana", "note": f"Bearer {PLAIN}"},
    }
    shown = hidden(params)
    assert PLAIN not in repr(shown)
    assert shown["temperature"] == 0.2
    assert shown["extra_headers"] == HIDDEN
    assert shown["extra_body"]["options"][0] == {"x-api-key": HIDDEN, "n": 1}
    assert shown["metadata"]["user"] == "ana"
    assert params["extra_body"]["api_key"] == PLAIN  # the caller's dict is untouched


def test_secret_values_finds_every_credential_at_any_depth() -> None:
    params = {
        "extra_headers": {"X-Trace": "t1", "X-Key": "k2"},
        "extra_body": {"api_key": "k3", "inner": {"password": ["k4"]}},
        "temperature": 0.5,
    }
    assert sorted(secret_values(params)) == ["k2", "k3", "k4", "t1"]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://user:pa55word@host:8000/v1", "http://host:8000/v1"),
        ("https://host/v1", "https://host/v1"),
        ("user:pa55word@host:8000", "host:8000"),
        ("http://user:pa55word@host:port/v1", "host:port/v1"),
    ],
)
def test_public_url_drops_user_and_password(url: str, shown: str) -> None:
    assert "pa55word" not in public_url(url)
    assert public_url(url).endswith(shown)


def test_redact_error_masks_the_message_and_cuts_a_chain_that_holds_the_key() -> None:
    try:
        try:
            raise ValueError(f"server said: {PLAIN}")
        except ValueError as exc:
            raise AuthenticationError(f"HTTP 401: {PLAIN}", status=401) from exc
    except AuthenticationError as error:
        redact_error(error, [PLAIN])
        assert PLAIN not in str(error)
        assert error.__cause__ is None and error.__context__ is None
        assert error.status == 401


class _EchoingEngine(Engine):
    name = "echoing"

    def __init__(self, key: str) -> None:
        super().__init__()
        self._key = key

    def secrets(self) -> tuple[str, ...]:
        return (self._key,)

    async def _complete(self, request: ChatRequest) -> ChatResponse:
        headers = request.params.get("extra_headers", {})
        raise EngineError(f"refused, I got key {self._key} and headers {headers}")


def test_an_engines_errors_leave_it_without_its_key_or_header_values() -> None:
    engine = _EchoingEngine(PLAIN)
    request = ChatRequest(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        params={"extra_headers": {"X-Custom": "hdrSECRET99"}},
    )
    with pytest.raises(EngineError) as caught:
        asyncio.run(engine.complete(request))
    assert PLAIN not in str(caught.value)
    assert "hdrSECRET99" not in str(caught.value)


def test_redact_logs_masks_another_librarys_debug_records(caplog: pytest.LogCaptureFixture) -> None:
    """As the OpenAI client logs a request's options at DEBUG under litellm."""
    import logging

    from nbllm.redact import redact_logs

    name = "nbllm-test-client._base_client"
    redact_logs(name, name)  # twice: one filter
    logger = logging.getLogger(name)
    assert len(logger.filters) == 1
    options = {"headers": {"X-Api-Key": PLAIN}, "json_data": {"api_key": PLAIN, "n": 1}}
    with caplog.at_level(logging.DEBUG, logger=name):
        logger.debug("Request options: %s", options)
    assert PLAIN not in caplog.text
    assert "Request options" in caplog.text and "'n': 1" in caplog.text
