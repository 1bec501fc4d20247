"""Checks of the executor's own arguments, for code that builds an ``Executor`` directly.

A run made through ``nbllm.run`` has its options checked by ``RunConfig`` first; these
give the same kind of ``ConfigError`` to a caller that skips it.
"""

from __future__ import annotations

import math

from nbllm.errors import ConfigError

__all__ = ["check_seconds", "check_whole"]


def check_whole(option: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        msg = f"{option}= expected a whole number >= 1, got {value!r}"
        raise ConfigError(msg)


def check_seconds(option: str, value: object, *, zero: bool = False, none: bool = False) -> None:
    """A number of seconds: > 0 (>= 0 when ``zero``), or None when ``none``."""
    if value is None and none:
        return
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if number is None or math.isnan(number) or number < 0 or (number == 0 and not zero):
        expected = f"a number {'>=' if zero else '>'} 0{' or None' if none else ''}"
        msg = f"{option}= expected {expected}, got {value!r}"
        raise ConfigError(msg)
