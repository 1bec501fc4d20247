"""Where each request goes: one lane per deployment.

A lane is a deployment with everything the executor keeps for it: its engine, the model
string and parameters it is sent, its timeout, its rpm / tpm budgets (``RunLimits``), its
own request slots (``max_parallel_requests``), its circuit breaker, its load (what the
router reads, with the "auto" limits in force; kept only where there is a router), its
figures (``DeploymentTotals``) and the pause after a 429 that said Retry-After. A pause, a
limit or a broken server of one deployment never holds up another.

- ``Routes``: what a run with ``router=`` sends to: the checked deployment list, the group
  that ``model=`` names, the routing options, and an engine per deployment of the group
  and of its fallback groups (made by ``nbllm.prepare``).
- ``Lanes``: the run's lanes. ``Lanes.single(lane)`` for a run against one engine (no
  breaker: a run that cannot reach its only server stops instead, see the executor);
  ``Lanes.routed(routes, make_lane)`` for a deployment list, with nbllm's ``Router``.
  ``await lanes.pick(avoid, deadline)`` gives the lane for the next attempt; while every
  deployment the turn may go to is open, it waits for a breaker to let a probe through,
  up to ``deadline`` (then ``NoDeployment``, which is retried as a timeout is).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nbllm.engines.base import Engine
from nbllm.errors import EngineError, RateLimitError, RequestTimeout
from nbllm.executor.adaptive import AdaptiveLimit
from nbllm.executor.breaker import BreakerState, CircuitBreaker
from nbllm.executor.budget import Budget, priced
from nbllm.executor.deployments import Deployment, DeploymentList, deployment_id
from nbllm.executor.events import AttemptFinished, BreakerChanged, Event
from nbllm.executor.limiter import Grant
from nbllm.executor.limits import AUTO_CONCURRENCY, RunLimits, SlotControl, run_wide
from nbllm.executor.routing import DeploymentLoad, Router, RoutingOptions
from nbllm.executor.slots import RequestSlots
from nbllm.executor.timing import within
from nbllm.redact import public_url, secret_values
from nbllm.results_deployments import DeploymentFigures, DeploymentTotals
from nbllm.types import ChatRequest, ChatResponse, Message

__all__ = [
    "Attempts",
    "Lane",
    "Lanes",
    "NoDeployment",
    "Routes",
    "attempt_answered",
    "attempt_failed",
    "build_lanes",
]


#: ``limit_history``'s names for each kind of "auto" limit (rates per second).
_HISTORY_UNITS = {"rpm": "requests/s", "tpm": "tokens/s", "concurrency": "concurrency"}


class NoDeployment(RequestTimeout):
    """Every deployment a turn may go to stayed open (broken) until its timeout."""


@dataclass(frozen=True, repr=False)
class Routes:
    """A run's deployments: ``group`` of ``deployments`` and its fallback groups, each
    deployment with its engine (``engines``, by deployment id)."""

    deployments: DeploymentList
    group: str
    options: RoutingOptions
    engines: Mapping[str, Engine]

    def __repr__(self) -> str:
        return f"Routes(group={self.group!r}, {len(self.used)} deployments, {self.options!r})"

    @property
    def used(self) -> tuple[Deployment, ...]:
        """The deployments of the group, then of each fallback group, in list order."""
        groups = (self.group, *self.options.fallbacks.get(self.group, ()))
        return tuple(d for g in groups for d in self.deployments.in_group(g))

    @property
    def params(self) -> dict[str, Any]:
        """The sampling parameters the group's deployments set (what a checkpoint names)."""
        return self.deployments.group_params(self.group)

    def identity(self) -> str:
        """Who answers, for the response cache: the group and the models it is made of
        (not the servers, so adding a deployment of the same model keeps the cache)."""
        models = sorted({d.model for d in self.used})
        return f"group {self.group}: {', '.join(models)}"

    def describe(self) -> str:
        ids = ", ".join(d.id for d in self.used)
        return f"router over {len(self.used)} deployments ({ids})"

    async def aclose(self) -> None:
        for engine in self.engines.values():
            await engine.aclose()


