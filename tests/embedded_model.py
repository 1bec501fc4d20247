"""The guard of the tests that run the embedded model for real."""

from __future__ import annotations

import os

import pytest


def require_embedded_model(*modules: str) -> None:
    """Skip unless the embedded model and ``modules`` are installed; under CI, fail instead.

    ``tools/test.sh`` installs them, so in CI a missing one is a broken install step.
    """
    import importlib.util

    from nbllm.engines.local.models import embedded_gguf
    from nbllm.errors import EngineUnavailable

    needed = ("torch", "transformers", *modules)
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    reason = f"not installed: {', '.join(missing)}" if missing else None
    if reason is None:
        try:
            embedded_gguf()
        except EngineUnavailable as exc:
            reason = str(exc)
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"tools/test.sh should have installed this: {reason}")
        pytest.skip(reason)
