"""A deployment list in litellm's ``model_list`` format, read and checked before any request.

``router=`` takes the list users of litellm's Router already have, as a Python list, a
mapping with a ``model_list`` key, or the path of a YAML file such as litellm proxy's
``config.yaml``::

    model_list:
      - model_name: gpt-4o-mini              # the group that model= names
        litellm_params:
          model: openai/gpt-4o-mini
          api_base: https://api.openai.com/v1
          api_key: os.environ/OPENAI_API_KEY  # read from the environment when loaded
          rpm: 500                            # a number, or "auto"
          temperature: 0.2                    # any other parameter is passed on
    router_settings:                         # optional; litellm's names
      routing_strategy: least-busy
      fallbacks: [{gpt-4o-mini: [local]}]
      cooldown_time: 10
      allowed_fails: 3

Interface:

- ``load_deployments(router, environ=None) -> DeploymentList``: reads, checks and resolves
  the list (``os.environ/VAR`` values from ``environ``, by default ``os.environ``).
- ``DeploymentList``: ``deployments`` (a tuple, in list order), ``groups`` (in order of
  first appearance), ``in_group(group)``, ``check_group(group)``, ``by_id(id)``,
  ``group_params(group)`` (the sampling parameters the group's deployments set: what a
  checkpoint fingerprints instead of the list) and ``options`` (the ``RoutingOptions`` of
  ``router_settings``).
- ``Deployment``: one entry, frozen. ``id`` is short and stable, built from the model and
  the server's host and port (``gpt-4o-mini@api.openai.com``, ``llama@127.0.0.1:8001``;
  the provider without ``api_base``: ``claude-3-haiku@anthropic``), ``#2``, ``#3`` added
  in list order where entries would share one; never built from a key. ``api_key`` is a
  pydantic ``SecretStr`` (``.get_secret_value()`` for the engine), left out of ``repr``,
  ``str`` and ``==``; ``repr`` shows ``api_base`` without a password and ``params`` with
  credential-like values hidden.
- ``params`` holds every other ``litellm_params`` entry (provider parameters such as
  ``api_version`` as well as sampling ones); ``Deployment.sampling_params`` only those of
  ``SAMPLING_PARAMS``. Two deployments of one group that set a sampling parameter to
  different values are refused: an answer would depend on which one gave it.
- ``router_settings`` (or ``litellm_settings.fallbacks``): ``routing_strategy``,
  ``fallbacks``, ``cooldown_time`` and ``allowed_fails`` are read, checked as
  ``nbllm.executor.routing.routing_options`` checks the run's own options; litellm's
  other settings are ignored.

Every mistake is a ``ConfigError`` naming the entry, by index (``model_list[2]``) or by
file and line for YAML (the line of the offending key where there is one), and what was
expected; a key's value never appears in a message.

``weight`` is litellm's: a deployment's share of the simple shuffle. Where no deployment
of a group gives one, rpm (then tpm) weighs them, as litellm's Router does, when every
deployment of the group gives it; otherwise each weighs 1. ``order`` is litellm's priority
(lower first); a deployment without one comes after every one with one.
"""

from __future__ import annotations

import math
import os
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import SecretStr

from nbllm.dataset.cells import did_you_mean
from nbllm.errors import ConfigError
from nbllm.executor.routing import OPTION_CHECKS, Expected, RoutingOptions
from nbllm.redact import hidden, public_url

__all__ = ["SAMPLING_PARAMS", "Deployment", "DeploymentList", "Params", "load_deployments"]

#: Parameters that change the answer; every other parameter only says how to reach it.
SAMPLING_PARAMS = frozenset(
    {"temperature", "top_p", "top_k", "min_p", "max_tokens", "max_completion_tokens", "seed",
     "stop", "n", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
     "logprobs", "top_logprobs", "response_format", "tools", "tool_choice",
     "parallel_tool_calls", "reasoning_effort", "thinking"}
)  # fmt: skip

