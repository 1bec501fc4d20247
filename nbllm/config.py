"""One validated set of run options: every bad value is refused before any request is sent."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nbllm.errors import ConfigError
from nbllm.retry import RetryPolicy

__all__ = ["RunConfig"]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fail(option: str, expected: str, got: Any) -> None:
    msg = f"{option}= expected {expected}, got {got!r}"
    raise ConfigError(msg)


@dataclass(frozen=True)
class RunConfig:
    """Options of one run, checked on creation. ``api_key`` never appears in ``repr``."""

    model: str
    api_base: str | None = None
    api_key: str | None = field(default=None, repr=False)
    concurrency: int = 32
    max_conversations: int | None = None
    rpm: float | None = None
    tpm: float | None = None
    timeout: float | None = 120.0
    retries: int | RetryPolicy = 5
    system: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    progress: bool | None = None
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            _fail("model", "a model name such as 'openai/gpt-4o-mini'", self.model)
        if self.api_base is not None and (
            not isinstance(self.api_base, str)
            or not self.api_base.startswith(("http://", "https://"))
        ):
            _fail("api_base", "an http(s) URL such as 'http://127.0.0.1:8000/v1'", self.api_base)
        if self.api_key is not None and not isinstance(self.api_key, str):
            msg = f"api_key= expected a string, got a {type(self.api_key).__name__}"
            raise ConfigError(msg)
        if not _is_whole(self.concurrency) or self.concurrency < 1:
            _fail("concurrency", "a whole number >= 1", self.concurrency)
        if self.max_conversations is not None and (
            not _is_whole(self.max_conversations) or self.max_conversations < 1
        ):
            _fail("max_conversations", "a whole number >= 1 or None", self.max_conversations)
        for name in ("rpm", "tpm", "timeout"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or value <= 0):
                _fail(name, "a number > 0 or None", value)
        if not isinstance(self.retries, RetryPolicy) and (
            not _is_whole(self.retries) or self.retries < 0
        ):
            _fail("retries", "a whole number >= 0 or a RetryPolicy", self.retries)
        if self.system is not None and not isinstance(self.system, str):
            _fail("system", "a string or None", self.system)
        if self.max_tokens is not None and (not _is_whole(self.max_tokens) or self.max_tokens < 1):
            _fail("max_tokens", "a whole number >= 1 or None", self.max_tokens)
        if self.temperature is not None and (
            not _is_number(self.temperature) or not 0 <= self.temperature <= 2
        ):
            _fail("temperature", "a number between 0 and 2 or None", self.temperature)
        if self.progress is not None and not isinstance(self.progress, bool):
            _fail("progress", "True, False or None (automatic)", self.progress)

    @property
    def retry_policy(self) -> RetryPolicy:
        if isinstance(self.retries, RetryPolicy):
            return self.retries
        return RetryPolicy(retries=self.retries)

    @property
    def sampling_params(self) -> dict[str, Any]:
        """What the engine receives besides the messages."""
        params: dict[str, Any] = {}
        if self.max_tokens is not None:
            params["max_tokens"] = self.max_tokens
        if self.temperature is not None:
            params["temperature"] = self.temperature
        params.update(self.params)
        return params
