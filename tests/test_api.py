"""nbllm.run / nbllm.arun: options, validation before any request, event loops, interruption."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import nbllm
import nbllm.prepare
from nbllm import ChatRequest, ConfigError, DatasetError, FakeEngine, RetryPolicy
from nbllm.executor.events import EnginePhase, Event, RequestSent, RunStarted, StopRequested

RECORDS = [
    {"id": "a", "turns": ["What is 2+2?", "And times 3?"], "references": ["4", "12"]},
    {"id": "b", "turns": ["Capital of France?"], "context": "Geography quiz."},
]


def test_run_returns_one_row_per_turn_with_the_documented_columns():
    result = nbllm.run(RECORDS, engine=FakeEngine(), model="fake-model", progress=False)
    assert list(result.df.columns) == [
        "conversation_id", "turn", "question", "answer", "parsed", "reference", "model", "engine",
        "deployment", "latency_s", "queue_s", "service_s", "prompt_tokens", "cached_tokens",
        "completion_tokens", "finish_reason", "cost_usd", "saved_usd", "attempts", "error",
        "started_at", "finished_at", "cached", "resumed",
    ]  # fmt: skip
    assert list(result.df["conversation_id"]) == ["a", "a", "b"]
    assert list(result.df["turn"]) == [0, 1, 0]
    assert list(result.df["reference"][:2]) == ["4", "12"]
    assert set(result.df["engine"]) == {"fake"}
    s = result.summary
    assert (s.conversations, s.turns, s.turns_ok, s.turns_failed) == (2, 3, 3, 0)
    assert s.latency_p50 is not None and s.latency_p50 <= s.latency_p95 <= s.latency_p99
    assert s.requests_per_s > 0 and s.tokens_per_s > 0
    assert s.retries == 0
    assert "turns_ok" in str(s)


async def test_arun_is_awaitable_on_the_callers_loop():
    result = await nbllm.arun(RECORDS, engine=FakeEngine(), model="m", progress=False)
    assert result.summary.turns_ok == 3


async def test_run_works_inside_an_already_running_loop():
    """As in a Jupyter cell: a loop is running in this thread and run() still blocks and returns."""
    result = nbllm.run(RECORDS, engine=FakeEngine(latency=0.01), model="m", progress=False)
    assert result.summary.turns_ok == 3


def test_run_works_in_a_plain_script(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(
        textwrap.dedent(
            """
            import nbllm
            data = [{"id": i, "turns": ["hi", "again"]} for i in range(5)]
            result = nbllm.run(data, engine=nbllm.FakeEngine(), model="m")
            print(result.summary.turns_ok)
            """
        )
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "10"


def sigint_twice() -> None:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.1)
    os.kill(os.getpid(), signal.SIGINT)


async def test_ctrl_c_inside_a_running_loop_lets_the_requests_in_flight_finish():
    sent = threading.Event()
    events: list[Event] = []

    async def handler(request: ChatRequest) -> str:
        if request.messages[-1]["content"] == "again":
            sent.set()
            await asyncio.sleep(0.3)
        return "answer"

    def interrupt() -> None:
        if sent.wait(10):
            os.kill(os.getpid(), signal.SIGINT)

    data = [{"id": i, "turns": ["hi", "again", "more"]} for i in range(3)]
    threading.Thread(target=interrupt, daemon=True).start()
    result = nbllm.run(
        data, engine=FakeEngine(handler), model="m", progress=False, listeners=[events.append]
    )
    assert result.interrupted
    # Every request sent was answered and kept; the third turns never went.
    assert result.summary.turns_ok == sum(isinstance(e, RequestSent) for e in events) >= 4
    assert (result.df[result.df["turn"] == 2]["error"].str.startswith("not run")).all()
    assert sum(isinstance(e, StopRequested) for e in events) == 1


async def test_a_second_ctrl_c_inside_a_running_loop_cancels_the_requests_in_flight():
    started = threading.Event()

    waiting = []

    async def handler(request: ChatRequest) -> str:
        if request.messages[-1]["content"] == "again":
            waiting.append(1)
            if len(waiting) == 3:  # every first turn is done
                started.set()
            await asyncio.sleep(30)
        return "answer"

    data = [{"id": i, "turns": ["hi", "again"]} for i in range(3)]
    threading.Thread(target=lambda: started.wait(10) and sigint_twice(), daemon=True).start()
    t0 = time.perf_counter()
    result = nbllm.run(data, engine=FakeEngine(handler), model="m", progress=False)
    assert time.perf_counter() - t0 < 5  # not the 10 s grace of a first Ctrl-C
    assert result.interrupted
    assert result.summary.turns_ok == 3
    assert result.summary.turns == 6


def test_ctrl_c_twice_in_a_plain_script_returns_what_finished(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio, os, signal, threading
            import nbllm

            waiting = []

            def interrupt_twice():
                os.kill(os.getpid(), signal.SIGINT)  # the requests in flight may finish...
                asyncio.get_running_loop().call_later(0.1, os.kill, os.getpid(), signal.SIGINT)

            async def handler(request):
                if request.messages[-1]["content"] == "again":
                    waiting.append(1)
                    if len(waiting) == 3:  # every first turn is done
                        interrupt_twice()  # ...until the second Ctrl-C cancels them
                    await asyncio.sleep(30)
                return "answer"

            data = [{"id": i, "turns": ["hi", "again"]} for i in range(3)]
            result = nbllm.run(data, engine=nbllm.FakeEngine(handler), model="m", progress=False)
            print(result.interrupted, result.summary.turns_ok, result.summary.turns)
            """
        )
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == ["True", "3", "6"]
    # No progress shows the stop, so stderr says what each Ctrl-C did.
    assert out.stderr.splitlines() == [
        "nbllm: stopping: no new requests; those in flight may finish (up to 10 s); "
        "interrupt again to cancel them",
        "nbllm: stopping: cancelling the requests in flight",
    ]


