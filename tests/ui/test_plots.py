"""``RunResult.plot()`` / ``plot_result``: the panels a run has, whatever rows it holds."""

from __future__ import annotations

import pytest
from IPython.core.interactiveshell import InteractiveShell
from matplotlib.figure import Figure
from traitlets.config import Config

import nbllm
from nbllm.engines import FakeEngine
from nbllm.errors import ConnectionFailed
from nbllm.results import RunResult
from nbllm.types import NOT_RUN, TurnRecord
from nbllm.ui.gpu import GpuSample
from nbllm.ui.plots import MAX_BINS, TURNS_PER_BIN, RunFigure, _throughput_bins, plot_result

RECORDS = [{"id": i, "turns": [f"q{i}a", f"q{i}b"]} for i in range(6)]
TIME_PANELS = ["turns in flight (first send to answer)", "throughput"]
LATENCY = "latency of answered turns, by turn"


def titles(fig: Figure) -> list[str]:
    return [ax.get_title() for ax in fig.axes]


def note(fig: Figure) -> str | None:
    label = fig._supxlabel  # the one line under the figure
    return None if label is None else label.get_text()


def texts(fig: Figure) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def run(**options) -> RunResult:
    options.setdefault("engine", FakeEngine(latency=0.01))
    return nbllm.run(RECORDS, model="m", progress=False, **options)


def test_a_run_without_gpu_samples_has_no_gpu_panel():
    fig = run().plot()
    assert isinstance(fig, RunFigure) and isinstance(fig, Figure)
    assert titles(fig) == [LATENCY, *TIME_PANELS]
    assert note(fig) is None
    assert texts(fig) == []  # every panel drew something
    (stairs,) = fig.axes[2].patches
    assert sum(stairs.get_data().values) > 0


def test_gpu_samples_add_a_panel_on_the_same_time_axis():
    result = run()
    t = result.started_at
    result.gpu_samples = [GpuSample(0, "H100", t + i, utilization_pct=10.0 * i) for i in range(5)]
    fig = result.plot()
    assert titles(fig) == [LATENCY, *TIME_PANELS, "GPU utilisation"]
    (line,) = fig.axes[3].get_lines()
    assert list(line.get_ydata()) == [0.0, 10.0, 20.0, 30.0, 40.0]
    assert fig.axes[3].get_shared_x_axes().joined(fig.axes[1], fig.axes[3])


def test_samples_without_utilisation_draw_no_gpu_panel():
    result = run()
    result.gpu_samples = [GpuSample(0, "H100", result.started_at, memory_used_mib=10.0)]
    assert titles(result.plot()) == [LATENCY, *TIME_PANELS]


def test_a_fully_resumed_run_draws_with_a_note(tmp_path):
    first = run(checkpoint=tmp_path / "ckpt")
    again = run(checkpoint=tmp_path / "ckpt")
    assert again.df["resumed"].all()
    fig = again.plot()  # resumed rows' times are the first run's: before this run started
    assert titles(fig) == [LATENCY, *TIME_PANELS]
    assert note(fig) == "not in the time panels (no request in this run): 12 resumed rows"
    assert "no request was sent in this run" in texts(fig)
    assert first.plot() is not None


def test_rows_from_an_earlier_run_are_left_out_of_a_partly_resumed_run():
    t0 = 1_000.0
    earlier = TurnRecord(
        "a", 0, "q", answer="x", attempts=1, latency_s=1.0, started_at=5.0, finished_at=6.0,
        resumed=True,
    )  # fmt: skip
    now = TurnRecord(
        "a", 1, "q", answer="y", attempts=1, latency_s=0.5, started_at=t0 + 1, finished_at=t0 + 1.5
    )
    late = TurnRecord("b", 0, "q", answer="z", attempts=1, started_at=t0, finished_at=t0 + 900)
    result = RunResult([earlier, now, late], conversations=2, wall_s=2.0, started_at=t0)
    fig = plot_result(result)
    assert note(fig) == "not in the time panels (no request in this run): 1 resumed row"
    assert fig.axes[1].get_xlim() == (0.0, 900.0)  # a turn past wall_s widens the axis
    counts = fig.axes[2].patches[0].get_data().values
    assert sum(counts) * (900.0 / len(counts)) == pytest.approx(2)


