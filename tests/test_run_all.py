"""benchmarks/run_all.py: parsing the benchmarks' output, RESULTS.md, the README's table.

No benchmark runs here: the outputs are canned, copied from real runs.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_all"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


run_all = _load()

EXECUTOR = """\
120 conversations, 416 requests (3.47 turns each), 4096 chars of context, concurrency 64
  round 1: nbllm             3,102 req/s
way            reqs median req/s   best  CPU ms/req server others
aiohttp         416        3,977  4,377       0.234    92%   0.04

ratio of req/s       median   best
nbllm/aiohttp          0.86   0.97   target >= 0.5  PASS
nbllm/openai          24.27  26.28   target >= 2  PASS
nbllm+limits/nbllm     0.87   0.89   (reported)
nbllm+dash/nbllm       0.89   1.18   target >= 0.95  MISS

total time 12 s
"""

RATE_LIMITED = """\
config                reqs   C   rpm  crit s N/rate s Σlat/C s bound s  wall s  ratio  429s max/win  verdict
rate-bound            1402  64   600    0.50    14.02     2.19   14.02   13.38  0.954     0     600  PASS (requests/rate)
concurrency-bound      868   8  6000    0.50     0.87    10.85   10.85   11.46  1.156     0     465  MISS (sum(lat)/C)

target: wall / bound <= 1.10, 0 server 429s, every turn ok; 'max/win' is the most requests
"""  # noqa: E501

MULTI_TURN = """\
way         wall s  / loop  / bound
nbllm         6.49   0.916    1.158