def test_unknown_keywords_are_sampling_parameters():
    seen: list[dict] = []

    def handler(request: ChatRequest) -> str:
        seen.append(dict(request.params))
        return "ok"

    nbllm.run(
        RECORDS[1:], engine=FakeEngine(handler), model="m", progress=False,
        max_tokens=64, temperature=0, top_p=0.5, seed=7,
    )  # fmt: skip
    assert seen == [{"max_tokens": 64, "temperature": 0, "top_p": 0.5, "seed": 7}]


def test_system_prompt_comes_first_then_context():
    seen: list[list[dict]] = []

    def handler(request: ChatRequest) -> str:
        seen.append(list(request.messages))
        return "ok"

    nbllm.run(RECORDS[1:], engine=FakeEngine(handler), model="m", system="Be terse.")
    assert seen[0][0] == {"role": "system", "content": "Be terse.\n\nGeography quiz."}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"concurrency": 0}, "concurrency= expected a whole number >= 1"),
        ({"concurrency": 2.5}, "concurrency="),
        ({"rpm": -5}, "rpm= expected a number > 0"),
        ({"tpm": "lots"}, "tpm="),
        ({"timeout": 0}, "timeout="),
        ({"retries": -1}, "retries="),
        ({"max_tokens": 0}, "max_tokens="),
        ({"temperature": 3}, "temperature= expected a number between 0 and 2"),
        ({"api_base": "localhost:8000"}, "api_base= expected an http"),
        ({"engine": "gpt"}, "engine= expected one of auto, openai, litellm"),
        ({"checkpoint": 3}, "checkpoint= expected True, False or a path"),
        ({"cache": 1.5}, "cache= expected True, False, 'always' or a path"),
        ({"resume": "yes"}, "resume= expected True or False"),
        ({"progress": "yes"}, "progress="),
    ],
)
def test_bad_options_fail_before_any_request(options, message):
    engine = FakeEngine()
    if options.get("engine") == "gpt":
        engine = options.pop("engine")
    with pytest.raises(ConfigError, match=message):
        nbllm.run(RECORDS, model="m", engine=engine, **options)
    assert not isinstance(engine, FakeEngine) or engine.calls == 0


@pytest.mark.parametrize(
    ("engine", "hint"),
    [("pytorch", "torch"), ("tourch", "torch"), ("onnxruntime", "onnx"), ("llama.cpp", "llamacpp")],
)
def test_an_unknown_engine_is_named_with_the_closest_one_before_anything_else(engine, hint):
    # Without model=, the missing model is not the error to report: the engine is.
    with pytest.raises(
        ConfigError, match=rf"got '{re.escape(engine)}' \(did you mean '{hint}'\?\)$"
    ):
        nbllm.run(RECORDS, engine=engine)


def test_model_is_required_for_a_named_engine():
    with pytest.raises(ConfigError, match="model= is required"):
        nbllm.run(RECORDS, engine="litellm")