# litellm_params nbllm reads itself; every other one goes to the engine in ``params``.
_OWN = frozenset(
    {"model", "api_base", "api_key", "rpm", "tpm", "max_rpm", "max_tpm", "timeout",
     "max_parallel_requests", "weight", "order", "cost_per_1k_tokens"}
)  # fmt: skip
_ENV = "os.environ/"

Auto = Literal["auto"]


class Params(Mapping[str, Any]):
    """A deployment's other ``litellm_params``, read-only; ``repr`` hides credentials."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = dict(values)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Params({hidden(self._values)!r})"


@dataclass(frozen=True, repr=False)
class Deployment:
    """One entry of the list: a group's member, its server, its limits and its parameters.

    ``rpm``, ``tpm`` and ``max_parallel_requests`` are ``None`` (no limit of its own),
    a number, or ``"auto"`` (found while running, never above ``max_rpm`` / ``max_tpm``).
    ``where`` names the entry for messages (``model_list[2]`` or ``config.yaml line 14``).
    """

    id: str
    group: str
    model: str
    api_base: str | None = None
    api_key: SecretStr | None = field(default=None, compare=False)
    rpm: float | Auto | None = None
    tpm: float | Auto | None = None
    max_rpm: float | None = None
    max_tpm: float | None = None
    timeout: float | None = None
    max_parallel_requests: int | Auto | None = None
    weight: float = 1.0
    order: int | None = None
    cost_per_1k_tokens: float | None = None
    params: Mapping[str, Any] = field(default_factory=lambda: Params({}), hash=False)
    where: str = field(default="", compare=False)

    def __repr__(self) -> str:
        shown: list[str] = [f"id={self.id!r}", f"group={self.group!r}", f"model={self.model!r}"]
        if self.api_base is not None:
            shown.append(f"api_base={public_url(self.api_base)!r}")
        if self.api_key is not None:
            shown.append("api_key=<hidden>")
        for name in ("rpm", "tpm", "max_rpm", "max_tpm", "timeout", "max_parallel_requests"):
            if getattr(self, name) is not None:
                shown.append(f"{name}={getattr(self, name)!r}")
        shown.append(f"weight={self.weight!r}")
        for name in ("order", "cost_per_1k_tokens"):
            if getattr(self, name) is not None:
                shown.append(f"{name}={getattr(self, name)!r}")
        if self.params:
            shown.append(f"params={hidden(self.params)!r}")
        return f"Deployment({', '.join(shown)})"

    @property
    def sampling_params(self) -> dict[str, Any]:
        """The parameters of ``params`` that change the answer (``SAMPLING_PARAMS``)."""
        return {k: v for k, v in self.params.items() if k in SAMPLING_PARAMS}


@dataclass(frozen=True, repr=False)
class DeploymentList:
    """The checked deployments of ``router=`` and the routing options their file gives."""

    deployments: tuple[Deployment, ...]
    options: RoutingOptions = field(default_factory=RoutingOptions)
    source: str = "router="

    def __repr__(self) -> str:
        return (
            f"DeploymentList({len(self.deployments)} deployments, groups={list(self.groups)}, "
            f"options={self.options!r})"
        )

    def __iter__(self) -> Iterator[Deployment]:
        return iter(self.deployments)

    def __len__(self) -> int:
        return len(self.deployments)

    @property
    def groups(self) -> tuple[str, ...]:
        """The groups (``model_name``), in order of first appearance."""
        return tuple(dict.fromkeys(d.group for d in self.deployments))

    def in_group(self, group: str) -> tuple[Deployment, ...]:
        return tuple(d for d in self.deployments if d.group == group)

    def check_group(self, group: Any, option: str = "model") -> str:
        """``group``, if some entry has it as ``model_name``; else a ``ConfigError``."""
        if isinstance(group, str) and group in self.groups:
            return group
        msg = (
            f"{option}= names {group!r}, which no model_list entry has as model_name; "
            f"expected one of {', '.join(map(repr, self.groups))}"
            f"{did_you_mean(group, self.groups)}"
        )
        raise ConfigError(msg)

    def by_id(self, deployment_id: str) -> Deployment:
        for d in self.deployments:
            if d.id == deployment_id:
                return d
        raise KeyError(deployment_id)

    def group_params(self, group: str) -> dict[str, Any]:
        """The sampling parameters the group's deployments set (checked to agree at load).

        A checkpoint fingerprints the group and these, not the list: adding or removing a
        deployment changes neither.
        """
        out: dict[str, Any] = {}
        for d in self.in_group(self.check_group(group)):
            out.update(d.sampling_params)
        return dict(sorted(out.items()))


# --------------------------------------------------------------------------- reading


class _Lined(dict[Any, Any]):
    """A YAML mapping that remembers its line and the line of each key (from 1)."""

    line: int | None = None
    key_lines: dict[Any, int]


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_map(loader: _LineLoader, node: yaml.MappingNode) -> Iterator[_Lined]:
    data = _Lined()
    data.line = node.start_mark.line + 1
    data.key_lines = {
        k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)
    }
    yield data
    data.update(loader.construct_mapping(node))


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)


class _Place:
    """Names an entry (and a key of it) in messages: by index, and by file and line for YAML."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path

    def __call__(self, label: str, *nodes: Any, key: Any = None) -> str:
        if self.path is None:
            return label
        line = None
        for node in reversed(nodes):  # the innermost mapping that has the key
            if isinstance(node, _Lined):
                line = (node.key_lines.get(key) if key is not None else None) or node.line
                if line is not None:
                    break
        return f"{self.path} line {line} ({label})" if line else f"{self.path} ({label})"


