"""Imports point down the layers of DESIGN.md, and only ``nbllm.ui`` touches the notebook stack.

data (types, dataset, template, results, config, errors, retry, redact) < engines < executor <
the faces (api, cli, jobs, runs, serve, testing, the package itself) < ui.

A module may import its own layer and those below it. A face may ask ``ui`` for a frontend
lazily (inside a function); nothing else looks up, not even lazily, except the two documented
conveniences ``RunResult.plot()`` and ``RunResult.judge()``. Imports under
``if TYPE_CHECKING:`` are annotations only and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nbllm"

DATA = 0
ENGINES = 1
EXECUTOR = 2
FACE = 3
UI = 4
LAYER_NAMES = {DATA: "data", ENGINES: "engines", EXECUTOR: "executor", FACE: "face", UI: "ui"}

# The data layer, by module (or package) name; everything else is placed by its prefix.
DATA_MODULES = (
    "nbllm.types",
    "nbllm.dataset",
    "nbllm.template",
    "nbllm.results",
    "nbllm.config",
    "nbllm.config_args",
    "nbllm.errors",
    "nbllm.retry",
    "nbllm.redact",
    "nbllm.images",
    "nbllm.scoring",
    "nbllm.parsing",
    "nbllm.settings",
    "nbllm.alert_rules",
)
PREFIXES = (
    ("nbllm.ui", UI),
    ("nbllm.executor", EXECUTOR),
    ("nbllm.engines", ENGINES),
)
NOTEBOOK_STACK = ("IPython", "ipywidgets", "matplotlib", "traitlets", "ipykernel")
# (importer, imported): deliberate lazy imports that look up a layer.
LAZY_UPWARD_ALLOWED = {("nbllm.results", "nbllm.ui.plots"), ("nbllm.results", "nbllm.judge")}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer(name: str) -> int:
    for prefix in DATA_MODULES:
        if _is(name, prefix) or name.startswith(prefix + "_"):
            return DATA
    for prefix, rank in PREFIXES:
        if _is(name, prefix):
            return rank
    return FACE


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str, source: str, is_package: bool) -> list[tuple[str, int, bool]]:
    """``(imported module, line, lazy)`` for every import in the source that counts."""
    package = module if is_package else module.rpartition(".")[0]
    tree = ast.parse(source)
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other, lazy)
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, lazy) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - child.level + 1]
                    target = ".".join([*base, child.module] if child.module else base)
                else:
                    target = child.module or ""
                found.append((target, child.lineno, lazy))
                # ``from nbllm import runs`` imports the submodule nbllm.runs
                if target == "nbllm" or target.startswith("nbllm."):
                    found.extend((f"{target}.{a.name}", child.lineno, lazy) for a in child.names)
            is_function = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, lazy or is_function)

    visit(tree, False)
    return found


def _known_module(name: str) -> bool:
    relative = name.split(".")[1:]
    base = PACKAGE.joinpath(*relative)
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


SOURCES = sorted(PACKAGE.rglob("*.py"))


def problems(importer: str, source: str, is_package: bool = False) -> list[str]:
    """What in ``source`` (the text of module ``importer``) breaks the layer rules."""
    rank = layer(importer)
    found = []
    for target, line, lazy in _imports(importer, source, is_package):
        root = target.split(".")[0]
        if root in NOTEBOOK_STACK and rank != UI:
            found.append(f"line {line}: {target} outside nbllm.ui")
        if root != "nbllm" or not _known_module(target):
            continue
        target_rank = layer(target)
        if target_rank <= rank:
            continue
        if lazy and (rank == FACE and target_rank == UI):
            continue
        if lazy and (importer, target) in LAZY_UPWARD_ALLOWED:
            continue
        found.append(
            f"line {line}: {LAYER_NAMES[rank]} module imports {target} "
            f"({LAYER_NAMES[target_rank]}){' lazily' if lazy else ''}"
        )
    return found


@pytest.mark.parametrize("path", SOURCES, ids=_module_name)
def test_imports_point_down(path: Path) -> None:
    importer = _module_name(path)
    source = path.read_text(encoding="utf-8")
    found = problems(importer, source, is_package=path.name == "__init__.py")
    assert not found, f"{importer}:\n" + "\n".join(found)


@pytest.mark.parametrize(
    ("importer", "source", "expected"),
    [
        ("nbllm.executor.runner", "from nbllm.ui.dashboard import Dashboard\n", "imports nbllm.ui"),
        ("nbllm.engines.fake", "def f():\n    from ..executor import Executor\n", "lazily"),
        ("nbllm.config", "from nbllm.executor.limiter import RateLimiter\n", "(executor)"),
        ("nbllm.jobs", "from nbllm.ui.dashboard import Dashboard\n", "(ui)"),
        ("nbllm.executor.stats", "import IPython\n", "outside nbllm.ui"),
    ],
)
def test_the_checker_finds_planted_back_edges(importer: str, source: str, expected: str) -> None:
    found = problems(importer, source)
    assert len(found) == 1 and expected in found[0], found


def test_the_checker_allows_what_the_rules_allow() -> None:
    assert problems("nbllm.api", "def f():\n    from nbllm.ui import frontend\n") == []
    assert problems("nbllm.executor.runner", "from nbllm.engines.base import Engine\n") == []
    typing_only = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import nbllm.api\n"
    assert problems("nbllm.results", typing_only) == []


def test_no_module_over_600_lines() -> None:
    long = {
        _module_name(path): n
        for path in SOURCES
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > 600
    }
    assert not long, f"split these modules: {long}"