def test_bad_data_fails_before_any_request():
    engine = FakeEngine()
    with pytest.raises(DatasetError):
        nbllm.run([{"id": "x", "turns": []}], model="m", engine=engine)
    assert engine.calls == 0


def test_openai_engine_needs_an_api_base():
    with pytest.raises(ConfigError, match="needs api_base"):
        nbllm.run(RECORDS, model="gpt-4o-mini", engine="openai")


def test_retries_accepts_a_policy():
    calls = 0

    def handler(request: ChatRequest) -> str:
        nonlocal calls
        calls += 1
        raise nbllm.ServerError("HTTP 502", status=502)

    result = nbllm.run(
        RECORDS[1:], engine=FakeEngine(handler), model="m",
        retries=RetryPolicy(retries=2, initial=0), progress=False,
    )  # fmt: skip
    assert calls == 3
    assert result.df["attempts"].tolist() == [3]


def test_the_api_key_never_shows_in_the_config():
    config = nbllm.RunConfig(model="m", api_key="sk-sentinel-secret")
    for shown in (repr(config), str(config), config.model_dump(), config.model_dump_json()):
        assert "sk-sentinel-secret" not in str(shown)
    assert config.api_key is not None
    assert config.api_key.get_secret_value() == "sk-sentinel-secret"  # opting in reads it


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"concurrency": 0}, "concurrency= expected a whole number >= 1 or 'auto', got 0"),
        ({"concurrency": True}, "concurrency= expected a whole number >= 1 or 'auto', got True"),
        ({"concurrency": "8"}, "concurrency= expected a whole number >= 1 or 'auto', got '8'"),
        ({"max_conversations": 1.0}, "max_conversations= expected a whole number >= 1 or None"),
        ({"rpm": False}, "rpm= expected a number > 0, 'auto' or None, got False"),
        ({"tpm": float("inf")}, "tpm= expected a number > 0, 'auto' or None, got inf"),
        ({"timeout": float("nan")}, "timeout= expected a number > 0 or None, got nan"),
        ({"retries": True}, "retries= expected a whole number >= 0 or a RetryPolicy, got True"),
        ({"temperature": -0.1}, "temperature= expected a number between 0 and 2 or None"),
        ({"max_tokens": 1.5}, "max_tokens= expected a whole number >= 1 or None, got 1.5"),
        ({"model": "  "}, "model= expected a model name such as 'openai/gpt-4o-mini'"),
        ({"api_base": "ftp://host"}, "api_base= expected an http(s) URL"),
        ({"api_key": 12345}, "api_key= expected a string, got a int"),
        ({"system": ["be terse"]}, "system= expected a string or None"),
        ({"progress": 1}, "progress= expected True, False or None (automatic), got 1"),
        ({"resume": None}, "resume= expected True or False, got None"),
        ({"worker": "yes"}, "worker= expected True, False or None (automatic)"),
        ({"checkpoint": 3}, "checkpoint= expected True, False or a path, got 3"),
        ({"cache": 1.5}, "cache= expected True, False, 'always' or a path, got 1.5"),
        ({"listeners": [42]}, "listeners= expected a list of callables, got [42]"),
        ({"params": ["top_p"]}, "params= expected a dict, got ['top_p']"),
        ({"colour": "blue"}, "colour= is not a run option; the options are model, api_base"),
    ],
)
def test_a_bad_option_is_refused_in_one_line_that_names_it(options, message):
    with pytest.raises(ConfigError) as caught:
        nbllm.RunConfig(**options)
    text = str(caught.value)
    assert text.startswith(message)
    assert "\n" not in text
    assert caught.value.__cause__ is None  # no pydantic report behind the one line


def test_the_config_is_frozen_and_keeps_numbers_as_given():
    config = nbllm.RunConfig(model="m", temperature=0, rpm=500, listeners=[print])
    assert (config.temperature, config.rpm) == (0, 500)
    assert isinstance(config.temperature, int)  # cache keys and fingerprints see 0, not 0.0
    assert config.listeners == (print,)
    assert config.sampling_params == {"temperature": 0}
    assert config.retry_policy == RetryPolicy(retries=5)
    with pytest.raises(ValueError, match="frozen"):
        config.concurrency = 1


def test_progress_bar_draws_to_stderr(capsys):
    nbllm.run(RECORDS, engine=FakeEngine(), model="m", progress=True)
    err = capsys.readouterr().err
    assert "3/3" in err


