"""Run every benchmark, write benchmarks/RESULTS.md, and refresh the README's table from it.

    python benchmarks/run_all.py                      # every benchmark, full size (~35 min)
    python benchmarks/run_all.py --quick              # every benchmark's smoke run
    python benchmarks/run_all.py --only batch_api,routing_cost
    python benchmarks/run_all.py --quick --update-readme
    python benchmarks/run_all.py --update-readme --no-run   # the table from RESULTS.md as it is

Each benchmark runs as a child process of this Python (``--quick`` passed on where the script
takes it, ``--json`` where it writes one). Its headline figures are the lines it prints with a
verdict (``... target >= 0.5  PASS``) or marked ``(reported)``; where the script writes JSON, the
pass/fail it records there is the one kept. A benchmark that needs what this machine lacks
(redis-server, a CUDA GPU) is listed as skipped, one that exits non-zero or runs past its time
as failed: none is dropped. A benchmark left out with ``--only`` keeps its entry from the last
RESULTS.md. Each entry carries its command, date, machine and nbllm's commit.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "RESULTS.md"
README = ROOT / "README.md"
START = "<!-- benchmarks:start -->"
END = "<!-- benchmarks:end -->"
ENTRY = re.compile(r"^<!-- result (\{.*\}) -->$", re.MULTILINE)
VERDICT = re.compile(r"\b(PASS|MISS|FAIL)\b")


@dataclass(frozen=True)
class Benchmark:
    """One script under benchmarks/ and what it takes."""

    name: str
    quick: bool = True  # takes --quick
    json: bool = True  # takes --json PATH
    needs: str | None = None  # a program that must be on PATH
    gpu: bool = False  # needs a CUDA GPU
    timeout_s: float = 1800.0
    args: tuple[str, ...] = ()
    file: str | None = None  # the script's name, where the entry's differs (a GPU variant)

    @property
    def script(self) -> str:
        return f"benchmarks/{self.file or self.name}.py"


BENCHMARKS = (
    Benchmark("executor_overhead"),
    Benchmark("dashboard_overhead", quick=False, json=False),
    Benchmark("rate_limited_wall"),
    Benchmark("multi_turn_wall"),
    Benchmark("checkpoint_overhead"),
    Benchmark("routing_cost"),
    Benchmark("parsing_cost"),
    Benchmark("hedging"),
    Benchmark("observability_cost"),
    Benchmark("limit_goodput"),
    Benchmark("batch_api", json=False),
    Benchmark("shared_quota", json=False, needs="redis-server"),
    Benchmark("local_engines", timeout_s=3600.0),
    # The torch parts on CUDA and vLLM's comparison: skipped, and listed so, without a GPU.
    Benchmark(
        "local_engines_gpu", file="local_engines", gpu=True, args=("--gpu",), timeout_s=3600.0
    ),
)


@dataclass
class Figure:
    """One headline line: what it measures, the figures, the target and the verdict."""

    label: str
    value: str
    target: str
    verdict: str  # PASS, MISS, FAIL, "reported" or "-" (a target with no verdict printed)


@dataclass
class Result:
    name: str
    command: str
    status: str  # "ran", "failed", "skipped"
    date: str
    machine: str
    commit: str = ""  # nbllm's git commit ("+changes": nbllm/ or benchmarks/ edited since)
    quick: bool = False
    seconds: float | None = None
    figures: list[Figure] = field(default_factory=list)
    verdict: str = "-"  # PASS, MISS or "-" over the figures with a target
    note: str = ""
    summary: list[str] = field(default_factory=list)  # the printed lines the figures came from

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Result:
        figures = [Figure(**f) for f in data.pop("figures", [])]
        return cls(**data, figures=figures)


# ---------------------------------------------------------------------------------------------
# Parsing a benchmark's output


def _split_label(head: str) -> tuple[str, str]:
    """ "nbllm/aiohttp   0.86  0.97" -> ("nbllm/aiohttp", "0.86 0.97")."""
    head = " ".join(head.split())
    if ": " in head:  # "what was measured, on what: the figures"
        label, rest = head.split(": ", 1)
        if re.search(r"\d", rest):
            return label.strip(), rest.strip()
    match = re.match(r"^(.*?)[\s:]+([-+]?\d[\d,.]*.*)$", head)
    if not match:
        return head.rstrip(":"), ""
    return match.group(1).rstrip(":").strip(), match.group(2).strip()


NUMBER = re.compile(r"(?<!\S)[-+]?\d[\d,.]*%?(?!\S)")  # a number standing alone


def _name_columns(line: str, header: str) -> str | None:
    """ "0.84 0.84 0.88" named from the column titles above them, right-aligned as printed:
    "median 0.84, paired 0.84, by CPU 0.88"; None where the titles do not line up."""
    head = re.split(r"\(?\btarget|\(reported", line, flags=re.IGNORECASE)[0]
    head = VERDICT.split(head)[0]
    numbers = list(NUMBER.finditer(head))
    rest = head[numbers[0].start() :] if numbers else ""
    if len(numbers) < 2 or NUMBER.sub("", rest).strip():
        return None
    names = []
    for i, number in enumerate(numbers):
        start = numbers[i - 1].end() if i else max(0, number.start() - 3)
        name = header[start : number.end()].strip()
        if not name or re.search(r"\d", name):
            return None
        names.append(f"{name} {number.group()}")
    return ", ".join(names)


def parse_figures(output: str) -> tuple[list[Figure], list[str]]:
    """The headline figures in a benchmark's printed output, and the lines they came from.

    A headline line has a verdict (PASS / MISS / FAIL), or a target, or says ``(reported)``.
    A line that starts with ``target`` and has no verdict states the target of the rows
    that print only a verdict (rate_limited_wall.py's table).
    """
    lines = [line.rstrip() for line in output.splitlines()]
    stated = ""
    for line in lines:
        text = line.strip()
        if re.match(r"^targets?\b", text, re.IGNORECASE) and not VERDICT.search(text):
            stated = re.sub(r"^targets?:?\s*", "", text, flags=re.IGNORECASE)
            stated = stated.split(";")[0].strip()
            break
    figures: list[Figure] = []
    used: list[str] = []
    header = ""
    for line in lines:
        text = line.strip()
        if text and not re.search(r"\d", text) and not VERDICT.search(text):
            header = line
        verdicts = VERDICT.findall(text)
        has_target = re.search(r"\btargets?\b", text, re.IGNORECASE) is not None
        reported = "(reported" in text
        if not (verdicts or reported or has_target):
            continue
        if has_target and not verdicts and re.match(r"^targets?\b", text, re.IGNORECASE):
            continue  # the stated target, not a figure
        if not verdicts and not reported and re.search(r"\bverdict\b|^\D*$", text):
            continue  # a table's column titles
        verdict = verdicts[-1] if verdicts else ("reported" if reported else "-")
        target = ""
        target_match = re.search(r"\(?\btarget:?\s*(.*)$", text, re.IGNORECASE)
        if target_match:
            head = text[: target_match.start()]
            target = VERDICT.sub("", target_match.group(1))
            target = target.strip(" :()").rstrip(";").strip()
            target = re.sub(r"\)?;.*$", "", target).strip(" :()")
        elif reported:
            head = text[: text.index("(reported")]
        else:  # a verdict with no target on the line: rate_limited_wall.py's rows
            head = VERDICT.split(text)[0]
            target = stated
        label, value = _split_label(head)
        value = (_name_columns(line, header) if header else None) or value
        if not label and target.lower().startswith("nbllm"):
            label = "nbllm"
        figures.append(Figure(label or "-", value, target, verdict))
        used.append(text)
    if not figures:
        # No verdict printed (shared_quota.py): keep the table it ends with.
        tail = [line for line in lines if line.strip()][-6:]
        used = [line for line in tail if not line.startswith("Traceback")]
    return figures, used


def verdict_from_json(data: Any) -> str | None:
    """PASS / MISS from the ``pass`` or ``all_pass`` a script writes into its JSON, if any."""
    if not isinstance(data, dict):
        return None
    for key in ("all_pass", "pass"):
        value = data.get(key)
        if isinstance(value, bool):
            return "PASS" if value else "MISS"
        if isinstance(value, dict) and value and all(isinstance(v, bool) for v in value.values()):
            return "PASS" if all(value.values()) else "MISS"
    return None


def figures_from_json(data: Any, printed: Sequence[Figure]) -> list[Figure] | None:
    """Headline figures from a script's JSON, where it has them in a known shape, else None.

    ``rows`` (rate_limited_wall.py, limit_goodput.py): one figure per row, its verdict from
    the row's ``pass``; ``nbllm_vs_loop`` / ``nbllm_vs_bound`` (multi_turn_wall.py): the
    ratios its one printed verdict is about.
    """
    if not isinstance(data, dict):
        return None
    stated = {f.label: f.target for f in printed}
    rows = data.get("rows")
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        figures = []
        for row in rows:
            label = str(row.get("config") or row.get("way") or "-")
            parts = []
            if "ratio" in row and "bound_s" in row:
                wall, bound = row["wall_s"], row["bound_s"]
                parts.append(f"wall/bound {row['ratio']:.3f} ({wall:.2f} s / {bound:.2f} s)")
            if "achieved_over_R" in row:
                parts.append(f"achieved/R {row['achieved_over_R']:.3f}")
            rejected = row.get("server_429", row.get("429s"))
            if rejected is not None:
                parts.append(f"{rejected} 429s")
            target = str(row.get("target") or stated.get(label, ""))
            verdict = row.get("pass")
            if not isinstance(verdict, bool):
                verdict = next((f.verdict == "PASS" for f in printed if f.label == label), None)
            figures.append(
                Figure(
                    label,
                    ", ".join(parts),
                    target,
                    "-" if verdict is None else ("PASS" if verdict else "MISS"),
                )
            )
        return figures
    if "nbllm_vs_loop" in data and "nbllm_vs_bound" in data:
        value = (
            f"{data['nbllm_vs_loop']:.3f}x the bare loop, {data['nbllm_vs_bound']:.3f}x the bound"
        )
        figures = [
            Figure("nbllm", value, f.target, f.verdict) if f.label == "nbllm" and not f.value else f
            for f in printed
        ]
        return figures
    return None


def overall_verdict(figures: Sequence[Figure]) -> str:
    verdicts = [f.verdict for f in figures if f.verdict in ("PASS", "MISS", "FAIL")]
    if not verdicts:
        return "-"
    return "PASS" if all(v == "PASS" for v in verdicts) else "MISS"


# ---------------------------------------------------------------------------------------------
# The machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.0f} GiB RAM"
    except (OSError, ValueError):
        pass
    return "RAM unknown"


def _output(command: list[str], timeout: float) -> str | None:
    """What ``command`` prints (run from the repository), or None when it cannot run."""
    try:
        return subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _gpu() -> str:
    if not shutil.which("nvidia-smi"):
        return "no GPU"
    out = _output(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], 20)
    names = [n.strip() for n in (out or "").splitlines() if n.strip()]
    return ", ".join(names) if names else "no GPU"


def _torch_version() -> str:
    out = _output([sys.executable, "-c", "import torch; print(torch.__version__)"], 120)
    return "no torch" if out is None else f"torch {out}"


def git_commit() -> str:
    out = _output(["git", "rev-parse", "--short", "HEAD"], 20)
    dirty = _output(
        ["git", "status", "--porcelain", "--untracked-files=no", "nbllm", "benchmarks"], 20
    )
    if out is None or dirty is None:
        return "unknown"
    return f"{out}+changes" if dirty else out


def has_cuda() -> bool:
    return _gpu() != "no GPU"


def machine() -> str:
    """One line: CPUs and model, RAM, GPU, Python, torch."""
    return (
        f"{os.cpu_count()} CPUs ({_cpu_model()}), {_ram_gib()}, {_gpu()}, "
        f"Python {platform.python_version()}, {_torch_version()}"
    )


# ---------------------------------------------------------------------------------------------
# Running


def command_for(bench: Benchmark, quick: bool, json_path: str | None = None) -> list[str]:
    cmd = ["python", bench.script, *bench.args]
    if quick and bench.quick:
        cmd.append("--quick")
    if json_path and bench.json:
        cmd += ["--json", json_path]
    return cmd


def run_one(
    bench: Benchmark,
    quick: bool,
    machine_line: str,
    cuda: bool,
    keep: Path | None = None,
    commit: str = "",
) -> Result:
    shown = " ".join(command_for(bench, quick))
    result = Result(
        name=bench.name,
        command=shown,
        status="ran",
        date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        machine=machine_line,
        commit=commit,
        quick=quick and bench.quick,
    )
    if bench.needs and not shutil.which(bench.needs):
        result.status, result.note = "skipped", f"needs {bench.needs} on PATH"
        return result
    if bench.gpu and not cuda:
        result.status, result.note = "skipped", "needs a CUDA GPU"
        return result
    with tempfile.TemporaryDirectory(prefix="nbllm-bench-") as folder:
        json_path = str(Path(folder) / f"{bench.name}.json") if bench.json else None
        cmd = command_for(bench, quick, json_path)
        cmd[0] = sys.executable
        # The checkout under test first on the path; checkpoints in a folder of their own.
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path, "NBLLM_DIR": str(Path(folder) / "nbllm")}
        print(f"==> {shown}", flush=True)
        started = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd,
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=bench.timeout_s,
                check=False,
            )
            output, code = proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as exc:
            output = exc.stdout if isinstance(exc.stdout, str) else ""
            code = None
        result.seconds = round(time.perf_counter() - started, 1)
        sys.stdout.write(output)
        result.figures, result.summary = parse_figures(output)
        result.verdict = overall_verdict(result.figures)
        if keep:
            keep.mkdir(parents=True, exist_ok=True)
            (keep / f"{bench.name}.txt").write_text(output, encoding="utf-8")
        if json_path and Path(json_path).exists():
            data = json.loads(Path(json_path).read_text())
            if keep:
                shutil.copy(json_path, keep / f"{bench.name}.json")
            result.figures = figures_from_json(data, result.figures) or result.figures
            result.verdict = overall_verdict(result.figures)
            from_json = verdict_from_json(data)
            if from_json is not None:
                result.verdict = from_json
        if code is None:
            result.status, result.note = "failed", f"ran past {bench.timeout_s:.0f} s"
        elif code != 0:
            last = [line for line in output.splitlines() if line.strip()][-1:] or [""]
            result.status, result.note = "failed", f"exit status {code}: {last[0][:200]}"
    print(f"==> {bench.name}: {result.status} in {result.seconds} s, {result.verdict}", flush=True)
    return result


# ---------------------------------------------------------------------------------------------
# RESULTS.md and the README's table


def read_results(text: str) -> dict[str, Result]:
    """The entries a RESULTS.md holds (each one is kept as JSON in an HTML comment)."""
    return {
        r.name: r for r in (Result.from_dict(json.loads(m.group(1))) for m in ENTRY.finditer(text))
    }


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _figure_text(figure: Figure) -> str:
    if figure.label in ("", "-") or not figure.value:
        return figure.value or figure.label
    return f"{figure.label}: {figure.value}"


def render_results(results: Sequence[Result]) -> str:
    out = [
        "# Benchmark results",
        "",
        "Written by `python benchmarks/run_all.py` (do not edit by hand: run it again). What each",
        "benchmark measures, and earlier full runs, are in [README.md](README.md).",
        "",
        "| benchmark | status | verdict | seconds | date |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        seconds = f"{r.seconds:g}" if r.seconds is not None else "-"
        status = r.status + (" (--quick)" if r.quick and r.status == "ran" else "")
        out.append(f"| [{r.name}](#{r.name}) | {status} | {r.verdict} | {seconds} | {r.date} |")
    for r in results:
        # "-->" in a printed line would end the comment early; \u003e reads back as ">".
        entry = json.dumps(asdict(r), ensure_ascii=False).replace("-->", "--\\u003e")
        out += ["", f"## {r.name}", "", f"<!-- result {entry} -->", ""]
        out.append(f"- command: `{r.command}`")
        out.append(f"- date: {r.date}")
        out.append(f"- machine: {r.machine}")
        if r.commit:
            out.append(f"- nbllm commit: {r.commit}")
        out.append(f"- status: {r.status}" + (f" ({r.note})" if r.note else ""))
        if r.seconds is not None:
            out.append(f"- took: {r.seconds:g} s")
        out.append(f"- verdict: {r.verdict}")
        if r.figures:
            out += ["", "| figure | value | target | verdict |", "|---|---|---|---|"]
            for f in r.figures:
                out.append(
                    f"| {_cell(f.label)} | {_cell(f.value)} | {_cell(f.target)} | {f.verdict} |"
                )
        if r.summary:
            out += ["", "```", *r.summary, "```"]
    return "\n".join(out) + "\n"


def render_table(results: Sequence[Result]) -> str:
    """The README's table: one row per figure with a target, one for a benchmark without."""
    rows = [
        "| benchmark | figure | target | verdict | command | measured (nbllm commit) |",
        "|---|---|---|---|---|---|",
    ]
    several = len({r.machine for r in results if r.status == "ran"}) > 1
    for r in results:
        when = ", ".join(filter(None, [r.date, r.commit if r.status == "ran" else ""]))
        if several and r.status == "ran":
            when += f", {r.machine}"
        # The benchmark, its command and when: on its first row only.
        first = f"| [{r.name}](benchmarks/RESULTS.md#{r.name}) |"
        tail = f"| `{_cell(r.command)}` | {_cell(when)} |"
        if r.status != "ran":
            rows.append(f"{first} {r.status}: {_cell(r.note)} | | {tail}")
            continue
        targeted = [f for f in r.figures if f.verdict != "reported"]
        if not targeted:
            value = "; ".join(_figure_text(f) for f in r.figures) or "see RESULTS.md"
            rows.append(f"{first} {_cell(value)} | | - {tail}")
            continue
        for i, f in enumerate(targeted):
            rows.append(
                f"{first if i == 0 else '| |'} {_cell(_figure_text(f))} | {_cell(f.target)} "
                f"| {f.verdict} {tail if i == 0 else '| | |'}"
            )
    return "\n".join(rows)


def update_readme(readme: str, results: Sequence[Result]) -> str:
    """The README with the text between the two markers replaced by the table."""
    start, end = readme.find(START), readme.find(END)
    if start < 0 or end < start:
        msg = f"README.md has no {START} ... {END} markers"
        raise ValueError(msg)
    machines = sorted({r.machine for r in results if r.status == "ran"})
    intro = (
        "Produced by `python benchmarks/run_all.py"
        + (" --quick" if any(r.quick for r in results) else "")
        + " --update-readme`; every figure, with its rounds, is in "
        "[benchmarks/RESULTS.md](benchmarks/RESULTS.md)."
    )
    if len(machines) == 1:
        intro += f" Machine: {machines[0]}."
    elif not machines:
        intro += " Nothing has run yet."
    body = f"{START}\n{intro}\n\n{render_table(results)}\n{END}"
    return readme[:start] + body + readme[end + len(END) :]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="each benchmark's smoke run")
    parser.add_argument("--only", help="comma-separated names, e.g. batch_api,routing_cost")
    parser.add_argument("--update-readme", action="store_true", help="rewrite README's table")
    parser.add_argument("--no-run", action="store_true", help="run nothing; use RESULTS.md")
    parser.add_argument("--keep", metavar="DIR", help="keep each output and JSON file here")
    parser.add_argument("--results", default=str(RESULTS), help=argparse.SUPPRESS)
    parser.add_argument("--readme", default=str(README), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    names = [b.name for b in BENCHMARKS]
    picked = names
    if args.only:
        picked = [n.strip().removesuffix(".py") for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(picked) - set(names))
        if unknown:
            parser.error(f"no benchmark named {', '.join(unknown)}; there are {', '.join(names)}")
    results_path = Path(args.results)
    previous = read_results(results_path.read_text()) if results_path.exists() else {}
    results = dict(previous)
    if not args.no_run:
        machine_line, cuda, commit = machine(), has_cuda(), git_commit()
        for bench in BENCHMARKS:
            if bench.name in picked:
                results[bench.name] = run_one(
                    bench,
                    args.quick,
                    machine_line,
                    cuda,
                    Path(args.keep) if args.keep else None,
                    commit,
                )
        ordered = [results[n] for n in names if n in results]
        results_path.write_text(render_results(ordered), encoding="utf-8")
        print(f"wrote {results_path}")
    ordered = [results[n] for n in names if n in results]
    if args.update_readme:
        readme_path = Path(args.readme)
        readme_path.write_text(update_readme(readme_path.read_text(), ordered), encoding="utf-8")
        print(f"updated the table in {readme_path}")
    failed = [r.name for r in ordered if r.status == "failed" and r.name in picked]
    return 1 if failed and not args.no_run else 0


if __name__ == "__main__":
    sys.exit(main())