def test_a_cached_run_draws_with_a_note():
    run(checkpoint=False)
    again = run(checkpoint=False)
    assert again.df["cached"].all()
    fig = again.plot()
    assert note(fig) == "not in the time panels (no request in this run): 12 cached rows"


def test_a_run_where_every_turn_failed_draws_its_failures():
    def refuse(request):
        raise ConnectionFailed("connection refused")

    result = run(engine=FakeEngine(refuse), retries=0, checkpoint=False)
    assert result.summary.turns_ok == 0
    fig = result.plot()
    assert titles(fig) == [LATENCY, *TIME_PANELS]
    assert "no turn was answered in this run" in texts(fig)
    labels = [patch.get_label() for patch in fig.axes[2].patches]
    assert labels and all(label.startswith("failed") for label in labels)


def test_an_empty_result_draws():
    fig = RunResult([], conversations=0, wall_s=0.0, started_at=0.0).plot()
    assert titles(fig) == [LATENCY, *TIME_PANELS]
    assert note(fig) is None


@pytest.mark.parametrize(("finished", "bins"), [(1, 1), (20, 2), (180, 22), (100_000, MAX_BINS)])
def test_throughput_bins_hold_several_turns_each(finished, bins):
    edges = _throughput_bins([0.0] * finished, 2.0)
    assert len(edges) == bins + 1
    assert (edges[0], edges[-1]) == (0.0, 2.0)
    assert finished / bins >= min(TURNS_PER_BIN, finished)


@pytest.fixture
def shell():
    config = Config()
    config.HistoryManager.enabled = False
    ip = InteractiveShell.instance(config=config)
    png = ip.display_formatter.formatters["image/png"]
    before = dict(png.type_printers)
    # A plot drawn in an earlier test, while this shell (one per process) existed, set one.
    png.type_printers.pop(RunFigure, None)
    yield ip
    png.type_printers.clear()
    png.type_printers.update(before)


def test_in_ipython_the_figure_shows_as_one_png(shell):
    fig = run().plot()
    data, _ = shell.display_formatter.format(fig)
    assert data["image/png"]
    assert set(data) == {"text/plain", "image/png"}


def test_a_png_formatter_already_there_is_kept(shell):
    png = shell.display_formatter.formatters["image/png"]

    def mine(fig):
        return b"mine"

    png.for_type(Figure, mine)  # as %matplotlib inline does
    fig = run().plot()
    assert png.for_type(RunFigure) is mine
    assert RunFigure not in png.type_printers
    assert shell.display_formatter.format(fig)[0]["image/png"] == b"mine"


def test_other_figures_are_left_to_their_backend(shell):
    run().plot()
    data, _ = shell.display_formatter.format(Figure())
    assert "image/png" not in data


def test_turns_not_run_and_never_sent_are_named_apart():
    t0 = 1_000.0
    sent = TurnRecord("a", 0, "q", answer="x", attempts=1, started_at=t0, finished_at=t0 + 1)
    stopped = [TurnRecord(c, 0, "q", error=f"{NOT_RUN}: the run was stopped") for c in "bc"]
    skipped = TurnRecord("a", 1, "q", error="skipped: an earlier turn failed")
    result = RunResult([sent, *stopped, skipped], conversations=3, wall_s=1.0, started_at=t0)
    fig = plot_result(result)
    assert note(fig) == (
        "not in the time panels (no request in this run): 2 not run, 1 never sent rows"
    )


def test_auto_limits_are_drawn_over_time_beside_what_they_bound():
    """rpm="auto" and concurrency="auto": the limit in force, as the run found it, is a
    dashed line on the throughput and in-flight panels, read from ``limit_history``."""
    from nbllm.errors import RateLimitError

    calls = 0

    def provider(request):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RateLimitError("HTTP 429: slow down")
        return "ok"

    result = run(engine=FakeEngine(provider), rpm="auto", concurrency="auto", max_rpm=600)
    kinds = {kind for _, kind, _ in result.limit_history}
    assert kinds == {"requests/s", "concurrency"}
    first = [v for _, kind, v in result.limit_history if kind == "requests/s"]
    assert first[0] == pytest.approx(300 / 60)  # half the ceiling, per second
    assert len(first) >= 2 and first[-1] < first[0]  # the 429 cut it
    fig = plot_result(result)
    labels = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().texts]
    assert "rpm limit (requests/s)" in labels
    assert "concurrency limit" in labels
