"""How HTTP answers map to nbllm errors, how retry hints are read, and how bodies are read."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time

import pytest

from nbllm.engines.http_status import error_for_status, parse_retry_after
from nbllm.engines.openai_wire import completion_body, error_message, read_completion
from nbllm.errors import (
    AuthenticationError,
    RateLimitError,
    RequestRejected,
    RetryableError,
    ServerError,
)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "3"}, 3.0),
        ({"retry-after": "0.25"}, 0.25),
        ({"retry-after-ms": "1500", "Retry-After": "9"}, 1.5),  # the precise one wins
        ({"Retry-After": "soon"}, None),
        ({}, None),
        (None, None),
    ],
)
def test_retry_after_is_read_from_either_header(headers, expected):
    assert parse_retry_after(headers) == expected


def test_retry_after_as_an_http_date():
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < parse_retry_after({"Retry-After": when}) <= 31


@pytest.mark.parametrize(
    ("status", "kind", "retryable"),
    [
        (429, RateLimitError, True),
        (500, ServerError, True),
        (503, ServerError, True),
        (408, ServerError, True),
        (409, ServerError, True),
        (400, RequestRejected, False),
        (404, RequestRejected, False),
        (422, RequestRejected, False),
        (401, AuthenticationError, False),
        (403, AuthenticationError, False),
    ],
)
def test_status_codes_map_to_the_error_tree(status, kind, retryable):
    error = error_for_status(status, "detail", {"retry-after": "2"})
    assert type(error) is kind
    assert isinstance(error, RetryableError) is retryable
    assert error.status == status
    assert str(error) == f"HTTP {status}: detail"
    if retryable:
        assert error.retry_after == 2.0


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"error": {"message": "bad key", "type": "auth"}}', "bad key"),
        (b'{"error": "plain"}', "plain"),
        (b'{"detail": "not found"}', "{'detail': 'not found'}"),
        (b"<html>gateway</html>", "<html>gateway</html>"),
    ],
)
def test_the_message_of_an_error_body(body, message):
    assert error_message(body) == message


def test_a_completion_body_round_trips():
    body = completion_body("chatcmpl-1", "m", "hi", 3, None)
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": None, "total_tokens": None}
    response = read_completion(json.dumps(body).encode(), "asked-for")
    assert (response.text, response.model, response.prompt_tokens) == ("hi", "m", 3)
    assert read_completion(b'{"choices": [{"message": {"content": "x"}}]}', "m").model == "m"
    for raw in (b"{}", b"[]", b"not json", b'{"choices": []}'):
        with pytest.raises(ValueError, match="not a chat completion"):
            read_completion(raw, "m")


@pytest.mark.parametrize(
    ("usage", "cached"),
    [
        ({"prompt_tokens": 40, "prompt_tokens_details": {"cached_tokens": 32}}, 32),
        ({"prompt_tokens": 40, "prompt_tokens_details": {"cached_tokens": 0}}, 0),
        ({"prompt_tokens": 40, "prompt_tokens_details": {"audio_tokens": 0}}, None),
        ({"prompt_tokens": 40, "prompt_tokens_details": None}, None),
        ({"prompt_tokens": 40}, None),  # a server that does not say
        ({"prompt_tokens": 40, "prompt_tokens_details": {"cached_tokens": "32"}}, None),
    ],
)
def test_the_cached_prompt_tokens_of_an_answer_are_read_where_openai_puts_them(usage, cached):
    body = {"model": "m", "choices": [{"message": {"content": "x"}}], "usage": usage}
    response = read_completion(json.dumps(body).encode(), "m")
    assert response.cached_tokens == cached and response.prompt_tokens == 40


def test_a_completion_body_says_its_cached_tokens_only_when_known():
    body = completion_body("chatcmpl-1", "m", "hi", 40, 2, cached_tokens=32)
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 32}
    assert read_completion(json.dumps(body).encode(), "m").cached_tokens == 32
    assert "prompt_tokens_details" not in completion_body("chatcmpl-2", "m", "hi", 40, 2)["usage"]


# -- litellm's answers and exceptions, read by LiteLLMEngine (a fake acompletion) ----------


def _litellm_engine(monkeypatch, outcome):
    from nbllm.engines.litellm import LiteLLMEngine

    engine = LiteLLMEngine()

    async def acompletion(**kwargs):
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(engine, "_litellm", _Patched(engine._litellm, acompletion))
    return engine


class _Patched:
    """litellm with another acompletion (the module itself is left as it is)."""

    def __init__(self, litellm, acompletion):
        self._litellm = litellm
        self.acompletion = acompletion

    def __getattr__(self, name):
        return getattr(self._litellm, name)


def _ask(engine):
    from nbllm.types import ChatRequest

    request = ChatRequest(model="gpt-4o-mini", messages=({"role": "user", "content": "hi"},))
    return asyncio.run(engine.complete(request))


def test_litellm_gives_the_providers_finish_reason(monkeypatch):
    from nbllm.engines.litellm import import_litellm

    litellm = import_litellm()
    cut = litellm.ModelResponse(
        model="gpt-4o-mini",
        choices=[
            {"message": {"role": "assistant", "content": "One, two"}, "finish_reason": "length"}
        ],
    )
    assert _ask(_litellm_engine(monkeypatch, cut)).finish_reason == "length"


@pytest.mark.parametrize(
    ("usage", "cached"),
    [
        ({"prompt_tokens": 40, "prompt_tokens_details": {"cached_tokens": 32}}, 32),  # OpenAI
        ({"prompt_tokens": 40, "cache_read_input_tokens": 24}, 24),  # Anthropic, as litellm maps it
        ({"prompt_tokens": 40, "prompt_cache_hit_tokens": 16}, 16),  # DeepSeek, likewise
        ({"prompt_tokens": 40}, None),  # the provider did not say
        (None, None),  # no usage at all
    ],
)
def test_litellm_gives_the_prompt_tokens_the_provider_took_from_its_cache(
    monkeypatch, usage, cached
):
    from nbllm.engines.litellm import import_litellm

    litellm = import_litellm()
    fields = {"usage": litellm.Usage(**usage)} if usage is not None else {}
    answer = litellm.ModelResponse(
        model="gpt-4o-mini",
        choices=[{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        **fields,
    )
    response = _ask(_litellm_engine(monkeypatch, answer))
    assert response.cached_tokens == cached


def test_litellm_refused_credentials_are_an_authentication_error(monkeypatch):
    from nbllm.engines.litellm import import_litellm

    litellm = import_litellm()
    refused = litellm.AuthenticationError(
        message="Incorrect API key provided", llm_provider="openai", model="gpt-4o-mini"
    )
    with pytest.raises(AuthenticationError, match=r"HTTP 401: .*Incorrect API key") as error:
        _ask(_litellm_engine(monkeypatch, refused))
    assert not isinstance(error.value, RetryableError)


def test_litellm_missing_credentials_are_not_a_server_error(monkeypatch):
    """The OpenAI client finds no key before sending; litellm calls that a 500."""
    from nbllm.engines.litellm import import_litellm

    litellm = import_litellm()
    missing = litellm.InternalServerError(
        message="OpenAIException - Missing credentials. Please pass an `api_key`",
        llm_provider="openai",
        model="gpt-4o-mini",
    )
    with pytest.raises(AuthenticationError, match=r"no API key: .*Missing credentials") as error:
        _ask(_litellm_engine(monkeypatch, missing))
    assert not isinstance(error.value, RetryableError)