class Lane:
    """One deployment as the executor drives it (see the module)."""

    def __init__(
        self,
        id: str,
        group: str,
        engine: Engine,
        *,
        model: str,
        params: Mapping[str, Any],
        timeout: float | None,
        limits: RunLimits,
        target: str,
        slots: RequestSlots | None = None,
        price: float | None = None,
    ) -> None:
        self.id = id
        self.group = group
        self.engine = engine
        self.model = model
        self.params = dict(params)
        self.timeout = timeout
        self.limits = limits
        self.target = target  # for messages: a public URL or the engine's description
        self.slots = slots
        self.price = price
        self.breaker: CircuitBreaker | None = None
        self.controls: list[SlotControl] = []  # "auto" slot counts its answers move
        # What the router reads of this deployment; None for a run against one engine.
        self.load: DeploymentLoad | None = None
        self.totals = DeploymentTotals(id, group)
        self.cooldown_until = 0.0  # loop time until which a Retry-After pauses it
        self.unreachable = 0  # attempts that could not connect, before any answered
        self.bounds_own_timeout = engine.bounds_own_timeout
        self.secrets = (*engine.secrets(), *secret_values(self.params))  # masked in errors

    def __repr__(self) -> str:
        return f"Lane({self.id!r}, breaker={self.breaker!r})"

    async def send(
        self, messages: Sequence[Message], extra: Mapping[str, Any] | None = None
    ) -> ChatResponse:
        """One request to this deployment, under its timeout (unless the engine applies
        it itself), with ``extra`` (a turn's own parameters) over its parameters; any
        failure is an ``EngineError``."""
        timeout = self.timeout
        params = {**self.params, **extra} if extra else self.params
        request = ChatRequest(self.model, messages, params, timeout)
        try:
            if timeout is None or self.bounds_own_timeout:
                return await self.engine.complete(request)
            return await within(timeout, self.engine.complete(request))
        except EngineError:
            raise
        except asyncio.TimeoutError as exc:
            msg = f"no answer within timeout={timeout} s"
            raise RequestTimeout(msg) from exc
        except Exception as exc:
            # An engine bug must not abort the batch: it becomes this row's error.
            msg = f"{type(exc).__name__}: {exc}"
            raise EngineError(msg) from exc

    def started(self) -> None:
        """An attempt leaves for this deployment."""
        if self.load is not None:
            self.load.start()
        self.totals.sent()

    def abandoned(self) -> None:
        """An attempt ended with no outcome (cancelled, stopped)."""
        if self.load is not None:
            self.load.finish(None)
        if self.breaker is not None:
            self.breaker.release_probe()

    def failed(self, error: EngineError) -> bool:
        """An attempt failed; whether it was the deployment's fault (see the breaker)."""
        if self.load is not None:
            self.load.finish(None)
        self.totals.failed(rate_limited=isinstance(error, RateLimitError))
        if isinstance(error, RateLimitError):
            for control in self.controls:
                control.rate_limited(error.rate_limits)
        if self.breaker is None:
            return False
        self.breaker.record_failure(error)
        return self.breaker.counts(error)

    def answered(
        self,
        latency_s: float,
        response: ChatResponse,
        budget: Budget | None,
        grant: Grant | None = None,
    ) -> float | None:
        """An attempt was answered after ``latency_s``: its tokens settle ``grant`` and its
        "auto" limits may grow; its cost, counted in ``budget`` (the engine's, else from
        this deployment's price, else the run's)."""
        self.limits.answered(grant, response)
        self._limits_to_load()
        tokens = (response.prompt_tokens or 0) + (response.completion_tokens or 0)
        if self.load is not None:
            self.load.finish(latency_s, tokens)
        for control in self.controls:
            control.answered(response.rate_limits)
        if self.breaker is not None:
            self.breaker.record_success()
        cost = (
            priced(response, self.price) if budget is None else budget.charge(response, self.price)
        )
        self.totals.answered(latency_s, tokens, cost)
        return cost

    def rate_limited(self, error: RateLimitError, estimate: int) -> None:
        """A 429 here: its "auto" limits are cut (``estimate``: the request's tokens)."""
        self.limits.rate_limited(error, estimate)
        self._limits_to_load()

    def _limits_to_load(self) -> None:
        """The "auto" limits in force, where the router reads them (usage-based routing
        measures a deployment's use against its own limit)."""
        if self.load is not None:
            for kind, control in self.limits.adaptive.items():
                setattr(self.load, kind, control.limit)

    def figures(self) -> DeploymentFigures:
        breaker = self.breaker
        if breaker is None:
            return self.totals.figures()
        return self.totals.figures(breaker=breaker.state.value, trips=breaker.trips)


