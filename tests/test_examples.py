"""Every script in examples/ runs as a reader would run it and prints what it says it prints.

Each runs in a child process (``python examples/NAME.py``, ``bash examples/cli.sh`` with this
environment's ``bin`` first on PATH), in a temporary working folder with its own NBLLM_DIR,
importing nbllm from this checkout. No example is skipped: one that rots fails here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

#: Lines (or parts of lines) each example must print, in this order.
EXPECTED: dict[str, list[str]] = {
    "conversations.py": [
        "records: 2 conversations, 4 turns",
        "long: 2 conversations, 3 turns",
        "wide: 2 conversations, 3 turns",
        'template: 3 conversations, first question: "What was Initech\'s revenue in 2023?"',
        "10/10 turns ok in ",
        "rows per conversation: {'Hooli': 2, 'Initech': 2, 'Umbrella': 2, 'acme': 3, 'globex': 1}",
        "acme, turn 2: Answer to turn 2: What was the growth?",
        "refused: record 0: unknown key 'turn' (did you mean 'turns'?)",
    ],
    "providers_and_routing.py": [
        "42/42 turns ok in ",
        "breaker open",
        "turns answered by the broken one: 0",
        "group  requests  errors breaker",
        "42/42 turns ok in ",
        "turns answered by the backup: 42",
        "budget: max_cost_usd=0.5 reached — ",
        "of a $0.50 cap",
    ],
    "checkpoint_and_resume.py": [
        "first run:  budget: max_tokens_total=1500 reached — ",
        "second run: 42/42 turns ok in ",
        "third run:  42/42 turns ok in ",
        "resumed 42 turns, requests sent: 0",
        "nbllm-test    42     42",
        "runs left: 0",
    ],
    "structured_answers.py": [
        "42/42 turns ok in ",
        "asked again: 2",
        "fq-001     0    0.5",
        "mean score: 0.64 over 84 rows",
        "by model: {'careful': 1.0, 'hasty': 0.29}",
        "by turn:  {0: 1.0, 1: 0.5, 2: 0.5, 3: 0.5, 4: 0.5}",
        "the models agree on 12 of 42 turns",
        "The answer is 1,317.       About 1448.70.",
    ],
    "batch_api.py": [
        "42/42 turns ok in ",
        "batches: 5, lines in them: 42",
        "live requests: 0",
        "the longest conversation has 5 turns: one wave each",
        "engine: openai batch",
    ],
    "monitoring.py": [
        "on_alert: latency_p95_s crossed",
        "42/42 turns ok in ",
        'nbllm_turns_total{run="run-1",status="ok"} 42.0',
        'nbllm_turns_total{run="run-1",status="failed"} 0.0',
        "alerts in the summary: 1",
    ],
    "cli.sh": [
        "server: http://127.0.0.1:",
        "42/42 turns ok in ",
        "turns_ok           42",
        "results.csv: 42 rows",
        "ID                CREATED (UTC)        MODEL",
        "nbllm-test  42/42",
    ],
    # The README's first command: the embedded model on the CPU (the first run converts it).
    "quickstart.py": [
        "conversations      12",
        "turns_ok           42",
        "conversation_id  turn",
        "fq-001     0                What was net revenue in 2019?",
    ],
}

#: Seconds an example may take (the quickstart loads a real model on the CPU).
TIMEOUT_S = {"quickstart.py": 600}


def run_example(name: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)  # NBLLM_DIR is already the test's own (tests/conftest.py)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    path = EXAMPLES / name
    command = ["bash", str(path)] if name.endswith(".sh") else [sys.executable, str(path)]
    return subprocess.run(
        command,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S.get(name, 60),
        check=False,
    )


def assert_prints_in_order(stdout: str, expected: list[str]) -> None:
    lines = stdout.splitlines()
    at = 0
    for want in expected:
        found = next((i for i in range(at, len(lines)) if want in lines[i]), None)
        assert found is not None, f"{want!r} not printed (after line {at}):\n{stdout}"
        at = found + 1


def resumes_what_the_first_run_answered(stdout: str, cwd: Path) -> None:
    first = re.search(r"first run: .* — (\d+) of 42 turns ok", stdout)
    second = re.search(r"resumed (\d+) turns, requests sent: (\d+)", stdout)
    assert first and second, stdout
    answered, resumed, sent = int(first[1]), int(second[1]), int(second[2])
    assert 0 < answered < 42
    assert resumed == answered and resumed + sent == 42


def stops_near_its_cap(stdout: str, cwd: Path) -> None:
    spent = re.search(r"spent \$(\d+\.\d+) of a \$0\.50 cap", stdout)
    assert spent, stdout
    # The requests in flight when the cap is reached finish: two at most here.
    assert 0.5 <= float(spent[1]) < 0.8


def writes_its_csv_and_stops_its_server(stdout: str, cwd: Path) -> None:
    header = (cwd / "results.csv").read_text(encoding="utf-8").splitlines()[0]
    assert header.startswith("conversation_id,turn,question,answer")
    url = re.search(r"server: (http://127\.0\.0\.1:\d+/v1)", stdout)
    assert url, stdout
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url[1] + "/models", timeout=2)


def answers_again_from_its_checkpoint(stdout: str, cwd: Path) -> None:
    # The README: "a second run of the same command reads every answer back from its
    # checkpoint".
    again = run_example("quickstart.py", cwd)
    assert again.returncode == 0, again.stderr
    assert_prints_in_order(again.stdout, ["turns_ok           42", "resumed            42"])


#: Further checks of an example's output, beyond the lines it prints.
CHECKS: dict[str, Callable[[str, Path], None]] = {
    "checkpoint_and_resume.py": resumes_what_the_first_run_answered,
    "providers_and_routing.py": stops_near_its_cap,
    "cli.sh": writes_its_csv_and_stops_its_server,
    "quickstart.py": answers_again_from_its_checkpoint,
}


def test_every_example_is_tested():
    scripts = {p.name for p in EXAMPLES.iterdir() if p.suffix in (".py", ".sh")}
    assert scripts == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs_and_prints_what_it_says(name, tmp_path):
    proc = run_example(name, tmp_path)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert_prints_in_order(proc.stdout, EXPECTED[name])
    if name in CHECKS:
        CHECKS[name](proc.stdout, tmp_path)
