"""One configuration: nbllm.toml (project and user), [tool.nbllm], NBLLM_* variables and the
call, resolved in one order; every file error names the file, the line and the option."""

from __future__ import annotations

from pathlib import Path

import pytest

import nbllm
from nbllm import ChatRequest, FakeEngine
from nbllm.cli import main
from nbllm.errors import ConfigError
from nbllm.settings import resolve_call, show, source_of

DATA = [{"id": "a", "turns": ["q"]}]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder, the working folder, with a sub-folder: nbllm.toml is found upward."""
    inner = tmp_path / "project" / "notebooks"
    inner.mkdir(parents=True)
    monkeypatch.chdir(inner)
    return tmp_path / "project"


def user_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / ".config" / "nbllm" / "nbllm.toml"  # XDG_CONFIG_HOME is tmp/.config
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def sent_params(**options: object) -> dict[str, object]:
    """The sampling parameters a run sends, and the run's config."""
    seen: list[ChatRequest] = []

    def handler(request: ChatRequest) -> str:
        seen.append(request)
        return "ok"

    nbllm.run(DATA, engine=FakeEngine(handler), checkpoint=False, cache=False, progress=False,
              **options)  # fmt: skip
    return dict(seen[0].params)


def test_precedence_call_then_environment_then_project_then_user_then_default(
    project, tmp_path, monkeypatch
):
    user_config(tmp_path, "max_tokens = 11\ntemperature = 0.5\nrpm = 100\nstop_grace_s = 3\n")
    assert source_of("max_tokens") == (11, str(tmp_path / ".config/nbllm/nbllm.toml") + ":1")
    (project / "nbllm.toml").write_text("max_tokens = 22\nrpm = 200\n", encoding="utf-8")
    assert source_of("max_tokens") == (22, f"{project / 'nbllm.toml'}:1")
    assert source_of("temperature")[0] == 0.5  # only the user file sets it
    monkeypatch.setenv("NBLLM_MAX_TOKENS", "33")
    assert source_of("max_tokens") == (33, "$NBLLM_MAX_TOKENS")
    assert sent_params(model="m") == {"max_tokens": 33, "temperature": 0.5}
    assert sent_params(model="m", max_tokens=44)["max_tokens"] == 44  # the call wins
    config = resolve_call({"model": "m", **_defaults(), "rpm": 7})
    assert (config.rpm, config.stop_grace_s) == (7, 3)
    assert source_of("timeout") == (120.0, "default")


def _defaults() -> dict[str, object]:
    return {name: f.default for name, f in nbllm.RunConfig.model_fields.items()}


def test_pyproject_tool_table_and_per_model_defaults(project):
    (project / "pyproject.toml").write_text(
        '[project]\nname = "x"\n\n[tool.nbllm]\nmax_tokens = 64\n\n'
        '[tool.nbllm.models."big"]\nmax_tokens = 512\ntemperature = 0\n',
        encoding="utf-8",
    )
    assert sent_params(model="small") == {"max_tokens": 64}
    assert sent_params(model="big") == {"max_tokens": 512, "temperature": 0}
    assert sent_params(model="big", max_tokens=5)["max_tokens"] == 5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "model = 'm'\nrmp = 5\n",
            r"nbllm.toml:2: 'rmp' is not an nbllm option \(did you mean 'rpm'\?\)",
        ),
        ("\n\nconcurrency = 'lots'\n", r"nbllm.toml:3: concurrency= expected a whole number"),
        ("temperature = -1\n", r"nbllm.toml:1: temperature= expected"),
        ("rpm = \n", r"nbllm.toml: not valid TOML: .*line 1"),
        (
            "api_key = 'literal-key-in-a-file'\n",
            r"nbllm.toml:1: api_key: a key is never written in a file",
        ),
        ("[alerts]\nerror_rat = 0.5\n", r"nbllm.toml:2: alerts=: no rule 'error_rat'"),
        ("[models.'m']\nmax_tokenz = 5\n", r"nbllm.toml:2: 'max_tokenz' is not an nbllm option"),
    ],
)
def test_file_errors_name_the_file_line_and_option(project, text, message):
    (project / "nbllm.toml").write_text(text, encoding="utf-8")
    engine = FakeEngine()
    with pytest.raises(ConfigError, match=message):
        nbllm.run(DATA, engine=engine, model="m", progress=False)
    assert engine.calls == 0


def test_a_key_comes_from_a_named_variable_and_is_never_shown(project, monkeypatch):
    (project / "nbllm.toml").write_text("api_key = 'os.environ/MY_KEY'\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"names \$MY_KEY, which is not set"):
        show()
    monkeypatch.setenv("MY_KEY", "value-of-my-key-123")
    assert source_of("api_key")[0] == "value-of-my-key-123"
    table = show()
    assert "value-of-my-key-123" not in table
    assert "api_key" in table and "set" in table


def test_an_unreadable_file_is_an_error_not_ignored(project):
    path = project / "nbllm.toml"
    path.write_bytes(b"rpm = 5\n\xff\xfe\n")
    with pytest.raises(ConfigError, match="cannot read this nbllm configuration file"):
        nbllm.run(DATA, engine=FakeEngine(), model="m", progress=False)


def test_environment_values_are_checked_by_the_schema(monkeypatch):
    monkeypatch.setenv("NBLLM_RPM", "fast")
    with pytest.raises(ConfigError, match=r"\$NBLLM_RPM: rpm expects a number or 'auto'"):
        nbllm.run(DATA, engine=FakeEngine(), model="m", progress=False)
    monkeypatch.setenv("NBLLM_RPM", "auto")
    monkeypatch.setenv("NBLLM_PROGRESS", "false")
    assert source_of("rpm") == ("auto", "$NBLLM_RPM")
    assert source_of("progress") == (False, "$NBLLM_PROGRESS")


def test_nbllm_config_prints_every_option_and_its_source(project, capsys, monkeypatch):
    (project / "nbllm.toml").write_text("\nrpm = 250\n", encoding="utf-8")
    monkeypatch.setenv("NBLLM_MAX_TOKENS", "12")
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert set(lines) >= set(nbllm.RunConfig.model_fields) - {"listeners", "on_alert"}
    assert lines["rpm"].split()[1] == "250" and lines["rpm"].endswith(f"{project / 'nbllm.toml'}:2")
    assert lines["max_tokens"].endswith("$NBLLM_MAX_TOKENS")
    assert lines["timeout"].endswith("default")
    assert nbllm.config.show() == out.rstrip("\n")


def test_log_to_stderr_shows_the_nbllm_records(capsys):
    import logging

    handler = nbllm.log_to_stderr("warning")
    try:
        again = nbllm.log_to_stderr("warning")  # replaces, never doubles
        logging.getLogger("nbllm").warning("something to see")
        err = capsys.readouterr().err
        assert err.count("something to see") == 1 and "nbllm WARNING" in err
    finally:
        logging.getLogger("nbllm").removeHandler(again)
        logging.getLogger("nbllm").removeHandler(handler)
        logging.getLogger("nbllm").setLevel(logging.NOTSET)