class Lanes:
    """The lanes of one run and the choice among them (see the module)."""

    def __init__(
        self,
        lanes: Sequence[Lane],
        *,
        group: str,
        router: Router | None = None,
        target: str | None = None,
    ) -> None:
        self.lanes = tuple(lanes)
        self.group = group
        self.router = router
        self.only = self.lanes[0] if router is None else None
        self.by_id = {lane.id: lane for lane in self.lanes}
        if router is not None:
            for lane in self.lanes:
                lane.load = DeploymentLoad()
        self._loads = {lane.id: lane.load for lane in self.lanes if lane.load is not None}
        self._target = target
        self._changed: asyncio.Event | None = None  # set when a breaker moves

    @classmethod
    def single(cls, lane: Lane) -> Lanes:
        return cls([lane], group=lane.group)

    @classmethod
    def joined(cls, parts: Sequence[Lanes]) -> Lanes:
        """Every lane of several models' ``parts``, for what a run counts over all of them
        (its request slots, figures, limits, reach); each part picks its own lanes."""
        made = cls([lane for part in parts for lane in part.lanes], group="")
        made.only = None
        made._target = ", ".join(part.target() for part in parts)
        return made

    @classmethod
    def routed(
        cls,
        routes: Routes,
        make_lane: Callable[[Deployment, Engine], Lane],
        *,
        emit: Callable[[Event], None],
        probe_timeout_s: float | None,
    ) -> Lanes:
        """A lane per deployment of ``routes``, each with a breaker (``routes.options``'
        ``allowed_fails`` and ``cooldown_s``); a half-open probe that has not come back
        after ``probe_timeout_s`` (the run's timeout, else 60 s) lets another go."""
        lanes = [make_lane(d, routes.engines[d.id]) for d in routes.used]
        router = Router(
            routes.deployments,
            routes.options,
            is_open=lambda d: not by_id[d.id].breaker.available(),  # type: ignore[union-attr]
        )
        made = cls(lanes, group=routes.group, router=router, target=routes.describe())
        by_id = made.by_id
        for lane in lanes:
            lane.breaker = CircuitBreaker(
                allowed_fails=routes.options.allowed_fails,
                cooldown_s=max(routes.options.cooldown_s, 1e-3),
                probe_timeout_s=probe_timeout_s or 60.0,
                on_change=made._on_change(lane, emit),
            )
        return made

    def _on_change(
        self, lane: Lane, emit: Callable[[Event], None]
    ) -> Callable[[BreakerState, BreakerState], None]:
        def changed(old: BreakerState, new: BreakerState) -> None:
            if self._changed is not None:
                self._changed.set()
            trips = lane.breaker.trips if lane.breaker is not None else 0
            emit(BreakerChanged(lane.id, new.value, trips, time.time()))

        return changed

    def request_slots(self, concurrency: int | str, emit: Callable[[Event], None]) -> RequestSlots:
        """The run's request slots: ``concurrency`` of them, or with ``"auto"`` a count
        found while running (``SlotControl``) from every lane's answers and 429s."""
        if concurrency != "auto":
            return RequestSlots(int(concurrency))
        slots = RequestSlots(int(AUTO_CONCURRENCY["start"]))
        control = SlotControl(slots, deployment="", emit=emit)
        for lane in self.lanes:
            lane.controls = [c for c in lane.controls if c.deployment] + [control]
        return slots

    def target(self) -> str:
        """What the run sends to, for messages: the only lane's server, or the router."""
        return self.only.target if self.only is not None else self._target or self.group

    async def pick(self, avoid: str | None = None, deadline: float | None = None) -> Lane:
        """The lane for the next attempt; ``avoid``: the deployment the last attempt failed
        on, passed over while another is available. Waits while every one is open, up
        to ``deadline`` (loop time; None: as long as it takes)."""
        if self.only is not None:
            return self.only
        assert self.router is not None, "joined lanes are counted, not picked from"
        loop = asyncio.get_running_loop()
        while True:
            chosen = self.router.pick(self.group, self._loads, (avoid,) if avoid else ())
            if chosen is not None:
                return self.by_id[chosen.id]
            wait = min(
                (lane.breaker.retry_in() for lane in self.lanes if lane.breaker is not None),
                default=0.0,
            )
            wait = max(wait, 0.005)
            now = loop.time()
            if deadline is not None and now + wait > deadline:
                if now < deadline:
                    await self._wait(deadline - now)
                    continue
                ids = ", ".join(lane.id for lane in self.lanes)
                msg = (
                    f"no deployment of {self.group!r} could take the request in time: every "
                    f"one ({ids}) failed and its breaker is open"
                )
                raise NoDeployment(msg)
            await self._wait(wait)

    async def _wait(self, seconds: float) -> None:
        """Sleep ``seconds``, or until a breaker moves (a probe closed it)."""
        if self._changed is None:
            self._changed = asyncio.Event()
        self._changed.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), seconds)

    async def admit(
        self,
        avoid: str | None,
        estimate: int,
        priority: tuple[int, ...],
        timeout: float | None,
        may_send: Callable[[], bool],
    ) -> tuple[Lane, Grant | None] | None:
        """A lane whose slot, pause, budgets and breaker let a request go now (its slot
        held: ``lane.slots.release()`` after the request), and the tokens' grant of
        ``estimate``; None when ``may_send()``, asked last, says the run stops. Waits for
        an open deployment up to ``timeout`` seconds (then ``NoDeployment``)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            lane = await self.pick(avoid, deadline)
            if lane.slots is not None:
                await lane.slots.acquire(priority)
            try:
                # A 429 met while this one slept may have moved the end of the pause.
                while (wait := lane.cooldown_until - loop.time()) > 0:
                    await asyncio.sleep(wait)
                grant = await lane.limits.acquire(estimate)
                go = may_send()
                if go and (lane.breaker is None or lane.breaker.allow()):
                    return lane, grant
            except BaseException:
                if lane.slots is not None:
                    lane.slots.release()
                raise
            if lane.slots is not None:
                lane.slots.release()
            if not go:
                return None
            # Its breaker opened while this one waited: choose again.

    def after_failure(self, lane: Lane, error: EngineError, estimate: int, delay: float) -> float:
        """How long a turn waits before its next attempt after ``error`` on ``lane``
        (``delay``: the retry policy's back-off). A 429 cuts the lane's "auto" limits
        and may pause the lane (Retry-After); a failure that was the deployment's fault
        is retried on another one at once, where one is available."""
        if isinstance(error, RateLimitError):
            lane.rate_limited(error, estimate)
            if error.retry_after:
                pause = asyncio.get_running_loop().time() + error.retry_after
                lane.cooldown_until = max(lane.cooldown_until, pause)
            return delay
        if lane.breaker is not None and lane.breaker.counts(error) and self.has_other(lane):
            return 0.0
        return delay

    def has_other(self, lane: Lane) -> bool:
        """Whether a deployment other than ``lane`` may take a request now."""
        return any(
            other is not lane and (other.breaker is None or other.breaker.available())
            for other in self.lanes
        )

    def unreachable(self, threshold: int) -> bool:
        """Whether every lane failed to connect ``threshold`` times (or, with a breaker,
        as often as opens it), none having answered."""
        return all(
            lane.unreachable >= min(threshold, lane.breaker.allowed_fails)
            if lane.breaker is not None
            else lane.unreachable >= threshold
            for lane in self.lanes
        )

    def figures(self) -> list[DeploymentFigures]:
        return [lane.figures() for lane in self.lanes]

    def limit_history(self) -> list[tuple[float, str, float]]:
        """Every "auto" limit in force over the run, run-wide (``run_wide``): (wall-clock
        time, kind, limit) at the start and after each change, where kind is
        "requests/s" or "tokens/s" (the rpm / tpm limit per second) or "concurrency"."""
        offset = time.time() - time.monotonic()  # the controllers' clock is monotonic
        series: dict[tuple[str, str], AdaptiveLimit] = {}
        for lane in self.lanes:
            for kind, control in lane.limits.adaptive.items():
                series[(kind, lane.id)] = control
            for slots in lane.controls:
                series[("concurrency", slots.deployment)] = slots.adaptive
        changes = sorted(
            (t, key, value) for key, control in series.items() for t, value in control.history
        )
        current: dict[tuple[str, str], float] = {}
        out: list[tuple[float, str, float]] = []
        for t, (kind, deployment), value in changes:
            current[(kind, deployment)] = value
            if kind == "concurrency" and deployment:
                continue  # a deployment's own cap: not the run's
            per = 1.0 if kind == "concurrency" else series[(kind, deployment)].period
            out.append((t + offset, _HISTORY_UNITS[kind], run_wide(current)[kind] / per))
        return out

    async def aclose(self) -> None:
        for lane in self.lanes:
            await lane.limits.aclose()


def build_lanes(
    sends_to: Engine | Routes,
    model: str,
    params: Mapping[str, Any],
    timeout: float | None,
    limits: Callable[[str, dict[str, Any]], RunLimits],
    emit: Callable[[Event], None],
) -> Lanes:
    """The lanes of a run against one engine or a deployment list. ``limits(id, own)``
    makes a deployment's budgets, ``own`` holding the limits the deployment sets itself;
    ``params`` are the run's (they win over a deployment's own)."""
    if isinstance(sends_to, Engine):
        engine = sends_to
        api_base = getattr(engine, "api_base", None)
        api_base = api_base if isinstance(api_base, str) and api_base else None
        did = deployment_id(model, api_base)
        lane = Lane(
            did, model, engine, model=model, params=params, timeout=timeout,
            limits=limits(did, {}), target=_target(engine, api_base),
        )  # fmt: skip
        return Lanes.single(lane)

    def make_lane(d: Deployment, engine: Engine) -> Lane:
        cap = d.max_parallel_requests
        own = {"rpm": d.rpm, "tpm": d.tpm, "max_rpm": d.max_rpm, "max_tpm": d.max_tpm}
        slots = (
            RequestSlots(int(AUTO_CONCURRENCY["start"]) if cap == "auto" else cap) if cap else None
        )
        lane = Lane(
            d.id, d.group, engine, model=d.model, params={**d.params, **params},
            timeout=d.timeout if d.timeout is not None else timeout, limits=limits(d.id, own),
            target=_target(engine, d.api_base), slots=slots, price=d.cost_per_1k_tokens,
        )  # fmt: skip
        if cap == "auto" and slots is not None:
            lane.controls.append(SlotControl(slots, deployment=d.id, emit=emit))
        return lane

    return Lanes.routed(sends_to, make_lane, emit=emit, probe_timeout_s=timeout)


def attempt_answered(
    lane: Lane,
    conversation_id: Any,
    turn: int,
    attempt: int,
    sent_at: float,
    response: ChatResponse,
    cost: float | None,
) -> AttemptFinished:
    """The ``AttemptFinished`` of an attempt ``lane`` answered."""
    now = time.time()
    return AttemptFinished(
        conversation_id, turn, attempt, lane.group, lane.id, "ok", None, now - sent_at,
        sent_at, now, response.model, response.prompt_tokens, response.completion_tokens,
        response.finish_reason, cost, response.cached_tokens,
    )  # fmt: skip


def attempt_failed(
    lane: Lane,
    conversation_id: Any,
    turn: int,
    attempt: int,
    sent_at: float,
    seconds: float,
    error: EngineError | None,
) -> AttemptFinished:
    """The ``AttemptFinished`` of an attempt that ended without an answer: ``error``, or
    cancelled (None)."""
    outcome = "cancelled" if error is None else "error"
    outcome = "rate_limited" if isinstance(error, RateLimitError) else outcome
    kind = None if error is None else type(error).__name__
    return AttemptFinished(
        conversation_id, turn, attempt, lane.group, lane.id, outcome, kind, seconds, sent_at,
        time.time(),
    )  # fmt: skip


def _target(engine: Engine, api_base: str | None) -> str:
    return public_url(api_base) if api_base else engine.describe()


class Attempts:
    """The attempts of one turn: when each left, its seconds in the engine, its lane, and
    whether the last one failed by its deployment's fault (the next avoids it)."""

    __slots__ = ("failed_there", "lanes", "sends", "spent")

    def __init__(self) -> None:
        self.sends: list[float] = []
        self.spent: list[float] = []
        self.lanes: list[Lane] = []
        self.failed_there = False

    def avoid(self) -> str | None:
        """The deployment the last attempt failed on by its own fault, if it did."""
        return self.lanes[-1].id if self.lanes and self.failed_there else None

    def sent(self, at: float, lane: Lane) -> None:
        self.sends.append(at)
        self.lanes.append(lane)
        self.failed_there = False
        lane.started()
