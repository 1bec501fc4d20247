"""Deployment lists in litellm's model_list format: read from a list or a YAML file, every
mistake refused with the entry it is in, keys resolved from the environment and never shown."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from nbllm.errors import ConfigError
from nbllm.executor.deployments import Deployment, DeploymentList, load_deployments
from nbllm.executor.routing import RoutingOptions, routing_options

SENTINEL = "sk-SENTINEL-4f1c9a77e2"


def entry(group: str = "gpt", **params: object) -> dict[str, object]:
    return {"model_name": group, "litellm_params": {"model": "openai/gpt-4o-mini", **params}}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- reading


def test_a_list_becomes_deployments_with_their_limits_and_params():
    listed = load_deployments(
        [
            entry(
                api_base="https://api.openai.com/v1",
                api_key=SENTINEL,
                rpm=500,
                tpm=90_000,
                timeout=30,
                max_parallel_requests=8,
                order=1,
                temperature=0.2,
                api_version="2024-02-01",
            ),
            {"model_name": "local", "litellm_params": {"model": "openai/llama", "rpm": "auto"}},
        ]
    )
    first, second = listed.deployments
    assert first.group == "gpt" and first.model == "openai/gpt-4o-mini"
    assert first.api_base == "https://api.openai.com/v1"
    assert first.api_key is not None and first.api_key.get_secret_value() == SENTINEL
    assert (first.rpm, first.tpm, first.timeout) == (500, 90_000, 30)
    assert (first.max_parallel_requests, first.order) == (8, 1)
    assert dict(first.params) == {"temperature": 0.2, "api_version": "2024-02-01"}
    assert first.sampling_params == {"temperature": 0.2}
    assert second.rpm == "auto" and second.api_key is None and second.order is None
    assert listed.groups == ("gpt", "local")
    assert listed.in_group("local") == (second,)
    assert listed.options == RoutingOptions()


def test_a_yaml_file_is_read_with_its_router_settings(tmp_path):
    path = write(
        tmp_path,
        """
        model_list:
          - model_name: gpt
            litellm_params:
              model: openai/gpt-4o-mini
              api_base: http://127.0.0.1:8001/v1
          - model_name: backup
            litellm_params:
              model: anthropic/claude-3-haiku
        router_settings:
          routing_strategy: latency-based-routing   # litellm's name
          fallbacks: [{gpt: [backup]}]
          cooldown_time: 12
          allowed_fails: 2
          num_retries: 4                            # litellm's, not read here
        """,
    )
    listed = load_deployments(path)
    assert [d.id for d in listed] == ["gpt-4o-mini@127.0.0.1:8001", "claude-3-haiku@anthropic"]
    assert listed.options == RoutingOptions(
        strategy="latency-based", fallbacks={"gpt": ("backup",)}, cooldown_s=12.0, allowed_fails=2
    )
    assert load_deployments(str(path)).deployments == listed.deployments


def test_rpm_and_tpm_beside_litellm_params_are_read_as_litellm_reads_them():
    listed = load_deployments([{**entry(), "rpm": 60, "tpm": 1000}])
    assert (listed.deployments[0].rpm, listed.deployments[0].tpm) == (60, 1000)
    with pytest.raises(ConfigError, match=r"^router= model_list\[0\]: rpm expected a number > 0"):
        load_deployments([{**entry(), "rpm": -1}])


def test_fallbacks_under_litellm_settings_are_read_too(tmp_path):
    path = write(
        tmp_path,
        """
        model_list:
          - {model_name: a, litellm_params: {model: openai/x}}
          - {model_name: b, litellm_params: {model: openai/y}}
        litellm_settings:
          fallbacks: [{a: [c]}]
        """,
    )
    with pytest.raises(ConfigError, match=r"line 5 \(router_settings.fallbacks\).*'c'"):
        load_deployments(path)


def test_an_environment_key_is_read_at_load(monkeypatch):
    monkeypatch.setenv("N3_TEST_KEY", SENTINEL)
    monkeypatch.setenv("N3_TEST_BASE", "http://127.0.0.1:9000/v1")
    listed = load_deployments(
        [entry(api_key="os.environ/N3_TEST_KEY", api_base="os.environ/N3_TEST_BASE")]
    )
    (d,) = listed.deployments
    assert d.api_key is not None and d.api_key.get_secret_value() == SENTINEL
    assert d.api_base == "http://127.0.0.1:9000/v1"
    other = load_deployments([entry(api_key="os.environ/X")], environ={"X": "from-mapping"})
    assert other.deployments[0].api_key.get_secret_value() == "from-mapping"  # type: ignore[union-attr]


def test_an_unset_environment_key_names_the_entry_and_the_variable(monkeypatch):
    monkeypatch.delenv("N3_UNSET_KEY", raising=False)
    with pytest.raises(ConfigError) as info:
        load_deployments([entry(), entry(api_key="os.environ/N3_UNSET_KEY")])
    assert str(info.value) == (
        "router= model_list[1]: litellm_params.api_key names os.environ/N3_UNSET_KEY, "
        "but N3_UNSET_KEY is not set (or empty)"
    )


# --------------------------------------------------------------------------- bad input

BAD_ENTRIES = [
    ({"litellm_params": {"model": "x"}}, "model_name is missing"),
    ({"model_name": "  ", "litellm_params": {"model": "x"}}, "model_name is missing"),
    ({"model_name": "g"}, "litellm_params is missing"),
    ({"model_name": "g", "litellm_params": {"api_base": "http://h/v1"}}, "model is missing"),
    ({"model_name": "g", "litellm_params": {"model": 4}}, "model expected a model such as"),
    (entry(rpm="fast"), "litellm_params.rpm expected a number > 0 or \"auto\", got 'fast'"),
    (entry(rpm=-1), "litellm_params.rpm expected a number > 0"),
    (entry(rpm=True), "litellm_params.rpm expected a number > 0"),
    (entry(tpm=-5), "litellm_params.tpm expected a number > 0"),
    (entry(weight=-2), "litellm_params.weight expected a number > 0, got -2"),
    (entry(weight="heavy"), "litellm_params.weight expected a number > 0"),
    (entry(timeout=0), "litellm_params.timeout expected a number > 0, got 0"),
    (entry(timeout=float("nan")), "litellm_params.timeout expected a number > 0"),
    (entry(max_parallel_requests=2.5), "max_parallel_requests expected a whole number > 0"),
    (entry(order=-1), "litellm_params.order expected a whole number >= 0, got -1"),
    (entry(api_base="localhost:8000"), "api_base expected a URL such as"),
    (entry(api_key=12345), "litellm_params.api_key expected a string, got a int"),
    ("gpt-4o", "expected a mapping with model_name and litellm_params, got str"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_ENTRIES)
def test_a_bad_entry_is_named_by_its_index(bad, message):
    with pytest.raises(ConfigError) as info:
        load_deployments([entry(), entry(), bad])
    text = str(info.value)
    assert text.startswith("router= model_list[2]: "), text
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize(
    ("router", "message"),
    [
        ([], "expected a non-empty list of deployments"),
        ({"model_list": "gpt"}, "expected a non-empty list of deployments"),
        ({"router_settings": {}}, "expected a mapping with a model_list key"),
        (42, "expected a list in litellm's model_list format or the path of a YAML file"),
    ],
)
def test_a_router_of_the_wrong_shape_is_refused(router, message):
    with pytest.raises(ConfigError, match=message):
        load_deployments(router)


def test_a_bad_yaml_entry_is_named_by_its_line(tmp_path):
    path = write(
        tmp_path,
        """
        model_list:
          - model_name: gpt
            litellm_params:
              model: openai/gpt-4o-mini
          - model_name: gpt
            litellm_params:
              api_base: http://127.0.0.1:8001/v1
          - model_name: gpt
            litellm_params:
              model: openai/gpt-4o-mini
              rpm: -3
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_deployments(path)
    assert str(info.value) == (
        f"router= {path} line 6 (model_list[1]): litellm_params.model is missing; "
        "expected a model such as 'openai/gpt-4o-mini', got nothing"
    )
    path.write_text(path.read_text().replace("      api_base: http", "      model: x\n      x: h"))
    with pytest.raises(ConfigError) as info:
        load_deployments(path)
    assert str(info.value).startswith(f"router= {path} line 12 (model_list[2]): litellm_params.rpm")


