"""The litellm engine: one model string reaches 100+ providers.

litellm costs 2-3 s to import, so it is imported on the first request, never at
``import nbllm``. Before that import, litellm is told to use its bundled price map
(``LITELLM_LOCAL_MODEL_COST_MAP``) and its telemetry is off, so no request leaves the
machine except the chat requests themselves. litellm's own
retries are turned off: the executor owns retries, limits and timeouts.
"""

from __future__ import annotations

import asyncio
import os
import warnings
from collections.abc import Mapping
from typing import Any

from nbllm.engines.base import Engine
from nbllm.engines.http_status import error_for_status, public_url, rate_limit_headers
from nbllm.engines.keys import PLACEHOLDER_KEY, key_for_api_base
from nbllm.errors import AuthenticationError, ConnectionFailed, EngineError, RequestTimeout
from nbllm.redact import redact_logs
from nbllm.types import ChatRequest, ChatResponse

__all__ = ["LiteLLMEngine", "import_litellm", "missing_credentials"]


def import_litellm() -> Any:
    """Import litellm with every start-up network call turned off.

    Call it where litellm is about to be used, not once for good: it also sets again the
    filter for litellm's pydantic warning in the warnings context of the call.
    """
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("LITELLM_TELEMETRY", "False")
    # HF_HUB_OFFLINE is left alone: setting it would also cut off the user's own model
    # downloads in this process, and nbllm never calls litellm's token counter (the one
    # part that reads tokenizers from the hub); usage comes from the responses.
    import litellm

    # litellm's first OpenAI-style call imports the openai client's resources (about 0.75 s
    # here); done now, that cost is not charged to the first request's timeout, nor does it
    # hold the first sends back after the rate limiter has let them go.
    import openai.resources.chat  # noqa: F401

    # pydantic warns about the `ReadOnly` items of litellm's TypedDicts when it builds a
    # response type's schema, which litellm defers to the type's first use (the first
    # answer, not the import). litellm ignores the warning with a filter set at import, but
    # a filter lasts only as long as the warnings context it was set in: an import inside
    # `catch_warnings()` (each pytest test is one) loses it, and a later run shows the
    # warning, or fails where warnings are errors. So set litellm's filter (this category,
    # this message) again in the context of each caller.
    warnings.filterwarnings("ignore", message=r".*`ReadOnly` qualifier.*", category=UserWarning)
    litellm.suppress_debug_info = True
    litellm.telemetry = False
    # At DEBUG the OpenAI client logs each request's options, extra headers and body
    # included (the loggers' own filters: a filter on "openai" would not see them).
    redact_logs("openai._base_client", "LiteLLM", "LiteLLM Router", "httpx")
    return litellm


def knows_price(model: str) -> bool:
    """Whether litellm's bundled price table prices ``model``'s tokens (so its answers
    come with a cost)."""
    litellm = import_litellm()
    try:
        info = litellm.get_model_info(model)
    except Exception:  # litellm raises plain Exceptions for a model it does not know
        return False
    return bool(info.get("input_cost_per_token") or info.get("output_cost_per_token"))


# What the OpenAI client says when it finds no key at all (litellm reports it as a 500).
_MISSING_KEY = "Missing credentials"
# Keys litellm also reads under a name its environment check does not know.
_OTHER_NAMES = {"HUGGINGFACE_API_KEY": ("HF_TOKEN",)}


def _spelled_otherwise(key: str) -> bool:
    """Whether the environment holds ``key`` under another name litellm reads: the same
    provider with or without "AI" and underscores (``TOGETHER_API_KEY`` for
    ``TOGETHERAI_API_KEY``), ending in KEY or TOKEN."""
    stem = key.removesuffix("_API_KEY").replace("_", "").removesuffix("AI")
    for name, value in os.environ.items():
        if not value:
            continue
        if name in _OTHER_NAMES.get(key, ()):
            return True
        squeezed = name.upper().replace("_", "")
        if squeezed.startswith(stem) and squeezed.endswith(("KEY", "TOKEN")):
            return True
    return False


def missing_credentials(model: str) -> list[str]:
    """The API keys litellm needs for ``model`` and finds nowhere; empty when it has them.

    Asks ``litellm.validate_environment``. Only API keys count (names ending in
    ``_API_KEY``): a provider that can also sign in otherwise (a cloud credentials file, a
    local server at its default address) is left to its first request. A key set on
    litellm itself (``litellm.api_key``, ``litellm.openai_key``, ...) or under another
    name litellm reads counts as found. A model litellm cannot place says nothing here;
    its first request says what is wrong.
    """
    litellm = import_litellm()
    try:
        found = litellm.validate_environment(model=model)
        provider = str(litellm.get_llm_provider(model)[1])
    except Exception:
        return []
    missing = [str(key) for key in found.get("missing_keys") or ()]
    if found.get("keys_in_environment") or not missing:
        return []
    if not all(key.endswith("_API_KEY") for key in missing):
        return []
    on_litellm = (
        getattr(litellm, name, None) for name in (f"{provider}_key", f"{provider}_api_key")
    )
    if litellm.api_key or any(on_litellm):
        return []
    if any(_spelled_otherwise(key) for key in missing):
        return []
    return missing


