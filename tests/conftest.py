from __future__ import annotations

import gc
import os
import sys
import threading
import warnings
from pathlib import Path

# Local models must work with no hub at all: any attempt to download fails the test.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest


@pytest.fixture(autouse=True)
def _nbllm_dir(tmp_path, monkeypatch):
    """Checkpoints and the response cache of a test live in its own temporary folder, and
    no configuration of the machine's (an nbllm.toml of the user's, NBLLM_<OPTION>
    variables) reaches a test."""
    monkeypatch.setenv("NBLLM_DIR", str(tmp_path / ".nbllm"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / ".config"))
    from nbllm.config import RunConfig

    for variable in ["NBLLM_CONFIG", *(f"NBLLM_{name.upper()}" for name in RunConfig.model_fields)]:
        monkeypatch.delenv(variable, raising=False)
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


_SENDS_THROUGH_LITELLM: dict[str, bool] = {}


def _sends_through_litellm(path: str) -> bool:
    if path not in _SENDS_THROUGH_LITELLM:
        text = Path(path).read_text(encoding="utf-8")
        _SENDS_THROUGH_LITELLM[path] = any(
            mark in text for mark in ('"litellm"', "LiteLLMEngine", '"gemini/', "hosted_vllm/")
        )
    return _SENDS_THROUGH_LITELLM[path]


@pytest.fixture(autouse=True)
def _litellm_clients_dropped(request):
    """litellm keeps its HTTP clients (aiohttp sessions) in module-level caches, bound to
    the event loop of the run that made them; once that run's loop is gone they are only
    garbage, and the collector would report them as unclosed in whichever later test it
    happens to run. After a test of a module that sends through litellm, its client cache
    is dropped and the garbage collected there, with litellm's warnings ignored (a full
    collection costs about 0.4 s, so only there)."""
    yield
    litellm = sys.modules.get("litellm")
    if litellm is None or not _sends_through_litellm(str(request.node.fspath)):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # litellm's sessions, not nbllm's
        cache = getattr(litellm, "in_memory_llm_clients_cache", None)
        if cache is not None:
            cache.flush_cache()
        gc.collect()


@pytest.fixture
def shell(monkeypatch):
    """A real IPython shell with ``%load_ext nbllm`` done, none of the magic's NBLLM_*
    settings from the environment; the extension, its config and the namespace are reset
    after."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    from nbllm.ui.magics import ENVIRONMENT

    for variable in ENVIRONMENT.values():
        monkeypatch.delenv(variable, raising=False)
    config = Config()
    config.HistoryManager.enabled = False
    ip = InteractiveShell.instance(config=config)
    ip.run_line_magic("load_ext", "nbllm")
    yield ip
    ip.run_line_magic("unload_ext", "nbllm")
    ip.config.pop("LlmBatchMagics", None)  # what %config put there would outlive the test
    ip.reset(new_session=False)
