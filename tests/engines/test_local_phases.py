"""A local model's preparation is reported through ``on_phase``, and draws no bars of its own."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from embedded_model import require_embedded_model

from nbllm.engines import create_engine
from nbllm.engines.local import EngineStatus, LocalEngine
from nbllm.engines.local.models import (
    EMBEDDED_MODEL,
    LocalModel,
    conversion_estimate_s,
    conversion_time_text,
)
from nbllm.engines.local.phases import PhaseReport, quiet_loading

# What tqdm or transformers draw: "  3%|▎   | 9/272 [00:03<01:15,  3.47it/s]".
BAR_MARKS = ("it/s]", "s/it]", "%|", "Loading weights", "de-quantizing GGUF")


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float | None, float | None, str]] = []

    def __call__(self, phase: str, done: float | None, total: float | None, detail: str) -> None:
        self.calls.append((phase, done, total, detail))

    def of(self, phase: str) -> list[tuple[str, float | None, float | None, str]]:
        return [call for call in self.calls if call[0] == phase]


# -- the real first run --------------------------------------------------------------------


def test_a_first_conversion_reports_its_phases_and_draws_no_bars(
    tmp_path, monkeypatch, capfd, caplog
):
    require_embedded_model()
    import gguf
    import transformers
    from transformers import modeling_gguf_pytorch_utils as loader

    monkeypatch.setenv("NBLLM_CACHE_DIR", str(tmp_path / "cache"))
    caplog.set_level(logging.INFO, logger="nbllm")
    bars_before = transformers.utils.logging.is_progress_bar_enabled()
    swapped = (loader.tqdm, loader.load_gguf_checkpoint, gguf.get_tensor_name_map)
    capfd.readouterr()
    phases = Recorder()
    engine = create_engine("torch", model=None, worker=False, on_phase=phases)
    try:
        out, err = capfd.readouterr()
        converting = phases.of("converting")
        done = [call[1] for call in converting]
        total = converting[-1][2]
        assert total == 100  # percent of the conversion's time
        assert done[0] == 0 and done[-1] == total
        assert done == sorted(done) and len(set(done)) > 10  # it moves, tensor by tensor
        assert any("272 tensors" in call[3] for call in converting)
        assert {call[2] for call in converting} == {total}
        # Loading comes after the conversion, and says when it is done.
        assert phases.calls.index(converting[-1]) < phases.calls.index(phases.of("loading")[0])
        assert [call[1:3] for call in phases.of("loading")] == [(None, None), (1, 1)]
        for mark in BAR_MARKS:
            assert mark not in err and mark not in out
        assert "Setting accelerator to CPU" not in out + err
        logged = [r.getMessage() for r in caplog.records if r.name == "nbllm"]
        assert any(
            m.startswith(f"converting {EMBEDDED_MODEL} to a transformers checkpoint once (about ")
            and m.endswith("later runs load it in under a second")
            for m in logged
        ), logged
        # The user's own setting for transformers' bars is as it was, and so are the
        # functions the conversion swapped for its own while it ran.
        assert transformers.utils.logging.is_progress_bar_enabled() == bars_before
        assert (loader.tqdm, loader.load_gguf_checkpoint, gguf.get_tensor_name_map) == swapped
    finally:
        asyncio.run(engine.aclose())


# -- the parts, without a model ------------------------------------------------------------


def test_a_phase_report_passes_the_first_the_last_and_each_new_detail():
    phases = Recorder()
    report = PhaseReport(phases, "converting", 100)
    for done in range(101):
        report(done, "reading the tokenizer" if done < 50 else "de-quantizing the weights")
    sent = [call[1] for call in phases.calls]
    assert sent[0] == 0 and 50 in sent and sent[-1] == 100
    assert len(sent) < 10  # a hundred calls within 0.1 s: the rest are left out
    PhaseReport(None, "loading")(None, "nobody listens")  # no callback: nothing happens


def test_quiet_loading_counts_gguf_tensors_and_restores_everything():
    pytest.importorskip("transformers")
    import transformers
    from transformers import modeling_gguf_pytorch_utils as loader

    tf_logging = transformers.utils.logging
    original_tqdm = loader.tqdm
    enabled = tf_logging.is_progress_bar_enabled()
    counted: list[tuple[int, int]] = []
    with quiet_loading(on_tensor=lambda done, total: counted.append((done, total))):
        with quiet_loading():  # nested: the outer patches stay
            assert loader.tqdm is not original_tqdm
        items = list(loader.tqdm(["a", "b", "c"], desc="Converting and de-quantizing"))
        with tf_logging.tqdm(range(3), desc="Loading weights") as bar:
            assert list(bar) == [0, 1, 2]
    assert items == ["a", "b", "c"] and counted == [(1, 3), (2, 3), (3, 3)]
    assert loader.tqdm is original_tqdm
    assert tf_logging.is_progress_bar_enabled() == enabled


def test_the_conversion_estimate_grows_with_the_file(tmp_path):
    small, large = tmp_path / "small.gguf", tmp_path / "large.gguf"
    small.write_bytes(b"x")
    with large.open("wb") as file:  # sparse: 2 GB of nothing
        file.truncate(2_000_000_000)
    assert conversion_estimate_s(large) > 10 * conversion_estimate_s(small) > 0
    assert conversion_time_text(small) == "about 10 s"  # the embedded model's, measured
    assert conversion_time_text(large) == "about 4 min"


class Prepared(LocalEngine):
    """Converts (pretends to) in ``_prepare`` and loads nothing."""

    name = "prepared"

    def _prepare(self):
        report = PhaseReport(self.on_phase, "converting", 2)
        for done in range(3):
            report(done, f"step {done}")  # a new detail is never held back

    def _load(self):
        self.tokenizer = object()

    async def _complete(self, request):
        raise AssertionError


def test_a_local_engine_reports_its_preparation_then_its_load(monkeypatch):
    from nbllm.engines import local
    from nbllm.engines.local import base

    monkeypatch.setattr(base, "resolve_local_model", lambda model: LocalModel("m", Path(".")))
    monkeypatch.setattr(local, "engine_class", lambda name: Prepared)
    monkeypatch.setattr(
        local, "engine_status", lambda name: EngineStatus(name, True, True, "cpu", "1")
    )
    phases = Recorder()
    engine = create_engine("torch", model=None, worker=False, on_phase=phases)
    asyncio.run(engine.aclose())
    assert [call[:3] for call in phases.calls] == [
        ("converting", 0, 2),
        ("converting", 1, 2),
        ("converting", 2, 2),
        ("loading", None, None),
        ("loading", 1, 1),
    ]
    assert phases.calls[-1][3] == "loaded: prepared m on cpu"


def test_a_worker_reports_loading_when_it_starts_and_when_it_is_ready(monkeypatch, tmp_path):
    from nbllm.engines import worker as worker_module
    from nbllm.engines.local.models import embedded_gguf
    from nbllm.errors import EngineUnavailable

    monkeypatch.setenv("NBLLM_CACHE_DIR", str(tmp_path))  # nothing converted yet

    class Started:
        served_engine = "torch"

        def engine(self, **kwargs):
            return create_engine("openai", model="m", api_base="http://127.0.0.1:9/v1")

    monkeypatch.setattr(worker_module, "shared_worker", lambda *args, **kwargs: Started())
    phases = Recorder()
    engine = create_engine("torch", model=None, worker=True, on_phase=phases)
    asyncio.run(engine.aclose())
    assert [call[:3] for call in phases.calls] == [("loading", None, None), ("loading", 1, 1)]
    assert "worker" in phases.calls[0][3] and EMBEDDED_MODEL in phases.calls[0][3]
    try:
        embedded_gguf()
    except EngineUnavailable:
        return
    # The child converts the model first, and says nothing while it does: the line says so.
    assert "converts the model once first (about 10 s)" in phases.calls[0][3]