def _rate_limits_of(response: Any) -> dict[str, str] | None:
    """The provider's ``x-ratelimit-*`` headers, which litellm keeps in its hidden params
    (OpenAI's names as they are, every header also as ``llm_provider-<name>``)."""
    hidden = getattr(response, "_hidden_params", None)
    headers = hidden.get("additional_headers") if isinstance(hidden, dict) else None
    if not isinstance(headers, Mapping):
        return None
    bare = {str(k).removeprefix("llm_provider-"): str(v) for k, v in headers.items()}
    return rate_limit_headers(bare)


def _headers_of(exc: BaseException) -> Mapping[str, str] | None:
    for attr in ("litellm_response_headers", "headers"):
        headers = getattr(exc, attr, None)
        if headers:
            return dict(headers)
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    return dict(headers) if headers else None


class LiteLLMEngine(Engine):
    """Sends each request through ``litellm.acompletion``.

    Without ``api_base`` (nor one in a request's parameters) litellm reads the provider's
    usual variable (``OPENAI_API_KEY``, ...) and sends it to that provider. With one, and no
    ``api_key``, the key is chosen by ``nbllm.engines.keys.key_for_api_base``: a provider's
    own host gets its variable, any other server ``NBLLM_API_KEY`` or the placeholder
    ``"EMPTY"``, whatever the model's prefix; litellm never picks one from the environment.
    """

    name = "litellm"

    def __init__(self, *, api_base: str | None = None, api_key: str | None = None) -> None:
        super().__init__()
        self.api_base = api_base
        self._api_key = key_for_api_base(api_base, api_key)
        # Imported now (seconds, once a process), not at the first request: there it would
        # stall the event loop after the limiter had let the first sends go, so they would
        # reach the server late and bunch up with the next minute's.
        self._litellm: Any = import_litellm()

    def __repr__(self) -> str:
        api_base = public_url(self.api_base) if self.api_base else None
        return f"LiteLLMEngine(api_base={api_base!r})"

    def secrets(self) -> tuple[str, ...]:
        return (self._api_key,) if self._api_key else ()

    def describe(self) -> str:
        return f"litellm @ {public_url(self.api_base)}" if self.api_base else "litellm"

    def identity(self) -> str:
        return self.describe()

    async def _complete(self, request: ChatRequest) -> ChatResponse:
        litellm = self._litellm
        kwargs: dict[str, Any] = dict(request.params)
        # A server named in the parameters is as foreign as one given to the engine.
        api_base = self.api_base or kwargs.get("api_base") or kwargs.get("base_url")
        if self.api_base:
            kwargs["api_base"] = self.api_base
        if self._api_key:
            kwargs["api_key"] = self._api_key
        elif api_base and not kwargs.get("api_key"):
            # Without a key litellm would read the model's provider variable from the
            # environment and send it to api_base; a server of one's own often needs none.
            kwargs["api_key"] = key_for_api_base(str(api_base), None) or PLACEHOLDER_KEY
        try:
            response = await litellm.acompletion(
                model=request.model,
                messages=list(request.messages),
                timeout=request.timeout,
                max_retries=0,
                num_retries=0,
                **kwargs,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise self._map_error(litellm, exc) from exc
        return self._parse(litellm, response, request.model)

    def _map_error(self, litellm: Any, exc: Exception) -> EngineError:
        detail = str(getattr(exc, "message", None) or exc)[:500]
        if isinstance(exc, (litellm.Timeout, asyncio.TimeoutError)):
            return RequestTimeout(f"no answer within the timeout: {detail}")
        if isinstance(exc, litellm.APIConnectionError):
            return ConnectionFailed(f"connection failed: {detail}")
        status = getattr(exc, "status_code", None)
        if isinstance(exc, litellm.AuthenticationError):
            return AuthenticationError(f"HTTP {status or 401}: {detail}", status=status or 401)
        if _MISSING_KEY in detail:
            # The OpenAI client found no key before sending anything; litellm wraps that
            # as a 500, which retrying cannot mend.
            return AuthenticationError(f"no API key: {detail}")
        if isinstance(status, int):
            return error_for_status(status, detail, _headers_of(exc))
        return EngineError(f"{type(exc).__name__}: {detail}")

    def _parse(self, litellm: Any, response: Any, model: str) -> ChatResponse:
        try:
            choice = response.choices[0]
            text = choice.message.content
        except (AttributeError, IndexError) as exc:
            msg = f"litellm returned a response without a message: {response!r:.200}"
            raise EngineError(msg) from exc
        usage = getattr(response, "usage", None)
        # OpenAI's field; litellm's Usage also puts Anthropic's cache_read_input_tokens and
        # DeepSeek's prompt_cache_hit_tokens there.
        cached = getattr(getattr(usage, "prompt_tokens_details", None), "cached_tokens", None)
        reason = getattr(choice, "finish_reason", None)
        cost: float | None
        try:
            cost = float(litellm.completion_cost(completion_response=response))
        except Exception:
            cost = None  # models missing from the bundled price map
        return ChatResponse(
            text=text if isinstance(text, str) else "",
            model=getattr(response, "model", None) or model,
            prompt_tokens=getattr(usage, "prompt_tokens", None),
            completion_tokens=getattr(usage, "completion_tokens", None),
            cost_usd=cost,
            finish_reason=reason if isinstance(reason, str) and reason else None,
            rate_limits=_rate_limits_of(response),
            cached_tokens=cached if isinstance(cached, int) else None,
        )
