"""The README's claims that a newcomer meets first: its set-up commands and its links.

``test_the_first_command_prints_answers`` (marker ``readme``; ``pytest -m readme`` runs it
alone) runs the README's first command block as written, in a fresh clone: a new venv, torch,
nbllm's local extra, the embedded model, 42 turns on the CPU. On 2 cores it took 2 min 14 s
with pip's cache warm and the machine quiet, 6 min 38 s with a cold cache on a busy machine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NOTEBOOKS = {f"notebooks/{p.name}" for p in (ROOT / "notebooks").glob("*.ipynb")}


def bash_blocks(text: str) -> list[str]:
    """The bodies of the ```bash blocks, in order."""
    return [m.group(1).strip() for m in re.finditer(r"^```bash\n(.*?)^```$", text, re.M | re.S)]


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_the_two_set_up_commands_come_first():
    text = README.read_text(encoding="utf-8")
    blocks = bash_blocks(text)
    first, second = blocks[0], blocks[1]
    assert first.startswith("python3 -m venv .venv && ")
    assert first.endswith(" && .venv/bin/python examples/quickstart.py")
    assert "\n" not in first  # one command, to paste as it is
    assert second == "bash tools/test.sh"
    # both sit under "Set up", before any other code block
    set_up = text.index("## Set up")
    assert set_up < text.index(first) < text.index(second) < text.index("\n## ", set_up + 1)
    assert text.find("```") > set_up


def test_relative_links_and_images_point_at_files():
    text = README.read_text(encoding="utf-8")
    # code spans and blocks are not links
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    prose = re.sub(r"`[^`\n]*`", "", prose)
    targets = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", prose)
    targets += re.findall(r"<img[^>]*\bsrc=\"([^\"]+)\"", prose)
    assert "docs/dashboard.png" in targets
    anchors = {
        github_anchor(line.lstrip("#")) for line in text.splitlines() if re.match(r"^#{1,6} ", line)
    }
    missing = []
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        if not path:
            if fragment not in anchors:
                missing.append(target)
            continue
        if not (ROOT / path).exists():
            missing.append(target)
    assert not missing, f"README.md links to what is not there: {missing}"


def test_the_notebooks_are_all_linked():
    text = README.read_text(encoding="utf-8")
    for notebook in sorted(NOTEBOOKS):
        assert f"]({notebook})" in text


def test_the_benchmark_table_has_its_markers():
    text = README.read_text(encoding="utf-8")
    start, end = text.find("<!-- benchmarks:start -->"), text.find("<!-- benchmarks:end -->")
    assert 0 < start < end
    assert "| benchmark |" in text[start:end]


@pytest.mark.readme
def test_the_first_command_prints_answers(tmp_path):
    """Clone this checkout into a temporary folder and run the README's first ```bash block
    there with ``bash -euo pipefail -c``. The clone has what is committed, not what is only
    in the working tree. pip reaches the package registry (and its cache under ~/.cache/pip);
    the converted model is reused from ~/.cache/nbllm when there; checkpoints go to a new
    NBLLM_DIR, so every turn is asked of the model."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout")
    command = bash_blocks(README.read_text(encoding="utf-8"))[0]
    clone = tmp_path / "nbllm"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True, timeout=120)
    # The clone's own venv must import the clone's nbllm, not this environment's.
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "NBLLM_DIR")
    }
    env["NBLLM_DIR"] = str(tmp_path / "nbllm-dir")
    started = time.monotonic()
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", command],
        cwd=clone,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=15 * 60,
        check=False,
    )
    took = time.monotonic() - started
    print(f"the README's first command took {took:.0f} s")
    tail = proc.stdout[-4000:]
    assert proc.returncode == 0, tail
    # examples/quickstart.py prints the run's summary, then the first rows with their answers.
    turns = re.search(r"^turns\s+(\d+)$", proc.stdout, re.M)
    ok = re.search(r"^turns_ok\s+(\d+)$", proc.stdout, re.M)
    assert turns and ok, tail
    assert int(turns.group(1)) == 42 and int(ok.group(1)) == 42, tail
    header = re.search(
        r"^\s*conversation_id\s+turn\s+question\s+answer\s+engine$", proc.stdout, re.M
    )
    assert header, tail
    rows = re.findall(r"^\d+\s+fq-\d+\s+\d+\s+.+\S\s+torch$", proc.stdout, re.M)
    assert len(rows) == 8, tail
    generated = re.search(r"^completion_tokens\s+([\d,]+)$", proc.stdout, re.M)
    assert generated and int(generated.group(1).replace(",", "")) > 0, tail
