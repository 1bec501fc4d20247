"""Local engines on the embedded SmolLM2-135M-Instruct, for real, on this machine's CPU.

Generation is kept short (a few tokens) so the whole module runs in well under a minute
once the model has been converted (the first use converts it, about 10 s).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from embedded_model import require_embedded_model

import nbllm
from nbllm.engines import EMBEDDED_MODEL, available, create_engine, hardware, is_local
from nbllm.engines.local import CPU_ORDER, create_local_engine, engine_status
from nbllm.engines.local.base import Generation
from nbllm.engines.local.batched import BatchedEngine, _Request
from nbllm.engines.local.models import (
    LocalModel,
    is_local_model,
    resolve_local_model,
    transformers_checkpoint,
)
from nbllm.errors import ConfigError, EngineUnavailable, RequestRejected, RequestTimeout
from nbllm.types import ChatRequest

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = [
    "What is the capital of France?",
    "What is 2 + 2?",
    "Name a primary colour.",
]
# Answered at length: the model keeps counting until max_tokens stops it.
COUNTING = "Count from 1 to 1000, one number per line."


def ask(content: str, timeout: float | None = None, **params) -> ChatRequest:
    return ChatRequest(EMBEDDED_MODEL, [{"role": "user", "content": content}], params, timeout)


@pytest.fixture(scope="module")
def torch_engine():
    require_embedded_model()
    from nbllm.engines.local.torch import TorchEngine

    engine = TorchEngine(batch_size=4, batch_wait_s=0.05)
    yield engine
    asyncio.run(engine.aclose())


# -- the embedded model and model paths --------------------------------------------------


def test_the_embedded_model_is_found_and_converted_once():
    require_embedded_model()
    model = resolve_local_model(None)
    assert model.name == EMBEDDED_MODEL and model.is_gguf
    checkpoint = transformers_checkpoint(model)
    assert (checkpoint / "config.json").is_file()
    assert "quantization_config" not in (checkpoint / "config.json").read_text()
    # The conversion is kept: asking again returns the same folder without converting.
    stamp = (checkpoint / "config.json").stat().st_mtime_ns
    assert transformers_checkpoint(model) == checkpoint
    assert (checkpoint / "config.json").stat().st_mtime_ns == stamp


def test_a_model_directory_is_used_as_it_is(tmp_path):
    require_embedded_model()
    checkpoint = transformers_checkpoint(resolve_local_model(None))
    model = resolve_local_model(str(checkpoint))
    assert model == LocalModel(str(checkpoint), checkpoint.resolve())
    assert transformers_checkpoint(model) == checkpoint.resolve()


@pytest.mark.parametrize(
    ("model", "local"),
    [(None, True), ("SmolLM2-135M-Instruct", True), ("openai/gpt-4o-mini", False)],
)
def test_which_models_are_local(model, local):
    assert is_local_model(model) is local


def test_a_directory_that_is_not_a_model_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"without config\.json"):
        resolve_local_model(str(tmp_path))


def test_a_missing_path_is_not_taken_for_a_local_model(tmp_path):
    with pytest.raises(ConfigError, match="nothing is downloaded"):
        resolve_local_model(str(tmp_path / "nope.gguf"))


# -- selection -------------------------------------------------------------------------


def test_available_lists_every_local_engine_with_a_reason_when_unusable():
    table = available()
    assert list(table.columns) == ["engine", "installed", "usable", "device", "version", "reason"]
    assert list(table["engine"]) == ["vllm", "deepspeed", "onnx", "torch", "llamacpp"]
    for row in table.itertuples():
        assert row.usable == pd.isna(row.reason)
        if row.usable:
            assert row.installed and row.device in ("cpu", "cuda", "mps") and row.version
    if not hardware().has_cuda:
        vllm = table.set_index("engine").loc["vllm"]
        assert not vllm.usable and ("GPU" in vllm.reason or "not installed" in vllm.reason)


def test_a_named_engine_that_cannot_run_here_says_why():
    if engine_status("vllm").usable:
        pytest.skip("vllm is usable here")
    with pytest.raises(EngineUnavailable, match="vllm"):
        create_engine("vllm", model=None, worker=False)


def test_options_for_local_engines_are_refused_for_a_server():
    with pytest.raises(ConfigError, match="batch_size"):
        create_engine("openai", model="m", api_base="http://127.0.0.1:9/v1", batch_size=4)
    with pytest.raises(ConfigError, match="worker=True"):
        create_engine("litellm", model="openai/gpt-4o-mini", worker=True)


@pytest.mark.parametrize(
    ("engine", "model", "api_base", "local"),
    [
        ("auto", None, None, True),
        ("auto", "openai/gpt-4o-mini", None, False),
        ("auto", None, "http://127.0.0.1:9/v1", False),
        ("torch", "anything", "http://127.0.0.1:9/v1", True),
    ],
)
def test_auto_picks_a_local_engine_only_for_a_local_model(engine, model, api_base, local):
    assert is_local(engine, model, api_base) is local


def test_auto_falls_through_an_engine_that_fails_to_load(monkeypatch):
    require_embedded_model()
    from nbllm.engines import local

    class Broken(local.LocalEngine):
        name = "broken"

        def _load(self):
            raise EngineUnavailable("broken on purpose")

        async def _complete(self, request):
            raise AssertionError

    original = local.engine_class
    monkeypatch.setattr(local, "CPU_ORDER", ("onnx", "torch"))
    monkeypatch.setattr(local, "GPU_ORDER", ("onnx", "torch"))
    monkeypatch.setattr(
        local, "engine_class", lambda name: Broken if name == "onnx" else original(name)
    )
    monkeypatch.setattr(
        local, "engine_status", lambda name: local.EngineStatus(name, True, True, "cpu", "1")
    )
    skipped = []
    engine = create_local_engine("auto", None, on_skip=lambda n, r: skipped.append((n, r)))
    try:
        assert engine.name == "torch"
        assert skipped == [("onnx", "broken on purpose")]
    finally:
        asyncio.run(engine.aclose())


@pytest.mark.parametrize(
    ("option", "value"), [("batch_size", 0), ("batch_size", 2.5), ("batch_wait_s", -1)]
)
def test_bad_batch_options_fail_before_the_model_loads(option, value, monkeypatch):
    from nbllm.engines.local import base
    from nbllm.engines.local.torch import TorchEngine

    def no_model(model):
        raise AssertionError("the model should not be looked for")

    monkeypatch.setattr(base, "resolve_local_model", no_model)
    with pytest.raises(ConfigError, match=rf"^{option} must be .*, got {value}$"):
        TorchEngine(**{option: value})


def test_cpu_order_starts_with_an_engine_that_exists():
    assert set(CPU_ORDER) <= {"llamacpp", "onnx", "torch", "deepspeed"}


# -- sampling options ---------------------------------------------------------------------


def test_sampling_options_are_read_and_checked():
    generation = Generation.from_params({"max_tokens": 5, "temperature": 0.7, "stop": "\n"})
    assert generation == Generation(5, 0.7, 1.0, None, ("\n",))
    assert Generation.from_params({}).greedy
    with pytest.raises(RequestRejected, match="logprobs"):
        Generation.from_params({"logprobs": True})
    with pytest.raises(RequestRejected, match="max_tokens"):
        Generation.from_params({"max_tokens": 0})
    assert Generation(stop=("Paris",)).cut("It is Paris.") == "It is "


# -- generation ---------------------------------------------------------------------------


async def test_torch_answers_a_question(torch_engine):
    response = await torch_engine.complete(ask(PROMPTS[0], max_tokens=16))
    assert "Paris" in response.text
    assert response.model == EMBEDDED_MODEL
    assert response.prompt_tokens > 5 and 1 <= response.completion_tokens < 16
    assert response.finish_reason == "stop"  # the model ended it, well within max_tokens


async def test_concurrent_requests_are_batched_with_the_answers_they_get_alone(torch_engine):
    alone = [(await torch_engine.complete(ask(p, max_tokens=8))).text for p in PROMPTS]
    before = torch_engine._batcher.largest_batch
    together = await asyncio.gather(*(torch_engine.complete(ask(p, max_tokens=8)) for p in PROMPTS))
    assert torch_engine._batcher.largest_batch == 3 >= before
    # Left padding with an attention mask must not change a greedy answer.
    assert [r.text for r in together] == alone


async def test_a_two_turn_conversation_sees_its_earlier_answer(torch_engine):
    messages = [
        {"role": "user", "content": "My name is Ada. Remember it."},
        {"role": "assistant", "content": "Nice to meet you, Ada."},
        {"role": "user", "content": "What is my name?"},
    ]
    request = ChatRequest(EMBEDDED_MODEL, messages, {"max_tokens": 12})
    response = await torch_engine.complete(request)
    assert "Ada" in response.text


async def test_max_tokens_bounds_the_answer_and_says_so(torch_engine):
    response = await torch_engine.complete(ask("Write a long story about a cat.", max_tokens=3))
    assert response.completion_tokens == 3
    assert response.finish_reason == "length"
    # A stop string ends an answer as the model would: "stop", even at max_tokens.
    stopped = await torch_engine.complete(ask(PROMPTS[0], max_tokens=16, stop=["Paris"]))
    assert "Paris" not in stopped.text and stopped.finish_reason == "stop"


async def test_torch_reports_its_tokens_and_stops_a_cancelled_generation(torch_engine):
    heard: list[tuple[str, float | None, int]] = []
    generating = asyncio.Event()

    def on_phase(phase, done, total, detail):
        heard.append((phase, done, threading.get_ident()))
        generating.set()

    torch_engine.on_phase = on_phase
    try:
        before = torch_engine.tokens.count
        long = asyncio.ensure_future(torch_engine.complete(ask(COUNTING, max_tokens=400)))
        await asyncio.wait_for(generating.wait(), 60)
        # (A count from an earlier request may be heard late: wait for this one's tokens.)
        while torch_engine.tokens.count == before:
            await asyncio.sleep(0.01)
        long.cancel()
        with pytest.raises(asyncio.CancelledError):
            await long
        # The model runs one batch at a time: this answer comes once the cancelled one ended.
        after = await torch_engine.complete(ask(PROMPTS[1], max_tokens=2))
        cancelled = torch_engine.tokens.count - before - after.completion_tokens
        assert 1 <= cancelled < 100  # cut at its next token, not run to 400
        await asyncio.sleep(0.3)  # the last count arrives at most 0.25 s late
    finally:
        torch_engine.on_phase = None
    assert {phase for phase, _, _ in heard} == {"generating"}
    counts = [done for _, done, _ in heard]
    assert counts == sorted(counts) and counts[-1] == torch_engine.tokens.count
    assert {thread for _, _, thread in heard} == {threading.get_ident()}  # the loop's thread


async def test_a_seeded_sample_repeats(torch_engine):
    params = {"max_tokens": 6, "temperature": 1.0, "seed": 7}
    first = await torch_engine.complete(ask("Tell me a word.", **params))
    second = await torch_engine.complete(ask("Tell me a word.", **params))
    assert first.text == second.text


def test_a_local_engine_instance_names_its_model_in_the_rows(torch_engine):
    result = nbllm.run(
        [{"id": "a", "turns": ["What is 2 + 2?"]}],
        engine=torch_engine,
        max_tokens=8,
        checkpoint=False,
        cache=False,
        progress=False,
    )
    assert result.model == EMBEDDED_MODEL and list(result.df["model"]) == [EMBEDDED_MODEL]
    assert torch_engine.state.value != "closed"  # the caller's engine stays open


async def test_a_closed_engine_refuses_requests():
    require_embedded_model()
    from nbllm.engines.local.torch import TorchEngine

    engine = TorchEngine(batch_size=1)
    await engine.aclose()
    assert engine.hf_model is None  # the model is released
    with pytest.raises(nbllm.EngineError, match="closed"):
        await engine.complete(ask("Hi", max_tokens=2))


async def test_deepspeed_gives_the_greedy_answers_torch_gives(torch_engine):
    require_embedded_model("deepspeed")
    from nbllm.engines.local.deepspeed import DeepSpeedEngine

    engine = DeepSpeedEngine(batch_size=4, batch_wait_s=0.05)
    try:
        ours = await asyncio.gather(*(engine.complete(ask(p, max_tokens=8)) for p in PROMPTS))
        reference = await asyncio.gather(
            *(torch_engine.complete(ask(p, max_tokens=8)) for p in PROMPTS)
        )
        assert [r.text for r in ours] == [r.text for r in reference]
        assert engine.describe().startswith("deepspeed")
    finally:
        await engine.aclose()


# -- through nbllm.run ---------------------------------------------------------------------


def test_run_without_a_model_answers_multi_turn_conversations_locally():
    require_embedded_model()
    data = [
        {"id": "a", "turns": ["What is the capital of France?", "And of Italy?"]},
        {"id": "b", "turns": ["What is 2 + 2?"]},
    ]
    result = nbllm.run(data, engine="torch", max_tokens=12, progress=False)
    df = result.df
    assert list(df["turn"]) == [0, 1, 0] and df["error"].isna().all()
    assert "Paris" in df.loc[0, "answer"]
    assert set(df["engine"]) == {"torch"} and set(df["model"]) == {EMBEDDED_MODEL}
    assert (df["cost_usd"] == 0).all()
    # The second run of the same call reads every turn back from the checkpoint.
    again = nbllm.run(data, engine="torch", max_tokens=12, progress=False)
    assert again.df["resumed"].all() and list(again.df["answer"]) == list(df["answer"])


@pytest.mark.gpu
async def test_torch_on_the_gpu_answers_and_frees_its_memory():
    require_embedded_model()
    import torch

    from nbllm.engines.local.torch import TorchEngine

    engine = TorchEngine(device="cuda")
    response = await engine.complete(ask(PROMPTS[0], max_tokens=16))
    assert "Paris" in response.text
    await engine.aclose()
    assert torch.cuda.memory_allocated() < 50 * 2**20


@pytest.mark.gpu
async def test_deepspeed_with_kernel_injection_on_the_gpu():
    require_embedded_model("deepspeed")
    from nbllm.engines.local.deepspeed import DeepSpeedEngine

    engine = DeepSpeedEngine(device="cuda")
    try:
        response = await engine.complete(ask(PROMPTS[0], max_tokens=16))
        assert "Paris" in response.text
    finally:
        await engine.aclose()


@pytest.mark.gpu
async def test_vllm_answers_with_prefix_caching():
    require_embedded_model("vllm")
    from nbllm.engines.local.vllm import VllmEngine

    engine = VllmEngine()
    try:
        answers = await asyncio.gather(*(engine.complete(ask(p, max_tokens=16)) for p in PROMPTS))
        assert "Paris" in answers[0].text
    finally:
        await engine.aclose()


def test_a_worker_runs_the_model_in_a_child_process_and_stops():
    require_embedded_model()
    from nbllm.engines.worker import shared_worker

    data = [{"id": "a", "turns": ["What is the capital of France?", "And of Italy?"]}]
    try:
        result = nbllm.run(data, engine="torch", worker=True, max_tokens=12, progress=False)
        df = result.df
        assert df["error"].isna().all() and "Paris" in df.loc[0, "answer"]
        assert set(df["engine"]) == {"torch worker"}
        worker = shared_worker("torch", EMBEDDED_MODEL)  # the same worker, still running
        assert worker.running and worker.served_engine == "torch"
        assert worker.max_in_flight == hardware().default_batch_size  # as /ready says
        # A second run reuses it, and resumes from the checkpoint of the first.
        again = nbllm.run(data, engine="torch", worker=True, max_tokens=12, progress=False)
        assert again.df["resumed"].all()
        assert shared_worker("torch", EMBEDDED_MODEL) is worker
    finally:
        nbllm.stop_workers()
    assert not worker.running


def test_the_command_line_runs_the_embedded_model_without_a_model_option(tmp_path, capsys):
    require_embedded_model()
    from nbllm.cli import main

    data = tmp_path / "q.jsonl"
    data.write_text('{"id": "a", "turns": ["What is the capital of France?"]}\n')
    out = tmp_path / "answers.csv"
    code = main(["run", str(data), "--engine", "torch", "--max-tokens", "12", "--out", str(out)])
    assert code == 0
    answers = pd.read_csv(out)
    assert "Paris" in answers.loc[0, "answer"] and answers.loc[0, "engine"] == "torch"
    assert "turns_ok" in capsys.readouterr().out


async def test_out_of_memory_halves_the_batch_and_then_names_the_figures(monkeypatch):
    from nbllm.engines.local import base

    class Tight(BatchedEngine):
        """Fits batches of up to two prompts; a prompt of length 9 never fits."""

        name = "tight"

        def _load(self):
            self.batches = []

        def _generate(self, prompts, generation, watch):
            self.batches.append(len(prompts))
            if len(prompts) > 2 or any(len(p) == 9 for p in prompts):
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return [[len(p)] for p in prompts]

    monkeypatch.setattr(base, "resolve_local_model", lambda model: LocalModel("m", Path(".")))
    engine = Tight(batch_size=4, batch_wait_s=0.05)
    items = [_Request([1] * n, Generation(max_new_tokens=4)) for n in (1, 2, 3, 4)]
    assert engine._run_batch(items) == [[1], [2], [3], [4]]
    assert engine.batches == [4, 2, 2]
    with pytest.raises(nbllm.EngineError, match="out of memory generating one answer"):
        engine._run_batch([_Request([0] * 9, Generation(max_new_tokens=4))])
    await engine.aclose()


# -- timeouts, cancellation and progress, on a model that only counts ---------------------


class Stepper(BatchedEngine):
    """Generates one token per row per step, each step taking ``step_s``; loads nothing.

    A question that is a number N is answered with N tokens, then end-of-text.
    """

    name = "stepper"
    step_s = 0.01

    def _load(self):
        self.tokenizer = None
        self.batches: list[int] = []  # rows of each batch that started
        self.steps: list[int] = []  # steps each batch ran

    def encode(self, messages):
        question = messages[-1]["content"]
        return [int(question) if question.isdigit() else 10**6]

    def decode(self, ids):
        return " ".join(map(str, ids))

    def _generate(self, prompts, generation, watch):
        self.batches.append(len(prompts))
        rows: list[list[int]] = [[] for _ in prompts]
        live = [True] * len(prompts)
        steps = 0
        while steps < generation.max_new_tokens and any(live):
            time.sleep(self.step_s)
            steps += 1
            for row, alive in zip(rows, live, strict=True):
                if alive:
                    row.append(7)
            watch.generated(sum(live))
            ended = [len(row) >= prompt[0] for row, prompt in zip(rows, prompts, strict=True)]
            dropped = watch.dropped()
            live = [a and not (e or d) for a, e, d in zip(live, ended, dropped, strict=True)]
        self.steps.append(steps)
        return rows


@pytest.fixture
def stepper(monkeypatch):
    from nbllm.engines.local import base

    monkeypatch.setattr(base, "resolve_local_model", lambda model: LocalModel("m", Path(".")))
    engines: list[Stepper] = []

    def make(**options) -> Stepper:
        engines.append(Stepper(**options))
        return engines[-1]

    yield make
    for engine in engines:
        asyncio.run(engine.aclose())


async def test_a_queued_request_times_out_and_a_started_generation_never_does(stepper):
    engine = stepper(batch_size=1, batch_wait_s=0)
    assert engine.bounds_own_timeout  # the executor sets no timer of its own around it
    generating = asyncio.Event()
    engine.on_phase = lambda *_: generating.set()
    # 30 steps of 10 ms: six times the timeout of 50 ms.
    running = asyncio.ensure_future(engine.complete(ask("a", timeout=0.05, max_tokens=30)))
    await asyncio.wait_for(generating.wait(), 5)
    with pytest.raises(RequestTimeout, match="never started"):
        await engine.complete(ask("b", timeout=0.05, max_tokens=30))
    answer = await running
    assert answer.completion_tokens == 30 and answer.finish_reason == "length"
    # The generation ran once, to its end; the timed-out request never started.
    assert engine.batches == [1] and engine.steps == [30]


async def test_a_cancelled_request_is_dropped_from_its_running_batch(stepper):
    engine = stepper(batch_size=2, batch_wait_s=0.05)
    generating = asyncio.Event()
    engine.on_phase = lambda *_: generating.set()
    kept = asyncio.ensure_future(engine.complete(ask("20", max_tokens=1000)))
    dropped = asyncio.ensure_future(engine.complete(ask("endless", max_tokens=1000)))
    await asyncio.wait_for(generating.wait(), 5)
    dropped.cancel()
    with pytest.raises(asyncio.CancelledError):
        await dropped
    answer = await kept
    assert (answer.completion_tokens, answer.finish_reason) == (20, "stop")
    # One batch of both, ended with the row still wanted: not 1000 steps later.
    assert engine.batches == [2] and engine.steps == [20]


async def test_tokens_generated_so_far_reach_on_phase_on_the_loop_at_most_4_times_a_second(
    stepper,
):
    heard: list[tuple[str, float | None, float | None, int, float]] = []
    engine = stepper(batch_size=2, batch_wait_s=0.05)
    engine.on_phase = lambda phase, done, total, detail: heard.append(
        (phase, done, total, threading.get_ident(), time.monotonic())
    )
    started = time.monotonic()
    answers = await asyncio.gather(*(engine.complete(ask(q, max_tokens=60)) for q in "ab"))
    took = time.monotonic() - started
    await asyncio.sleep(0.3)  # the last count arrives at most 0.25 s late
    assert [phase for phase, *_ in heard] == ["generating"] * len(heard)
    counts = [done for _, done, *_ in heard]
    assert len(counts) >= 2 and counts == sorted(counts) and len(set(counts)) == len(counts)
    assert counts[-1] == sum(a.completion_tokens for a in answers) == 120
    assert {total for _, _, total, *_ in heard} == {None}
    assert {thread for *_, thread, _ in heard} == {threading.get_ident()}
    times = [t for *_, t in heard]
    assert all(later - earlier >= 0.24 for earlier, later in itertools.pairwise(times))
    assert len(heard) <= took / 0.25 + 2


async def test_a_local_engine_can_be_made_off_the_event_loop(stepper):
    heard: list[tuple[str, int]] = []
    engine = await asyncio.to_thread(
        stepper,
        batch_size=2,
        on_phase=lambda phase, *_: heard.append((phase, threading.get_ident())),
    )
    assert [phase for phase, _ in heard] == ["loading", "loading"]
    assert {thread for _, thread in heard} != {threading.get_ident()}
    answer = await engine.complete(ask("a", max_tokens=2))  # used on the loop afterwards
    assert answer.completion_tokens == 2


def test_choosing_torch_prints_nothing_and_imports_no_other_engine():
    require_embedded_model()
    script = (
        "import asyncio, sys\n"
        "from nbllm.engines.local import available, create_local_engine\n"
        "available()\n"
        "engine = create_local_engine('torch', None, batch_size=1)\n"
        "asyncio.run(engine.aclose())\n"
        "assert 'deepspeed' not in sys.modules, 'deepspeed was imported'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == ("", "")


def test_vllm_holds_its_decoding_to_the_schema_asked():
    from types import SimpleNamespace

    from nbllm.engines.local.vllm import guided

    class Params:
        def __init__(self, **kw: object) -> None:
            self.kw = kw

    schema = {"type": "object", "properties": {"year": {"type": "integer"}}}
    wire = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    newer = SimpleNamespace(StructuredOutputsParams=Params, GuidedDecodingParams=Params)
    ((kind, made),) = guided(newer, wire).items()
    assert kind == "structured_outputs" and made.kw == {"json": schema}
    ((kind, made),) = guided(SimpleNamespace(GuidedDecodingParams=Params), wire).items()
    assert kind == "guided_decoding" and made.kw == {"json": schema}
    ((kind, made),) = guided(newer, {"type": "json_object"}).items()
    assert made.kw == {"json_object": True}
    assert guided(newer, None) == {} and guided(SimpleNamespace(), wire) == {}


@pytest.mark.gpu
async def test_vllm_answers_json_that_follows_the_schema():
    require_embedded_model("vllm")
    from nbllm.engines.local.vllm import VllmEngine

    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    wire = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    engine = VllmEngine()
    try:
        request = ask(PROMPTS[0], max_tokens=32)
        request = dataclasses.replace(request, params={**request.params, "response_format": wire})
        answer = await engine.complete(request)
        assert isinstance(json.loads(answer.text)["city"], str)
    finally:
        await engine.aclose()


def test_vllm_takes_its_own_parallel_options_and_refuses_bad_ones(monkeypatch):
    """tensor/pipeline parallel sizes and vLLM's executor backend reach vLLM's engine args
    (a stand-in vllm module here: vLLM itself needs a GPU)."""
    from types import SimpleNamespace

    from nbllm.engines.local import vllm as vllm_module
    from nbllm.engines.local.vllm import VllmEngine

    with pytest.raises(ConfigError, match="tensor_parallel_size must be a whole number >= 1"):
        VllmEngine(tensor_parallel_size=0)
    seen: dict[str, object] = {}

    class Args:
        def __init__(self, **kw: object) -> None:
            seen.update(kw)

    class Loaded:
        @staticmethod
        def from_engine_args(args: object) -> object:
            return SimpleNamespace()

    fake = SimpleNamespace(AsyncEngineArgs=Args, AsyncLLMEngine=Loaded)
    tokenizers = SimpleNamespace(
        AutoTokenizer=SimpleNamespace(from_pretrained=lambda path: SimpleNamespace())
    )
    monkeypatch.setattr(VllmEngine, "_prepare", lambda self: setattr(self, "checkpoint", "m"))
    monkeypatch.setattr(
        vllm_module, "require", lambda name, *_: fake if name == "vllm" else tokenizers
    )
    monkeypatch.setattr(vllm_module, "_max_model_len", lambda engine: 2048)
    VllmEngine(tensor_parallel_size=2, pipeline_parallel_size=3, distributed_executor_backend="ray")
    assert seen["tensor_parallel_size"] == 2
    assert seen["pipeline_parallel_size"] == 3
    assert seen["distributed_executor_backend"] == "ray"
    assert seen["enable_prefix_caching"] is True