def _fail(where: str, what: str) -> ConfigError:
    msg = f"router= {where}: {what}"
    return ConfigError(msg)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        msg = f"router= {str(path)!r}: no such file; expected a YAML file with a model_list: key"
        raise ConfigError(msg) from None
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        msg = f"router= {str(path)!r}: cannot read it ({why})"
        raise ConfigError(msg) from None
    try:
        return yaml.load(text, Loader=_LineLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f" at line {mark.line + 1}" if mark is not None else ""
        # The problem, not the snippet: the snippet may hold a key.
        msg = f"router= {str(path)!r}: not valid YAML{line}: {exc.problem or exc.context}"
        raise ConfigError(msg) from None
    except yaml.YAMLError as exc:
        msg = f"router= {str(path)!r}: not valid YAML ({type(exc).__name__})"
        raise ConfigError(msg) from None


def load_deployments(router: Any, environ: Mapping[str, str] | None = None) -> DeploymentList:
    """The checked deployments of ``router`` (see the module docstring for the forms)."""
    env = os.environ if environ is None else environ
    place = _Place()
    config: Any = router
    if isinstance(router, (str, os.PathLike)):
        path = Path(router).expanduser()
        config = _read_yaml(path)
        place = _Place(str(path))
        if not isinstance(config, Mapping) or "model_list" not in config:
            msg = f"router= {str(path)!r}: expected a YAML mapping with a model_list: key"
            raise ConfigError(msg)
    if isinstance(config, Mapping):
        if "model_list" not in config:
            msg = "router= expected a mapping with a model_list key, a list or a YAML path"
            raise ConfigError(msg)
        entries, settings = config["model_list"], _settings(config)
    elif isinstance(router, (list, tuple)):
        entries, settings = router, {}
    else:
        msg = (
            "router= expected a list in litellm's model_list format or the path of a YAML "
            f"file with a model_list: key, got {type(router).__name__}"
        )
        raise ConfigError(msg)
    if not isinstance(entries, (list, tuple)) or not entries:
        where = place("model_list", config, key="model_list")
        raise _fail(where, "expected a non-empty list of deployments")
    found = [_entry(i, entry, place, env) for i, entry in enumerate(entries)]
    deployments = _with_ids(_with_weights(found))
    _check_params_agree(deployments)
    listed = DeploymentList(deployments, source=place.path or "router=")
    options = _options_of_settings(settings, listed, place)
    return replace(listed, options=options)


def _settings(config: Mapping[str, Any]) -> Mapping[str, Any]:
    settings = config.get("router_settings") or {}
    if not isinstance(settings, Mapping):
        return {}
    litellm_settings = config.get("litellm_settings")
    # litellm's proxy also takes fallbacks under litellm_settings.
    if (
        "fallbacks" not in settings
        and isinstance(litellm_settings, Mapping)
        and "fallbacks" in litellm_settings
    ):
        merged = _Lined(settings)
        merged.line = getattr(settings, "line", None) or getattr(litellm_settings, "line", None)
        merged.key_lines = dict(getattr(settings, "key_lines", {}))
        merged["fallbacks"] = litellm_settings["fallbacks"]
        line = getattr(litellm_settings, "key_lines", {}).get("fallbacks")
        if line:
            merged.key_lines["fallbacks"] = line
        return merged
    return settings


def _entry(i: int, entry: Any, place: _Place, env: Mapping[str, str]) -> tuple[Deployment, bool]:
    """The entry's deployment (its id still to give) and whether it gives a weight."""
    label = f"model_list[{i}]"
    if not isinstance(entry, Mapping):
        what = f"expected a mapping with model_name and litellm_params, got {type(entry).__name__}"
        raise _fail(place(label, entry), what)
    group = entry.get("model_name")
    if not isinstance(group, str) or not group.strip():
        what = f"model_name is missing; expected the group's name, got {_shown(group)}"
        raise _fail(place(label, entry, key="model_name"), what)
    lp = entry.get("litellm_params")
    if not isinstance(lp, Mapping):
        what = "litellm_params is missing; expected a mapping with at least model"
        raise _fail(place(label, entry, key="litellm_params"), what)

    def at(key: str) -> str:
        if key in lp:
            return place(label, entry, lp, key=key)
        return place(label, entry, key="litellm_params")

    values: dict[str, Any] = {}
    for key, value in lp.items():
        values[key] = _resolved(key, value, env, at(key))
    model = values.get("model")
    if not isinstance(model, str) or not model.strip():
        missing = "is missing; expected" if model is None else "expected"
        what = (
            f"litellm_params.model {missing} a model such as 'openai/gpt-4o-mini', "
            f"got {_shown(model)}"
        )
        raise _fail(at("model"), what)
    # litellm also reads rpm and tpm beside litellm_params.
    for key in ("rpm", "tpm"):
        if key not in values and key in entry:
            values[key] = entry[key]

    def num(key: str, *, auto: bool = False, integer: bool = False, zero: bool = False) -> Any:
        if key not in values or values[key] is None:
            return None
        value = values[key]
        if auto and value == "auto":
            return "auto"
        ok = isinstance(value, int) if integer else isinstance(value, (int, float))
        ok = ok and not isinstance(value, bool) and math.isfinite(value)
        if ok and (value > 0 or (zero and value == 0)):
            return value
        kind = "a whole number" if integer else "a number"
        bound = ">= 0" if zero else "> 0"
        also = ' or "auto"' if auto else ""
        name = f"litellm_params.{key}" if key in lp else key
        what = f"{name} expected {kind} {bound}{also}, got {_shown(value)}"
        raise _fail(at(key) if key in lp else place(label, entry, key=key), what)

    weight = num("weight")
    found = Deployment(
        id="",
        group=group,
        model=model,
        api_base=_api_base(values.get("api_base"), at("api_base")),
        api_key=_api_key(values.get("api_key"), at("api_key")),
        rpm=num("rpm", auto=True),
        tpm=num("tpm", auto=True),
        max_rpm=num("max_rpm"),
        max_tpm=num("max_tpm"),
        timeout=num("timeout"),
        max_parallel_requests=num("max_parallel_requests", auto=True, integer=True),
        weight=weight or 1.0,
        order=num("order", integer=True, zero=True),
        cost_per_1k_tokens=num("cost_per_1k_tokens", zero=True),
        params=Params({k: v for k, v in values.items() if k not in _OWN}),
        where=place(label, entry),
    )
    return found, weight is not None


def _shown(value: Any) -> str:
    if value is None:
        return "nothing"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _resolved(key: str, value: Any, env: Mapping[str, str], where: str) -> Any:
    """``value``, or the environment variable an ``os.environ/VAR`` value names."""
    if not (isinstance(value, str) and value.startswith(_ENV)):
        return value
    name = value[len(_ENV) :]
    found = env.get(name)
    if not found:
        what = f"litellm_params.{key} names os.environ/{name}, but {name} is not set (or empty)"
        raise _fail(where, what)
    return found


def _api_base(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            parts = urllib.parse.urlsplit(value)
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            parts = None
        if parts is not None and parts.scheme in ("http", "https") and parts.hostname:
            return value
    shown = repr(public_url(value)) if isinstance(value, str) else type(value).__name__
    what = f"litellm_params.api_base expected a URL such as 'http://127.0.0.1:8000/v1', got {shown}"
    raise _fail(where, what)


def _api_key(value: Any, where: str) -> SecretStr | None:
    if value is None:
        return None
    if isinstance(value, str):
        return SecretStr(value)
    what = f"litellm_params.api_key expected a string, got a {type(value).__name__}"
    raise _fail(where, what)


def _with_weights(found: list[tuple[Deployment, bool]]) -> list[Deployment]:
    """Each deployment's shuffle weight: its own, else its group's rpm or tpm, else 1."""
    out = [d for d, _ in found]
    for group in dict.fromkeys(d.group for d in out):
        members = [i for i, d in enumerate(out) if d.group == group]
        if any(found[i][1] for i in members):
            continue
        for limit in ("rpm", "tpm"):
            values = [getattr(out[i], limit) for i in members]
            if all(isinstance(v, (int, float)) for v in values):
                for i, v in zip(members, values, strict=True):
                    out[i] = replace(out[i], weight=float(v))
                break
    return out


def _base_id(d: Deployment) -> str:
    return deployment_id(d.model, d.api_base)


def deployment_id(model: str, api_base: str | None) -> str:
    """A short, stable id for ``model`` served at ``api_base``: the model's last path
    segment, then ``@host[:port]`` (``llama@127.0.0.1:8001``), or ``@provider`` without an
    address (``claude-3-haiku@anthropic``). Never a key or a password."""
    name = model.rstrip("/").rsplit("/", 1)[-1] or model
    if api_base is None:
        provider, sep, _ = model.partition("/")
        return f"{name}@{provider}" if sep and provider else name
    parts = urllib.parse.urlsplit(api_base)
    host = (parts.hostname or "").lower()
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    return f"{name}@{host}:{parts.port}" if parts.port else f"{name}@{host}"


def _with_ids(found: Iterable[Deployment]) -> tuple[Deployment, ...]:
    used: set[str] = set()
    out = []
    for d in found:
        base = candidate = _base_id(d)
        n = 1
        while candidate in used:
            n += 1
            candidate = f"{base}#{n}"
        used.add(candidate)
        out.append(replace(d, id=candidate))
    return tuple(out)


def _check_params_agree(deployments: tuple[Deployment, ...]) -> None:
    """One group, one set of sampling parameters: else an answer would depend on which
    deployment gave it, and the checkpoint could not name the parameters of the run."""
    first: dict[tuple[str, str], tuple[Deployment, Any]] = {}
    for d in deployments:
        for name, value in d.sampling_params.items():
            seen = first.setdefault((d.group, name), (d, value))
            if seen[1] != value:
                what = (
                    f"litellm_params.{name} differs from {seen[0].where}'s in group "
                    f"{d.group!r}; expected one value per group (or set it on the run)"
                )
                raise _fail(d.where, what)


def _options_of_settings(
    settings: Mapping[str, Any], listed: DeploymentList, place: _Place
) -> RoutingOptions:
    """The routing options of litellm's ``router_settings`` (the names it reads)."""
    options = RoutingOptions()
    for attr, (check, key) in OPTION_CHECKS.items():
        if settings.get(key) is None:
            continue
        try:
            value = check(settings[key], listed.groups)
        except Expected as exc:
            raise _fail(place(f"router_settings.{key}", settings, key=key), str(exc)) from None
        options = replace(options, **{attr: value})
    return options