def test_plot_draws_a_figure():
    pytest.importorskip("matplotlib")
    result = nbllm.run(RECORDS, engine=FakeEngine(latency=0.01), model="m", progress=False)
    fig = result.plot()
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [
        "latency of answered turns, by turn",
        "turns in flight (first send to answer)",
        "throughput",
    ]  # and "GPU utilisation" only when a GPU was sampled (tests/ui/test_plots.py)


def test_plot_draws_gpu_use_when_it_was_sampled():
    pytest.importorskip("matplotlib")
    from nbllm.ui.gpu import GpuSample
    from nbllm.ui.plots import _in_flight

    result = nbllm.run(RECORDS, engine=FakeEngine(latency=0.01), model="m", progress=False)
    t = result.started_at
    result.gpu_samples = [GpuSample(0, "H100", t + i, utilization_pct=10.0 * i) for i in range(5)]
    fig = result.plot()
    (line,) = fig.axes[3].get_lines()
    assert list(line.get_ydata()) == [0.0, 10.0, 20.0, 30.0, 40.0]
    assert _in_flight([(0, 2), (1, 3)], [0, 1, 2, 3]) == [1, 2, 1, 0]


def test_in_a_notebook_the_run_shows_a_live_dashboard(monkeypatch):
    import IPython.display

    from nbllm.ui import frontend
    from nbllm.ui.dashboard import Dashboard

    shown = []
    monkeypatch.setattr(frontend, "_in_notebook", lambda: True)
    monkeypatch.setattr(IPython.display, "display", shown.append)
    result = nbllm.run(RECORDS, engine=FakeEngine(), model="m", progress=None)
    assert result.summary.turns_ok == 3
    (dashboard,) = shown
    assert isinstance(dashboard, Dashboard)
    assert dashboard.turns_bar.value == dashboard.turns_bar.max == 3
    assert dashboard.turns_bar.bar_style == "success"
    assert dashboard.stop_button is None  # a blocking cell offers the kernel's interrupt


def test_progress_false_shows_nothing_even_in_a_notebook(monkeypatch):
    import IPython.display

    from nbllm.ui import frontend

    shown = []
    monkeypatch.setattr(frontend, "_in_notebook", lambda: True)
    monkeypatch.setattr(IPython.display, "display", shown.append)
    nbllm.run(RECORDS, engine=FakeEngine(), model="m", progress=False)
    assert shown == []


def test_an_engine_that_only_queues_beyond_a_batch_caps_the_requests_in_flight():
    """A local model takes max_in_flight at once; more would wait, and time out, in its queue."""
    import asyncio

    state = {"now": 0, "peak": 0}

    async def handler(request):
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        await asyncio.sleep(0.01)
        state["now"] -= 1
        return "ok"

    engine = FakeEngine(handler)
    engine.max_in_flight = 3
    records = [{"id": i, "turns": ["a", "b"]} for i in range(12)]
    result = nbllm.run(records, engine=engine, concurrency=32, checkpoint=False, cache=False)
    assert result.summary.turns_ok == 24
    assert state["peak"] == 3


def test_the_engines_preparation_reaches_the_listeners_before_the_run_starts(monkeypatch):
    events: list[Event] = []

    def create_engine(engine, *, on_phase, **options):
        on_phase("converting", None, None, "model.safetensors")
        on_phase("loading", 3, 3, "")
        return FakeEngine()

    monkeypatch.setattr(nbllm.prepare, "create_engine", create_engine)
    # A local engine (no provider key to look for), as the phases come from one.
    nbllm.run(RECORDS, engine="torch", model="m", progress=False, listeners=[events.append])
    phases = [(e.phase, e.done, e.total, e.detail) for e in events[:2]]
    assert phases == [("converting", None, None, "model.safetensors"), ("loading", 3, 3, "")]
    assert all(isinstance(e, EnginePhase) for e in events[:2])
    assert isinstance(events[2], RunStarted)


async def test_cancelling_arun_cancels_at_once_and_checkpoints_every_answer(tmp_path):
    finished = asyncio.Event()
    turns_done: list[Event] = []
    hang = [True]

    async def handler(request: ChatRequest) -> str:
        if request.messages[-1]["content"] == "again" and hang[0]:
            await asyncio.sleep(30)  # in flight when the task is cancelled
        return "answer"

    def listener(event: Event) -> None:
        if type(event).__name__ == "TurnFinished":
            turns_done.append(event)
            if len(turns_done) == 3:
                finished.set()

    data = [{"id": i, "turns": ["hi", "again"]} for i in range(3)]
    options = {"model": "m", "progress": False, "checkpoint": tmp_path / "ckpt.sqlite"}
    engine = FakeEngine(handler)
    task = asyncio.create_task(nbllm.arun(data, engine=engine, listeners=[listener], **options))
    await asyncio.wait_for(finished.wait(), 10)
    task.cancel()
    result = await asyncio.wait_for(task, 5)  # no grace: a cancelled task ends now
    assert result.interrupted and result.summary.turns_ok == 3

    hang[0] = False
    again = await nbllm.arun(data, engine=FakeEngine(handler), **options)
    assert again.summary.resumed == 3 and again.summary.turns_ok == 6


