"""nbllm: run datasets of (multi-turn) LLM conversations in parallel, from a notebook or a script.

import nbllm
result = nbllm.run(data, model="openai/gpt-4o-mini", concurrency=64, rpm=500)
result.df        # one row per turn
result.summary   # the run's figures
nbllm.run(data)  # no model: the embedded SmolLM2-135M-Instruct on this machine

job = nbllm.submit(data, model=...)   # the same run in the background; nbllm.jobs() lists them
%load_ext nbllm                        # in IPython / Jupyter: the %%llm_batch cell magic
"""

from __future__ import annotations

from typing import Any

from nbllm import runs
from nbllm.api import arun, run
from nbllm.config import RunConfig
from nbllm.dataset import load_conversations
from nbllm.engines import Engine, FakeEngine, LiteLLMEngine, OpenAIEngine, hardware
from nbllm.engines.worker import stop_all_workers as stop_workers
from nbllm.errors import (
    AuthenticationError,
    CheckpointError,
    ConfigError,
    ConnectionFailed,
    DatasetError,
    EngineError,
    EngineUnavailable,
    NbllmError,
    RateLimitError,
    RequestRejected,
    RequestTimeout,
    RetryableError,
    ServerError,
)
from nbllm.executor import Executor, RateLimiter
from nbllm.jobs import jobs, submit
from nbllm.logs import log_to_stderr
from nbllm.results import RunResult, RunSummary
from nbllm.retry import RetryPolicy
from nbllm.types import ChatRequest, ChatResponse, Conversation, TurnRecord

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "ChatRequest",
    "ChatResponse",
    "CheckpointError",
    "ConfigError",
    "ConnectionFailed",
    "Conversation",
    "DatasetError",
    "Engine",
    "EngineError",
    "EngineUnavailable",
    "Executor",
    "FakeEngine",
    "LiteLLMEngine",
    "NbllmError",
    "OpenAIEngine",
    "RateLimitError",
    "RateLimiter",
    "RequestRejected",
    "RequestTimeout",
    "RetryPolicy",
    "RetryableError",
    "RunConfig",
    "RunResult",
    "RunSummary",
    "ServerError",
    "TurnRecord",
    "__version__",
    "arun",
    "hardware",
    "jobs",
    "load_conversations",
    "log_to_stderr",
    "run",
    "runs",
    "stop_workers",
    "submit",
]


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext nbllm``: the ``%%llm_batch`` and ``%llm_config`` magics."""
    from nbllm.ui.magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext nbllm``: remove the magics again."""
    from nbllm.ui.magics import unload_ipython_extension as unload

    unload(ipython)
