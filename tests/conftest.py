from __future__ import annotations

import os
import threading

# Local models must work with no hub at all: any attempt to download fails the test.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest


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
def short_minute():
    """A "minute" of rpm / tpm that lasts 2 seconds, so limits bind within a short test:
    ``Executor(..., rate_window_s=short_minute)`` and ``TestServer(window_s=short_minute)``."""
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