def test_a_run_that_cannot_start_closes_the_view_it_showed(tmp_path):
    """A dashboard shown before the checkpoint was refused must not wait for a run."""
    from nbllm.api import prepare_run

    closed = []

    class View:
        def __call__(self, event: Event) -> None:
            pass

        def close(self) -> None:
            closed.append(True)

    damaged = tmp_path / "checkpoint.sqlite"
    damaged.write_bytes(b"not a database, " * 64)
    config = nbllm.RunConfig(model="m", engine=FakeEngine(), checkpoint=str(damaged))
    with pytest.raises(nbllm.CheckpointError):
        prepare_run(RECORDS, config, make_view=lambda stop: View())
    assert closed == [True]


class _Loaded(FakeEngine):
    """A made engine, as a local model would be: the run owns it and must close it."""

    def __init__(self, closed: list[str]) -> None:
        super().__init__()
        self._closed = closed

    async def aclose(self) -> None:
        self._closed.append("closed")
        await super().aclose()


def _damaged_checkpoint(tmp_path) -> str:
    damaged = tmp_path / "checkpoint.sqlite"
    damaged.write_bytes(b"not a database, " * 64)
    return str(damaged)


def test_a_refused_checkpoint_closes_the_engine_made_for_the_run(tmp_path, monkeypatch):
    closed: list[str] = []
    monkeypatch.setattr(nbllm.prepare, "create_engine", lambda engine, **_: _Loaded(closed))
    with pytest.raises(nbllm.CheckpointError):
        nbllm.run(RECORDS, engine="torch", progress=False, checkpoint=_damaged_checkpoint(tmp_path))
    assert closed == ["closed"]


async def test_arun_closes_the_engine_when_the_checkpoint_is_refused(tmp_path, monkeypatch):
    closed: list[str] = []
    monkeypatch.setattr(nbllm.prepare, "create_engine", lambda engine, **_: _Loaded(closed))
    with pytest.raises(nbllm.CheckpointError):
        await nbllm.arun(
            RECORDS, engine="torch", progress=False, checkpoint=_damaged_checkpoint(tmp_path)
        )
    assert closed == ["closed"]


def test_an_engine_given_by_the_caller_stays_open_when_the_checkpoint_is_refused(tmp_path):
    closed: list[str] = []
    engine = _Loaded(closed)
    with pytest.raises(nbllm.CheckpointError):
        nbllm.run(RECORDS, model="m", engine=engine, checkpoint=_damaged_checkpoint(tmp_path))
    assert closed == []


async def test_arun_loads_the_engine_off_the_loop_and_tells_its_phases_on_it(monkeypatch):
    """A local model loading (here 0.5 s of blocking work) must not stop the caller's loop:
    a kernel's widgets and other tasks go on, and the dashboard hears "loading" live."""
    loop_thread = threading.get_ident()
    heard: list[tuple[str, int]] = []

    def slow_engine(engine, *, on_phase, **options):
        on_phase("loading", None, None, "a slow model")
        time.sleep(0.5)  # blocking, as a model load is
        on_phase("loading", 1, 1, "loaded")
        return FakeEngine()

    def listener(event: Event) -> None:
        if isinstance(event, EnginePhase):
            heard.append((event.phase, threading.get_ident()))

    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    monkeypatch.setattr(nbllm.prepare, "create_engine", slow_engine)
    ticker = asyncio.create_task(tick())
    try:
        options = {"engine": "torch", "progress": False, "checkpoint": False, "cache": False}
        result = await nbllm.arun(RECORDS, listeners=[listener], **options)
    finally:
        ticker.cancel()
    assert result.summary.turns_ok == 3
    assert ticks >= 10  # about 50 while the model loaded; none if it had blocked the loop
    assert heard == [("loading", loop_thread), ("loading", loop_thread)]