target: nbllm <= 1.00x the bare loop and <= 1.08x the bound: MISS
"""

SHARED_QUOTA = """\
R = 20 per 2 s, two processes x 30 requests
mode          ok  requests   429s  goodput/R busiest
shared        60        60      0      0.952      20
separate      60        75     15      0.951      20
alone         30        30      0      0.938      20
targets: shared goodput/R >= 0.90 with 0 429s
"""


def test_verdict_lines_are_the_figures():
    figures, lines = run_all.parse_figures(EXECUTOR)
    assert [(f.label, f.value, f.target, f.verdict) for f in figures] == [
        ("nbllm/aiohttp", "median 0.86, best 0.97", ">= 0.5", "PASS"),
        ("nbllm/openai", "median 24.27, best 26.28", ">= 2", "PASS"),
        ("nbllm+limits/nbllm", "median 0.87, best 0.89", "", "reported"),
        ("nbllm+dash/nbllm", "median 0.89, best 1.18", ">= 0.95", "MISS"),
    ]
    assert len(lines) == 4 and lines[0].startswith("nbllm/aiohttp")
    assert run_all.overall_verdict(figures) == "MISS"


def test_columns_are_named_from_the_titles_above():
    text = (
        "ratio of req/s       median paired by CPU\n"
        "checkpoint/none        0.84   0.84   0.88   target >= 0.95  MISS\n"
    )
    (figure,), _ = run_all.parse_figures(text)
    assert figure.value == "median 0.84, paired 0.84, by CPU 0.88"
    text = (
        "ratio of req/s    median   best\nrouter-2/single     0.88   0.97   target >= 0.7  PASS\n"
    )
    (figure,), _ = run_all.parse_figures(text)
    assert (figure.label, figure.value) == ("router-2/single", "median 0.88, best 0.97")


def test_other_shapes_of_verdict_line():
    text = (
        "wall / lower bound       1.16   target <= 1.25 at a 2 s delay: PASS\n"
        "dashboard/plain req/s 0.951 (by CPU 0.963)  target >= 0.95  PASS\n"
        "p95 gain of first against alone-a: 23.1%   target >= 20%  PASS\n"
        "prefix cache: 2.31x faster (target >= 2.0); same answers: True\n"
        "prefix reuse, 4 conversations x 3 turns: 5.9 tok/s with the cache, 2.0 without, ratio "
        "3.01 (target >= 2.0: PASS); same answers: True; prompt tokens reused: 12,386\n"
        "lowest nbllm / plain ratio: 1.00   target >= 1.0  PASS\n"
    )
    figures, _ = run_all.parse_figures(text)
    assert [(f.label, f.value, f.target, f.verdict) for f in figures] == [
        ("wall / lower bound", "1.16", "<= 1.25 at a 2 s delay", "PASS"),
        ("dashboard/plain req/s", "0.951 (by CPU 0.963)", ">= 0.95", "PASS"),
        ("p95 gain of first against alone-a", "23.1%", ">= 20%", "PASS"),
        ("prefix cache", "2.31x faster", ">= 2.0", "-"),
        (
            "prefix reuse, 4 conversations x 3 turns",
            "5.9 tok/s with the cache, 2.0 without, ratio 3.01",
            ">= 2.0",
            "PASS",
        ),
        ("lowest nbllm / plain ratio", "1.00", ">= 1.0", "PASS"),
    ]
    assert run_all.overall_verdict(figures) == "PASS"


def test_rows_take_the_target_stated_on_its_own_line():
    figures, _ = run_all.parse_figures(RATE_LIMITED)
    assert [(f.label, f.verdict) for f in figures] == [
        ("rate-bound", "PASS"),
        ("concurrency-bound", "MISS"),
    ]
    assert figures[0].target == "wall / bound <= 1.10, 0 server 429s, every turn ok"


def test_json_rows_give_the_figures():
    printed, _ = run_all.parse_figures(RATE_LIMITED)
    data = {
        "rows": [
            {"config": "rate-bound", "wall_s": 13.38, "bound_s": 14.02, "ratio": 0.954},
            {"config": "concurrency-bound", "wall_s": 11.46, "bound_s": 10.85, "ratio": 1.156},
        ],
        "all_pass": False,
    }
    data["rows"][0]["server_429"] = data["rows"][1]["server_429"] = 0
    figures = run_all.figures_from_json(data, printed)
    assert figures[0].value == "wall/bound 0.954 (13.38 s / 14.02 s), 0 429s"
    assert [f.verdict for f in figures] == ["PASS", "MISS"]  # from the printed rows
    assert figures[1].target.startswith("wall / bound <= 1.10")
    assert run_all.verdict_from_json(data) == "MISS"


def test_json_ratios_fill_a_verdict_line_without_figures():
    printed, _ = run_all.parse_figures(MULTI_TURN)
    assert [(f.label, f.value, f.verdict) for f in printed] == [("nbllm", "", "MISS")]
    figures = run_all.figures_from_json({"nbllm_vs_loop": 0.916, "nbllm_vs_bound": 1.158}, printed)
    assert figures[0].value == "0.916x the bare loop, 1.158x the bound"
    assert figures[0].target == "nbllm <= 1.00x the bare loop and <= 1.08x the bound"
    assert run_all.figures_from_json({"medians": {}}, printed) is None


@pytest.mark.parametrize(
    ("data", "verdict"),
    [
        ({"pass": True}, "PASS"),
        ({"all_pass": False}, "MISS"),
        ({"pass": {"a": True, "b": False}}, "MISS"),
        ({"pass": {"a": True}}, "PASS"),
        ({"medians": {}}, None),
        ([1, 2], None),
    ],
)
def test_verdict_from_json(data, verdict):
    assert run_all.verdict_from_json(data) == verdict


def test_no_verdict_keeps_the_closing_lines():
    figures, lines = run_all.parse_figures(SHARED_QUOTA)
    assert figures == []
    assert lines[-1] == "targets: shared goodput/R >= 0.90 with 0 429s"
    assert any(line.startswith("shared ") for line in lines)


def test_column_titles_are_not_figures():
    text = (
        "config                   requests  wall s achieved/R  429s 429 share  target   verdict\n"
        "fixed rpm=R          180    8.24      0.971    20     11.1%  >= 0.95, 0 429s  MISS\n"
        "shared goodput/R 0.952, 0 429s   target >= 0.90 with 0 429s  PASS\n"
    )
    figures, _ = run_all.parse_figures(text)
    assert [(f.label, f.verdict) for f in figures] == [
        ("fixed rpm=R", "MISS"),
        ("shared goodput/R", "PASS"),
    ]
    assert figures[1].value == "0.952, 0 429s"
    assert figures[1].target == ">= 0.90 with 0 429s"


def _results():
    figures, lines = run_all.parse_figures(EXECUTOR)
    ran = run_all.Result(
        name="executor_overhead",
        command="python benchmarks/executor_overhead.py --quick",
        status="ran",
        date="2026-12-03 06:00 UTC",
        machine="2 CPUs (Some CPU), 23 GiB RAM, no GPU, Python 3.11.7, torch 2.13.0",
        commit="abc1234",
        quick=True,
        seconds=12.0,
        figures=figures,
        verdict="MISS",
        summary=lines,
    )
    skipped = run_all.Result(
        name="shared_quota",
        command="python benchmarks/shared_quota.py --quick",
        status="skipped",
        date="2026-12-03 06:01 UTC",
        machine=ran.machine,
        note="needs redis-server on PATH",
    )
    return [ran, skipped]


def test_results_md_round_trips():
    results = _results()
    text = run_all.render_results(results)
    assert "| [shared_quota](#shared_quota) | skipped | - | - |" in text
    assert "- command: `python benchmarks/executor_overhead.py --quick`" in text
    assert "- machine: 2 CPUs (Some CPU)" in text
    assert "- nbllm commit: abc1234" in text
    assert "| nbllm/aiohttp | median 0.86, best 0.97 | >= 0.5 | PASS |" in text
    back = run_all.read_results(text)
    assert list(back) == ["executor_overhead", "shared_quota"]
    assert back["executor_overhead"] == results[0]
    assert back["shared_quota"] == results[1]


def test_readme_table_is_rewritten_between_the_markers():
    readme = (
        "# nbllm\n\nintro\n\n## Benchmarks\n\n"
        f"{run_all.START}\nold table\n{run_all.END}\n\n## Notebooks\n\nafter\n"
    )
    new = run_all.update_readme(readme, _results())
    assert new.startswith("# nbllm\n\nintro\n\n## Benchmarks\n\n")
    assert new.endswith(f"{run_all.END}\n\n## Notebooks\n\nafter\n")
    assert "old table" not in new
    table = new[new.index(run_all.START) : new.index(run_all.END)]
    assert "python benchmarks/run_all.py --quick --update-readme" in table
    assert "Machine: 2 CPUs (Some CPU)" in table
    # a row per figure with a target, the reported one left to RESULTS.md; the benchmark,
    # its command and date on its first row
    assert "nbllm+limits" not in table
    assert (
        "| [executor_overhead](benchmarks/RESULTS.md#executor_overhead) "
        "| nbllm/aiohttp: median 0.86, best 0.97 | >= 0.5 | PASS "
        "| `python benchmarks/executor_overhead.py --quick` | 2026-12-03 06:00 UTC, abc1234 |"
    ) in table
    assert "| | nbllm/openai: median 24.27, best 26.28 | >= 2 | PASS | | |" in table
    assert "| | nbllm+dash/nbllm: median 0.89, best 1.18 | >= 0.95 | MISS | | |" in table
    assert (
        "| [shared_quota](benchmarks/RESULTS.md#shared_quota) | skipped: needs redis-server on "
        "PATH | | | `python benchmarks/shared_quota.py --quick` | 2026-12-03 06:01 UTC |"
    ) in table
    for row in table.splitlines()[3:]:
        assert row.replace("\\|", "").count("|") == 7, row  # six cells
    assert run_all.update_readme(new, _results()) == new  # rewriting again changes nothing


def test_readme_without_markers_is_refused():
    with pytest.raises(ValueError, match="markers"):
        run_all.update_readme("# nbllm\n", _results())


def test_main_rewrites_the_readme_from_results_md(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text(run_all.render_results(_results()))
    readme = tmp_path / "README.md"
    readme.write_text(f"top\n{run_all.START}\n{run_all.END}\nbottom\n")
    argv = ["--no-run", "--update-readme", "--results", str(results), "--readme", str(readme)]
    assert run_all.main(argv) == 0
    text = readme.read_text()
    assert text.startswith("top\n") and text.endswith("bottom\n")
    assert "nbllm/openai: median 24.27, best 26.28" in text


def test_only_names_known_benchmarks(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_all.main(["--only", "nope", "--results", str(tmp_path / "R.md")])
    assert "no benchmark named nope" in capsys.readouterr().err


def test_every_benchmark_script_is_listed():
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} - {"run_all"}
    assert {Path(b.script).stem for b in run_all.BENCHMARKS} == scripts


def test_a_benchmark_that_cannot_run_here_is_listed_as_skipped(monkeypatch):
    bench = run_all.Benchmark("shared_quota", json=False, needs="no-such-program-here")
    result = run_all.run_one(bench, True, "a machine", cuda=False)
    assert (result.status, result.note) == ("skipped", "needs no-such-program-here on PATH")
    assert result.command == "python benchmarks/shared_quota.py --quick"
    gpu = run_all.run_one(run_all.Benchmark("local_engines", gpu=True), False, "m", cuda=False)
    assert (gpu.status, gpu.note) == ("skipped", "needs a CUDA GPU")


def test_results_json_is_valid_in_the_comment():
    text = run_all.render_results(_results())
    comments = [line for line in text.splitlines() if line.startswith("<!-- result ")]
    assert len(comments) == 2
    for line in comments:
        json.loads(line.removeprefix("<!-- result ").removesuffix(" -->"))
