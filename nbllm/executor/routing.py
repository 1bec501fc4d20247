"""Choosing the deployment that answers a request: nbllm's own router, pure and without I/O.

Interface:

- ``RoutingOptions``: ``strategy``, ``fallbacks``, ``cooldown_s``, ``allowed_fails``;
  ``routing_options(deployments, routing=, fallbacks=, cooldown_s=, allowed_fails=)`` is
  the list's ``router_settings`` (``deployments.options``) with each run option given in
  its place, checked (a ``ConfigError`` naming the option).
- ``DeploymentLoad(clock=time.monotonic, window_s=60.0)``: what the router knows of one
  deployment. The executor calls ``start()`` as a request is sent and
  ``finish(latency_s=..., tokens=...)`` as it ends (``latency_s=None`` for a failure);
  it sets ``rpm`` / ``tpm`` to the limits in force where they adapt (``"auto"``).
- ``Router(deployments, options, is_open=None, rng=None)``;
  ``router.pick(group, loads, avoid=()) -> Deployment | None`` with ``loads`` a mapping from
  deployment id to its ``DeploymentLoad`` (a deployment missing there counts as idle and
  unmeasured). ``None``: no deployment of the group or of its fallbacks is available;
  the caller waits (breakers say until when) and asks again.

How ``pick`` chooses, for the group and then each of its fallback groups in order:

1. deployments whose breaker is open (``is_open(deployment)``) are unavailable; a group
   with none available passes to the next fallback group;
2. ``order`` (litellm's priority): only the lowest order among the available ones, those
   without an order after every one with one;
3. those with a free slot (fewer than ``max_parallel_requests`` in flight) are preferred;
   when all are full the choice is among all of them (the request queues for a slot, as
   it would without routing: a full deployment is busy, not broken);
4. the strategy:

   - ``simple-shuffle``: weighted random, by ``Deployment.weight``;
   - ``least-busy``: the fewest requests in flight;
   - ``latency-based``: a deployment not yet measured (or last measured more than
     ``window_s`` ago) with nothing in flight is tried first, so each gets measured;
     then the lowest latency, an exponentially weighted mean (``LATENCY_WEIGHT`` for the
     newest sample);
   - ``usage-based``: the lowest share of its own ``rpm`` / ``tpm`` used in the last
     ``window_s`` (requests count as they are sent, tokens as they come back); one
     without a limit is measured against the largest rpm among them.

   Ties go to a random one of the tied, from ``rng`` (seed it for tests).
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from nbllm.dataset.cells import did_you_mean
from nbllm.errors import ConfigError

if TYPE_CHECKING:
    from nbllm.executor.deployments import Deployment, DeploymentList

__all__ = [
    "DEFAULT_ALLOWED_FAILS",
    "DEFAULT_COOLDOWN_S",
    "LATENCY_WEIGHT",
    "ROUTING_STRATEGIES",
    "DeploymentLoad",
    "Router",
    "RoutingOptions",
    "routing_options",
]

ROUTING_STRATEGIES = ("simple-shuffle", "least-busy", "latency-based", "usage-based")
# litellm's own names for the same strategies, so that existing files keep working.
_STRATEGY_ALIASES = {
    "latency-based-routing": "latency-based",
    "usage-based-routing": "usage-based",
    "usage-based-routing-v2": "usage-based",
}
#: litellm Router's defaults (its DEFAULT_COOLDOWN_TIME_SECONDS and DEFAULT_ALLOWED_FAILS).
DEFAULT_COOLDOWN_S = 5.0
DEFAULT_ALLOWED_FAILS = 3
#: The weight of the newest latency sample in a deployment's mean.
LATENCY_WEIGHT = 0.3


@dataclass(frozen=True)
class RoutingOptions:
    """How requests are spread: ``strategy`` (one of ``ROUTING_STRATEGIES``), the
    ``fallbacks`` of each group (groups tried in order when every deployment of the group
    is unavailable) and the breakers' ``cooldown_s`` and ``allowed_fails``."""

    strategy: str = "simple-shuffle"
    fallbacks: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )
    cooldown_s: float = DEFAULT_COOLDOWN_S
    allowed_fails: int = DEFAULT_ALLOWED_FAILS

    def __repr__(self) -> str:
        return (
            f"RoutingOptions(strategy={self.strategy!r}, fallbacks={dict(self.fallbacks)!r}, "
            f"cooldown_s={self.cooldown_s!r}, allowed_fails={self.allowed_fails!r})"
        )


class Expected(ValueError):
    """What an option's value should have been; the caller adds which option it was."""


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_strategy(value: Any, groups: Sequence[str]) -> str:
    if isinstance(value, str):
        key = value.strip().lower()
        key = _STRATEGY_ALIASES.get(key, key)
        if key in ROUTING_STRATEGIES:
            return key
    hint = did_you_mean(value, [*ROUTING_STRATEGIES, *_STRATEGY_ALIASES])
    known = ", ".join(map(repr, ROUTING_STRATEGIES))
    msg = f"expected one of {known}, got {_shown(value)}{hint}"
    raise Expected(msg)


