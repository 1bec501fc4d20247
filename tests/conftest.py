from __future__ import annotations

import os
import threading

# Local models must work with no hub at all: any attempt to download fails the test.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from nbllm.executor import runner


@pytest.fixture(autouse=True)
def _nbllm_dir(tmp_path, monkeypatch):
    """Checkpoints and the response cache of a test live in its own temporary folder."""
    monkeypatch.setenv("NBLLM_DIR", str(tmp_path / ".nbllm"))
    return tmp_path / ".nbllm"


@pytest.fixture(autouse=True)
def _no_leaked_threads():
    """A test must stop every server and run-thread it started."""
    before = {t.ident for t in threading.enumerate()}
    yield
    leaked = []
    for thread in threading.enumerate():
        if thread.ident in before or (thread.daemon and not thread.name.startswith("nbllm")):
            continue  # e.g. tqdm's monitor thread
        thread.join(timeout=5)
        if thread.is_alive():
            leaked.append(thread.name)
    assert not leaked, f"threads left running: {leaked}"


@pytest.fixture
def short_minute(monkeypatch):
    """Make the "minute" of rpm / tpm last 2 seconds, so limits bind within a short test."""
    monkeypatch.setattr(runner, "MINUTE_S", 2.0)
    return 2.0


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run where a CUDA GPU is, and say why they skip elsewhere."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_tests:
        return
    from nbllm.engines import hardware

    if hardware().has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none was found on this machine")
    for item in gpu_tests:
        item.add_marker(skip)


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
