"""The public API changes only on purpose: this list is the contract."""

from __future__ import annotations

import subprocess
import sys

import nbllm


def test_public_names():
    assert sorted(nbllm.__all__) == sorted(
        [
            "AuthenticationError", "ChatRequest", "ChatResponse", "CheckpointError", "ConfigError",
            "ConnectionFailed", "Conversation", "DatasetError", "Engine", "EngineError",
            "EngineUnavailable", "Executor", "FakeEngine", "LiteLLMEngine", "NbllmError",
            "OpenAIEngine", "RateLimitError", "RateLimiter", "RequestRejected", "RequestTimeout",
            "RetryPolicy", "RetryableError", "RunConfig", "RunResult", "RunSummary",
            "ServerError", "TurnRecord", "__version__", "arun", "hardware", "jobs",
            "load_conversations", "run", "runs", "stop_workers", "submit",
        ]
    )  # fmt: skip
    for name in nbllm.__all__:
        assert hasattr(nbllm, name), name


def test_every_error_is_an_nbllm_error():
    for name in nbllm.__all__:
        obj = getattr(nbllm, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, nbllm.NbllmError), name


def test_import_is_light_and_offline():
    """``import nbllm`` loads neither litellm, the UI stack nor a model runtime: no network."""
    code = (
        "import sys, nbllm; "
        "heavy = [m for m in ('litellm', 'matplotlib', 'ipywidgets', 'IPython', 'openai', "
        "'torch', 'transformers', 'onnxruntime', 'deepspeed', 'aiohttp.web') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_run_and_arun_name_the_documented_options():
    """Later layers (the magic, the CLI) rely on these keyword names."""
    import inspect

    named = [
        "model", "api_base", "api_key", "concurrency", "rpm", "tpm", "timeout", "retries",
        "system", "max_tokens", "temperature", "progress", "checkpoint", "cache",
    ]  # fmt: skip
    for function in (nbllm.run, nbllm.arun):
        parameters = inspect.signature(function).parameters
        for name in named:
            assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY, (function, name)
    assert inspect.signature(nbllm.run).parameters.keys() == (
        inspect.signature(nbllm.arun).parameters.keys()
    )