def check_fallbacks(value: Any, groups: Sequence[str]) -> Mapping[str, tuple[str, ...]]:
    """litellm's form, ``[{"group": ["other", ...]}, ...]`` (or one such mapping)."""
    items = [value] if isinstance(value, Mapping) else value
    shape = f'expected a list like [{{"group": ["other-group", ...]}}], got {_shown(value)}'
    if not isinstance(items, (list, tuple)):
        raise Expected(shape)
    out: dict[str, tuple[str, ...]] = {}
    for item in items:
        if not isinstance(item, Mapping):
            raise Expected(shape)
        for source, targets in item.items():
            targets = [targets] if isinstance(targets, str) else targets
            if not isinstance(targets, (list, tuple)) or not all(
                isinstance(t, str) for t in targets
            ):
                raise Expected(shape)
            for group in (source, *targets):
                if group not in groups:
                    msg = (
                        f"names group {group!r}, which no model_list entry has as "
                        f"model_name; expected one of {', '.join(map(repr, groups))}"
                        f"{did_you_mean(group, groups)}"
                    )
                    raise Expected(msg)
            if source in targets:
                msg = f"lets group {source!r} fall back to itself"
                raise Expected(msg)
            out[source] = tuple(dict.fromkeys((*out.get(source, ()), *targets)))
    return MappingProxyType(out)


def check_cooldown(value: Any, groups: Sequence[str]) -> float:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and math.isfinite(value) and value >= 0:
        return float(value)
    msg = f"expected a number of seconds >= 0, got {_shown(value)}"
    raise Expected(msg)


def check_allowed_fails(value: Any, groups: Sequence[str]) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    msg = f"expected a whole number >= 1, got {_shown(value)}"
    raise Expected(msg)


#: Each option of RoutingOptions, its check, and its name in litellm's router_settings.
OPTION_CHECKS: Mapping[str, tuple[Callable[[Any, Sequence[str]], Any], str]] = {
    "strategy": (check_strategy, "routing_strategy"),
    "fallbacks": (check_fallbacks, "fallbacks"),
    "cooldown_s": (check_cooldown, "cooldown_time"),
    "allowed_fails": (check_allowed_fails, "allowed_fails"),
}


def routing_options(
    deployments: DeploymentList,
    *,
    routing: str | None = None,
    fallbacks: Any = None,
    cooldown_s: float | None = None,
    allowed_fails: int | None = None,
) -> RoutingOptions:
    """``deployments.options`` with each option given here (not ``None``) in its place."""
    options = deployments.options
    given = {
        "strategy": ("routing", routing),
        "fallbacks": ("fallbacks", fallbacks),
        "cooldown_s": ("cooldown_s", cooldown_s),
        "allowed_fails": ("allowed_fails", allowed_fails),
    }
    for attr, (option, value) in given.items():
        if value is None:
            continue
        try:
            checked = OPTION_CHECKS[attr][0](value, deployments.groups)
        except Expected as exc:
            msg = f"{option}= {exc}"
            raise ConfigError(msg) from None
        options = replace(options, **{attr: checked})
    return options


# --------------------------------------------------------------------------- load


class DeploymentLoad:
    """Requests in flight, recent latency and the last ``window_s`` of use of one deployment.

    ``rpm`` and ``tpm``, when set, are the limits in force (an adapted ``"auto"`` limit);
    otherwise the router reads the deployment's own.
    """

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, window_s: float = 60.0
    ) -> None:
        self._clock = clock
        self.window_s = window_s
        self.in_flight = 0
        self.latency_s: float | None = None
        self.measured_at: float | None = None
        self.rpm: float | None = None
        self.tpm: float | None = None
        self._used: deque[tuple[float, int, int]] = deque()  # (time, requests, tokens)
        self._requests = 0
        self._tokens = 0

    def __repr__(self) -> str:
        return (
            f"DeploymentLoad(in_flight={self.in_flight}, latency_s={self.latency_s}, "
            f"requests={self.requests_in_window}, tokens={self.tokens_in_window})"
        )

    def start(self) -> None:
        """A request is sent."""
        self.in_flight += 1
        self._add(1, 0)

    def finish(self, latency_s: float | None = None, tokens: int = 0) -> None:
        """A request ended: ``latency_s`` for an answer (``None`` for a failure), and the
        tokens it used."""
        if self.in_flight <= 0:
            msg = "finish() without a start()"
            raise RuntimeError(msg)
        self.in_flight -= 1
        if tokens:
            self._add(0, tokens)
        if latency_s is not None:
            old = self.latency_s
            self.latency_s = latency_s if old is None else old + LATENCY_WEIGHT * (latency_s - old)
            self.measured_at = self._clock()

    @property
    def requests_in_window(self) -> int:
        self._expire()
        return self._requests

    @property
    def tokens_in_window(self) -> int:
        self._expire()
        return self._tokens

    def is_measured(self) -> bool:
        """A latency measured within the last ``window_s``."""
        return self.measured_at is not None and self._clock() - self.measured_at <= self.window_s

    def _add(self, requests: int, tokens: int) -> None:
        self._used.append((self._clock(), requests, tokens))
        self._requests += requests
        self._tokens += tokens
        self._expire()

    def _expire(self) -> None:
        horizon = self._clock() - self.window_s
        while self._used and self._used[0][0] <= horizon:
            _, requests, tokens = self._used.popleft()
            self._requests -= requests
            self._tokens -= tokens