async def test_cancelling_arun_while_the_model_loads_closes_it_once_loaded(monkeypatch):
    closed: list[str] = []
    loading = threading.Event()

    def slow_engine(engine, **options):
        loading.set()
        time.sleep(0.3)
        return _Loaded(closed)

    monkeypatch.setattr(nbllm.prepare, "create_engine", slow_engine)
    options = {"engine": "torch", "progress": False, "checkpoint": False, "cache": False}
    task = asyncio.create_task(nbllm.arun(RECORDS, **options))
    while not loading.is_set():
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(200):  # the load goes on in its thread; the engine is closed after it
        if closed:
            break
        await asyncio.sleep(0.01)
    assert closed == ["closed"]


class _Picked(FakeEngine):
    """What ``auto`` picked for a local model this time: its name and identity differ."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def identity(self) -> str:
        return f"{self.name} weights"


def test_a_changed_auto_pick_for_a_local_model_resumes_the_checkpoint(tmp_path, monkeypatch):
    """Installing llama.cpp between two runs changes what auto picks; the second run still
    resumes the first one's checkpoint (not answers from the cache), and every row names the
    engine that answered it."""
    picks = iter(["torch", "llamacpp"])
    monkeypatch.setattr(nbllm.prepare, "create_engine", lambda engine, **_: _Picked(next(picks)))
    options = {"checkpoint": True, "cache": str(tmp_path / "cache.sqlite"), "progress": False}
    monkeypatch.setenv("NBLLM_DIR", str(tmp_path))
    data = [{"id": "a", "turns": ["one", "two"]}, {"id": "b", "turns": ["three"]}]
    first = nbllm.run(data, **options)
    assert first.summary.turns_ok == 3 and set(first.df["engine"]) == {"torch"}
    again = nbllm.run(data, **options)
    assert again.summary.resumed == 3 and again.summary.cached == 0
    assert set(again.df["engine"]) == {"torch"}


def test_under_auto_a_servers_address_stays_in_the_fingerprint(tmp_path, monkeypatch):
    """For a server, auto's pick follows from the options: another server is another run."""
    picks = iter(["openai", "openai"])
    identities = iter(["openai http://a/v1", "openai http://b/v1"])

    class _Server(_Picked):
        def identity(self) -> str:
            return self.ident

    def make(engine, **_):
        made = _Server(next(picks))
        made.ident = next(identities)
        return made

    monkeypatch.setattr(nbllm.prepare, "create_engine", make)
    monkeypatch.setenv("NBLLM_DIR", str(tmp_path))
    options = {"model": "m", "api_base": "http://a/v1", "cache": False, "progress": False}
    data = [{"id": "a", "turns": ["one"]}]
    assert nbllm.run(data, **options).summary.resumed == 0
    assert nbllm.run(data, **options).summary.resumed == 0


def test_without_a_checkpoint_the_cache_commits_each_answer_at_once(tmp_path):
    """The cache is then what a re-run reads: an answer is on disk before the next turn of
    its conversation is asked, not a batch later."""
    import sqlite3

    path = tmp_path / "cache.sqlite"
    seen: list[int] = []

    def answer(request: ChatRequest) -> str:
        if len(request.messages) > 1:  # the second turn: the first answer is on disk
            with sqlite3.connect(path) as conn:
                seen.append(conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0])
        return "ok"

    engine = FakeEngine(answer, latency=0.02)
    result = nbllm.run(
        [{"id": "a", "turns": ["one", "two"]}],
        engine=engine,
        checkpoint=False,
        cache=str(path),
        progress=False,
    )
    assert result.summary.turns_ok == 2
    assert seen == [1]


def test_each_row_names_the_deployment_that_answered_and_resumed_rows_keep_it(tmp_path):
    from nbllm.testing import TestServer

    with TestServer() as server:
        port = server.url.split(":")[2].split("/")[0]
        options = {"model": "openai/nbllm-test", "api_base": server.url, "progress": False}
        first = nbllm.run(RECORDS, checkpoint=tmp_path / "ck", **options)
        again = nbllm.run(RECORDS, checkpoint=tmp_path / "ck", **options)
    assert set(first.df["deployment"]) == {f"nbllm-test@127.0.0.1:{port}"}
    assert again.df["resumed"].all()
    assert list(again.df["deployment"]) == list(first.df["deployment"])
    local = nbllm.run(RECORDS, engine=FakeEngine(), model="m", checkpoint=False, progress=False)
    assert set(local.df["deployment"]) == {"m"}
