"""The public API changes only on purpose: this list is the contract."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

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
            "load_conversations", "log_to_stderr", "run", "runs", "stop_workers", "submit",
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


@pytest.mark.parametrize("function", [nbllm.run, nbllm.arun, nbllm.submit])
def test_run_arun_and_submit_spell_out_every_option_of_the_schema(function):
    """A new option is a field of RunConfig; this keeps the faces from forgetting it."""
    data, *options, params = inspect.signature(function).parameters.values()
    fields = nbllm.RunConfig.model_fields
    assert data.name == "data" and data.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert params.name == "params" and params.kind is inspect.Parameter.VAR_KEYWORD
    assert list(fields)[-1] == "params"  # the other keywords, for the engine
    assert [p.name for p in options] == list(fields)[:-1]
    for parameter in options:
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY, parameter.name
        assert parameter.default == fields[parameter.name].default, parameter.name
    for name, field in fields.items():
        assert field.description and "\n" not in field.description, name