def test_an_entry_without_model_name_is_named_by_its_line(tmp_path):
    path = write(
        tmp_path,
        """
        model_list:
          - model_name: gpt
            litellm_params: {model: openai/x}

          - litellm_params: {model: openai/y}
        """,
    )
    with pytest.raises(ConfigError, match=r"line 5 \(model_list\[1\]\): model_name is missing"):
        load_deployments(path)


def test_a_yaml_syntax_error_names_its_line_and_not_the_text(tmp_path):
    path = write(
        tmp_path,
        f"""
        model_list:
          - model_name: gpt
            litellm_params:
              model: openai/gpt-4o-mini
              api_key: "{SENTINEL}
              rpm: 5
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_deployments(path)
    text = str(info.value)
    assert text.startswith(f"router= {str(path)!r}: not valid YAML at line ")
    assert SENTINEL not in text


def test_a_missing_or_unreadable_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no such file; expected a YAML file with a model_list"):
        load_deployments(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="cannot read it"):
        load_deployments(tmp_path)  # a folder
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00model_list")
    with pytest.raises(ConfigError, match="cannot read it"):
        load_deployments(tmp_path / "binary.yaml")
    path = write(tmp_path, "router_settings: {}\n")
    with pytest.raises(ConfigError, match="expected a YAML mapping with a model_list: key"):
        load_deployments(path)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ("routing_strategy: fastest", "routing_strategy\\): expected one of 'simple-shuffle'"),
        ("routing_strategy: least_busy", "\\(did you mean 'least-busy'\\?\\)"),
        ("fallbacks: [{gpt: [nowhere]}]", "fallbacks\\): names group 'nowhere', which no"),
        ("fallbacks: [{nowhere: [gpt]}]", "names group 'nowhere'"),
        ("fallbacks: [{gpt: [gpt]}]", "lets group 'gpt' fall back to itself"),
        ("fallbacks: {gpt: 3}", 'expected a list like \\[\\{"group"'),
        ("cooldown_time: -1", "cooldown_time\\): expected a number of seconds >= 0, got -1"),
        ("allowed_fails: 0", "allowed_fails\\): expected a whole number >= 1, got 0"),
    ],
)
def test_bad_router_settings_are_named_by_their_line(tmp_path, settings, message):
    path = write(
        tmp_path,
        f"""
        model_list:
          - {{model_name: gpt, litellm_params: {{model: openai/x}}}}
          - {{model_name: other, litellm_params: {{model: openai/y}}}}
        router_settings:
          {settings}
        """,
    )
    with pytest.raises(ConfigError, match=f"^router= {path} line 5 .*{message}"):
        load_deployments(path)


def test_one_group_takes_one_value_per_sampling_parameter():
    with pytest.raises(ConfigError) as info:
        load_deployments([entry(temperature=0.2), entry("other"), entry(temperature=0.7)])
    assert str(info.value) == (
        "router= model_list[2]: litellm_params.temperature differs from model_list[0]'s in "
        "group 'gpt'; expected one value per group (or set it on the run)"
    )
    # Provider parameters may differ: they say how to reach a deployment, not what it answers.
    load_deployments([entry(api_version="a"), entry(api_version="b")])


# --------------------------------------------------------------------------- ids


def test_ids_name_the_model_and_the_server_and_are_stable():
    listed = [
        entry(api_base="https://api.openai.com/v1", api_key=SENTINEL),
        {"model_name": "l", "litellm_params": {"model": "openai/llama", "api_base": "http://127.0.0.1:8001/v1"}},
        {"model_name": "l", "litellm_params": {"model": "openai/org/m", "api_base": "http://[::1]:80/v1"}},
        {"model_name": "c", "litellm_params": {"model": "anthropic/claude-3-haiku"}},
        {"model_name": "c", "litellm_params": {"model": "gpt-4o"}},
        {"model_name": "c", "litellm_params": {"model": "m", "api_base": "http://u:pw@Host.Example:8/"}},
    ]  # fmt: skip
    ids = [d.id for d in load_deployments(listed)]
    assert ids == [
        "gpt-4o-mini@api.openai.com",
        "llama@127.0.0.1:8001",
        "m@[::1]:80",
        "claude-3-haiku@anthropic",
        "gpt-4o",
        "m@host.example:8",
    ]
    assert [d.id for d in load_deployments(listed)] == ids


def test_entries_that_would_share_an_id_are_numbered_in_list_order():
    base = "https://api.openai.com/v1"
    listed = load_deployments(
        [entry(api_base=base, api_key="k1-aaaaaaaa"), entry("b", model="openai/other"),
         entry(api_base=base, api_key="k2-bbbbbbbb"), entry(api_base=base, api_key="k3-cccccccc")]
    )  # fmt: skip
    assert [d.id for d in listed] == [
        "gpt-4o-mini@api.openai.com",
        "other@openai",
        "gpt-4o-mini@api.openai.com#2",
        "gpt-4o-mini@api.openai.com#3",
    ]
    assert listed.by_id("gpt-4o-mini@api.openai.com#3").api_key.get_secret_value() == "k3-cccccccc"  # type: ignore[union-attr]
    with pytest.raises(KeyError):
        listed.by_id("absent")


# --------------------------------------------------------------------------- secrets


def test_nothing_shown_holds_a_key(monkeypatch):
    monkeypatch.setenv("N3_SECRET_TOKEN", SENTINEL)
    listed = load_deployments(
        [
            entry(
                api_key=SENTINEL,
                api_base=f"http://user:{SENTINEL}@127.0.0.1:8001/v1",
                extra_headers={"Authorization": f"Bearer {SENTINEL}"},
                aws_secret_access_key="os.environ/N3_SECRET_TOKEN",
            )
        ]
    )
    d = listed.deployments[0]
    shown = [repr(d), str(d), repr(listed), str(listed), d.id, d.where, repr(listed.options)]
    shown += [repr(d.params), str(d.sampling_params), str(listed.group_params("gpt"))]
    for text in shown:
        assert SENTINEL not in text
    assert "api_key=<hidden>" in repr(d)
    assert "<hidden>" in repr(d) and "127.0.0.1:8001" in repr(d)
    # The key is still there for the engine.
    assert d.api_key is not None and d.api_key.get_secret_value() == SENTINEL
    assert d.params["aws_secret_access_key"] == SENTINEL


def test_a_message_about_an_entry_never_holds_its_key():
    for bad in (
        entry(api_key=SENTINEL, rpm=-1),
        entry(api_key=SENTINEL, api_base=f"http://u:{SENTINEL}@"),
    ):
        with pytest.raises(ConfigError) as info:
            load_deployments([bad])
        assert SENTINEL not in str(info.value)  # fmt: skip


def test_deployments_that_differ_only_by_key_compare_equal():
    one, two = load_deployments([entry(api_key="key-one-1111"), entry("b", api_key="key-two-2222")])
    assert one != two
    assert one == Deployment(id=one.id, group="gpt", model=one.model, api_key=None)
    assert hash(one) == hash(Deployment(id=one.id, group="gpt", model=one.model))


# --------------------------------------------------------------------------- groups


def test_group_params_are_the_sampling_parameters_and_ignore_the_list_size():
    one = load_deployments([entry(temperature=0.0, seed=7, api_version="x")])
    more = load_deployments(
        [entry(temperature=0.0, seed=7, api_version="x"), entry(api_base="http://h:1/v1"),
         entry("b", temperature=1.0)]
    )  # fmt: skip
    assert one.group_params("gpt") == {"seed": 7, "temperature": 0.0}
    assert more.group_params("gpt") == one.group_params("gpt")
    assert more.group_params("b") == {"temperature": 1.0}
    with pytest.raises(ConfigError, match=r"model= names 'gtp'.*\(did you mean 'gpt'\?\)"):
        more.group_params("gtp")
    assert more.check_group("b") == "b"


def test_weights_default_to_one_or_follow_rpm_as_litellm_does():
    listed = load_deployments(
        [entry(weight=3), entry(),                       # a weight given: the others weigh 1
         entry("r", rpm=100), entry("r", rpm=300),       # none given: rpm weighs
         entry("t", tpm=10), entry("t", rpm=5, tpm=30),  # rpm not on all: tpm weighs
         entry("n", rpm=100), entry("n")]                # neither on all: 1 each
    )  # fmt: skip
    assert [d.weight for d in listed] == [3.0, 1.0, 100.0, 300.0, 10.0, 30.0, 1.0, 1.0]


# --------------------------------------------------------------------------- options


def test_run_options_override_the_file_and_are_checked():
    listed = load_deployments(
        {
            "model_list": [entry(), entry("b"), entry("c")],
            "router_settings": {"routing_strategy": "usage-based-routing-v2", "cooldown_time": 9},
        }
    )
    assert listed.options.strategy == "usage-based" and listed.options.cooldown_s == 9.0
    options = routing_options(listed, routing="least-busy", fallbacks=[{"gpt": ["b", "c"]}])
    assert options == RoutingOptions(
        strategy="least-busy", fallbacks={"gpt": ("b", "c")}, cooldown_s=9.0, allowed_fails=3
    )
    assert routing_options(listed, cooldown_s=0, allowed_fails=5).allowed_fails == 5
    bad = [
        ({"routing": "round-robin"}, "routing= expected one of 'simple-shuffle', 'least-busy'"),
        ({"fallbacks": [{"gpt": ["z"]}]}, "fallbacks= names group 'z'"),
        ({"fallbacks": ["b"]}, "fallbacks= expected a list like"),
        ({"cooldown_s": -0.5}, "cooldown_s= expected a number of seconds >= 0, got -0.5"),
        ({"cooldown_s": float("inf")}, "cooldown_s= expected a number of seconds >= 0"),
        ({"allowed_fails": 1.5}, "allowed_fails= expected a whole number >= 1, got 1.5"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ConfigError) as info:
            routing_options(listed, **kwargs)  # type: ignore[arg-type]
        assert str(info.value).startswith(message), str(info.value)


def test_the_list_is_a_sequence_of_its_deployments():
    listed = load_deployments([entry(), entry("b")])
    assert isinstance(listed, DeploymentList)
    assert len(listed) == 2 and list(listed) == list(listed.deployments)
