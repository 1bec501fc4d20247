"""The rules of ``alerts=``: their names, defaults and the check of a user's (see
``nbllm.alerts`` for what each rule watches and where an alert goes)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nbllm.dataset.cells import did_you_mean
from nbllm.errors import ConfigError

__all__ = ["DEFAULTS", "SETTINGS", "AlertRules", "alert_rules"]

#: Each rule's default threshold (see the module).
DEFAULTS: dict[str, float] = {
    "latency_p95_s": 60.0,
    "error_rate": 0.25,
    "rate_limited_rate": 0.2,
    "throughput_drop": 0.5,
    "gpu_memory": 0.95,
    "spend_share": 0.8,
}
SETTINGS = {"window_s": 60.0, "cooldown_s": 300.0}


@dataclass(frozen=True)
class AlertRules:
    """The rules in force: ``thresholds`` by rule (the rules turned off left out)."""

    thresholds: Mapping[str, float]
    window_s: float = SETTINGS["window_s"]
    cooldown_s: float = SETTINGS["cooldown_s"]


def alert_rules(given: Any) -> AlertRules | None:
    """``alerts=`` checked: None (the defaults), False (none), or a dict of rule ->
    threshold or False, with ``window_s`` / ``cooldown_s``; ``ConfigError`` naming a rule
    that does not exist (with the closest name) or a threshold that is not a number > 0."""
    if given is False:
        return None
    if given is None or given is True:
        return AlertRules(dict(DEFAULTS))
    if not isinstance(given, Mapping):
        msg = f"alerts= expected a dict of rule -> threshold (or False), got {type(given).__name__}"
        raise ConfigError(msg)
    thresholds = dict(DEFAULTS)
    settings = dict(SETTINGS)
    for name, value in given.items():
        if name not in DEFAULTS and name not in SETTINGS:
            known = [*DEFAULTS, *SETTINGS]
            msg = f"alerts=: no rule {name!r}{did_you_mean(str(name), known)}; the rules: "
            raise ConfigError(msg + ", ".join(known))
        if value is False and name in DEFAULTS:
            thresholds.pop(name)
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not value > 0:
            msg = f"alerts={{{name!r}: ...}} expected a number > 0 (or False), got {value!r}"
            raise ConfigError(msg)
        if name in SETTINGS:
            settings[name] = float(value)
        else:
            thresholds[name] = float(value)
    return AlertRules(thresholds, settings["window_s"], settings["cooldown_s"])