# --------------------------------------------------------------------------- router


class Router:
    """Picks a deployment of a group for each request (see the module docstring)."""

    def __init__(
        self,
        deployments: DeploymentList,
        options: RoutingOptions | None = None,
        *,
        is_open: Callable[[Deployment], bool] | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.deployments = deployments
        self.options = deployments.options if options is None else options
        self._is_open = is_open or (lambda d: False)
        self._rng = rng or random.Random()
        self._clock = clock
        self._groups = {g: deployments.in_group(g) for g in deployments.groups}
        self._choose = {
            "simple-shuffle": self._shuffle,
            "least-busy": self._least_busy,
            "latency-based": self._fastest,
            "usage-based": self._least_used,
        }[self.options.strategy]

    def __repr__(self) -> str:
        return f"Router({len(self.deployments)} deployments, {self.options!r})"

    def pick(
        self,
        group: str,
        loads: Mapping[str, DeploymentLoad],
        avoid: Collection[str] = (),
    ) -> Deployment | None:
        """The deployment for the next request to ``group``, or ``None`` if none is available.

        ``avoid``: ids of deployments to pass over while another is available (the one a
        retry just failed on); when only those are left, one of them is picked.
        """
        self.deployments.check_group(group)
        if avoid:
            chosen = self._pick(group, loads, avoid)
            if chosen is not None:
                return chosen
        return self._pick(group, loads, ())

    def groups_of(self, group: str) -> tuple[str, ...]:
        """``group`` and its fallback groups, in the order they are tried."""
        return (group, *self.options.fallbacks.get(group, ()))

    def _pick(
        self, group: str, loads: Mapping[str, DeploymentLoad], avoid: Collection[str]
    ) -> Deployment | None:
        for candidate in self.groups_of(group):
            chosen = self._pick_in(candidate, loads, avoid)
            if chosen is not None:
                return chosen
        return None

    def _pick_in(
        self, group: str, loads: Mapping[str, DeploymentLoad], avoid: Collection[str]
    ) -> Deployment | None:
        up = [d for d in self._groups[group] if d.id not in avoid and not self._is_open(d)]
        if not up:
            return None
        first = min(map(_order_key, up))
        tier = [d for d in up if _order_key(d) == first]
        view = [(d, loads.get(d.id) or self._idle()) for d in tier]
        free = [(d, load) for d, load in view if _has_room(d, load)]
        return self._choose(free or view)

    def _idle(self) -> DeploymentLoad:
        return DeploymentLoad(clock=self._clock)

    def _tied(self, scored: list[tuple[float, Deployment]]) -> Deployment:
        best = min(score for score, _ in scored)
        return self._rng.choice([d for score, d in scored if score == best])

    def _shuffle(self, view: list[tuple[Deployment, DeploymentLoad]]) -> Deployment:
        return self._rng.choices([d for d, _ in view], weights=[d.weight for d, _ in view])[0]

    def _least_busy(self, view: list[tuple[Deployment, DeploymentLoad]]) -> Deployment:
        return self._tied([(load.in_flight, d) for d, load in view])

    def _fastest(self, view: list[tuple[Deployment, DeploymentLoad]]) -> Deployment:
        unmeasured = [(d, load) for d, load in view if not load.is_measured()]
        idle = [(0.0, d) for d, load in unmeasured if load.in_flight == 0]
        if idle:
            return self._tied(idle)
        measured = [(d, load) for d, load in view if load.is_measured()]
        if not measured:  # every one is being measured: spread while the answers come
            return self._least_busy(view)
        # Lowest latency; among equals, the least busy.
        best = min(load.latency_s or 0.0 for _, load in measured)
        return self._least_busy([(d, load) for d, load in measured if load.latency_s == best])

    def _least_used(self, view: list[tuple[Deployment, DeploymentLoad]]) -> Deployment:
        limits = [_limit(load.rpm, d.rpm) for d, load in view]
        reference = max((x for x in limits if x is not None), default=1.0)
        scored = []
        for (d, load), rpm in zip(view, limits, strict=True):
            tpm = _limit(load.tpm, d.tpm)
            shares = [] if rpm is None else [load.requests_in_window / rpm]
            if tpm is not None:
                shares.append(load.tokens_in_window / tpm)
            scored.append((max(shares, default=load.requests_in_window / reference), d))
        return self._tied(scored)


def _order_key(d: Deployment) -> tuple[int, int]:
    # litellm: while any available deployment has an order, those without one are not used.
    return (0, d.order) if d.order is not None else (1, 0)


def _has_room(d: Deployment, load: DeploymentLoad) -> bool:
    cap = d.max_parallel_requests
    return not isinstance(cap, int) or load.in_flight < cap


def _limit(current: float | None, own: float | str | None) -> float | None:
    if current is not None:
        return current
    return float(own) if isinstance(own, (int, float)) else None
