"""The checks of a run's options that need more than the schema: the deployment list and
its routing options, the metric of ``score=``, the budget and the price a dollar cap needs.
``nbllm.prepare`` calls them before any engine is made or request sent."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nbllm.config import RunConfig
from nbllm.engines import Engine, is_local
from nbllm.engines.batch import batch_api_of, batch_engine
from nbllm.errors import ConfigError
from nbllm.executor.budget import Budget
from nbllm.executor.deployments import DeploymentList, load_deployments
from nbllm.executor.events import Event
from nbllm.executor.routing import RoutingOptions, routing_options
from nbllm.types import Conversation

if TYPE_CHECKING:
    from nbllm.alerts import AlertWatcher

__all__ = [
    "alert_watcher",
    "batched",
    "budget",
    "check_price",
    "check_score",
    "check_turn_formats",
    "deployments",
    "for_batches",
    "group",
    "models",
    "scorer",
    "watchers",
]


_ROUTING_OPTIONS = ("routing", "fallbacks", "cooldown_s", "allowed_fails")


def deployments(config: RunConfig) -> tuple[DeploymentList | None, RoutingOptions | None]:
    """``router=`` read and checked, with the run's routing options over its file's."""
    if config.router is None:
        for name in _ROUTING_OPTIONS:
            if getattr(config, name) is not None:
                msg = f"{name}= applies to the deployments of router=, which is not given"
                raise ConfigError(msg)
        return None, None
    for name in ("api_base", "api_key"):
        if getattr(config, name) is not None:
            msg = (
                f"{name}= and router= do not go together: give each deployment its own "
                f"{name} in its litellm_params"
            )
            raise ConfigError(msg)
    if isinstance(config.engine, Engine) or config.engine not in ("auto", "openai", "litellm"):
        msg = (
            f"engine={config.engine!r} cannot serve router= deployments: expected 'auto', "
            "'openai' or 'litellm'"
        )
        raise ConfigError(msg)
    deployments = load_deployments(config.router)
    options = routing_options(
        deployments,
        routing=config.routing,
        fallbacks=config.fallbacks,
        cooldown_s=config.cooldown_s,
        allowed_fails=config.allowed_fails,
    )
    return deployments, options


def group(deployments: DeploymentList, model: str | None) -> str:
    """The group ``model=`` names; without one, the list's only group."""
    if model is None:
        if len(deployments.groups) == 1:
            return deployments.groups[0]
        msg = (
            "model= is required with router= when its model_list has several groups: "
            f"expected one of {', '.join(map(repr, deployments.groups))}"
        )
        raise ConfigError(msg)
    return deployments.check_group(model)


def models(config: RunConfig, deployments: DeploymentList | None) -> tuple[str, ...]:
    """The models of ``model=[...]`` (each a group of ``router=`` where one is given), each
    named once; ``ensemble=`` only with two or more."""
    names = config.models
    for i, name in enumerate(names):
        if name in names[:i]:
            msg = f"model= names {name!r} twice; give each model once"
            raise ConfigError(msg)
    if config.ensemble is not None and not names:
        msg = (
            f"ensemble={config.ensemble!r} needs two models or more to ask, "
            "as model=['a', 'b'] (-m a -m b); got one"
        )
        raise ConfigError(msg)
    if deployments is not None:
        return tuple(group(deployments, name) for name in names)
    return names


def check_turn_formats(conversations: list[Conversation]) -> None:
    """Each ``response_format`` a turn gives in its ``turn_params``: a pydantic model class
    or a JSON schema nbllm can send and validate (else ``ConfigError`` naming the turn)."""
    from nbllm.parsing import make_parser

    seen: set[int] = set()
    for conv in conversations:
        for k, params in enumerate(conv.turn_params):
            given = params.get("response_format")
            if given is None or id(given) in seen:
                continue
            try:
                make_parser(given)
            except ConfigError as exc:
                msg = f"conversation {conv.id!r}, turn {k}, turn_params: {exc}"
                raise ConfigError(msg) from None
            seen.add(id(given))


def watchers(config: RunConfig) -> list[Callable[[Event], None]]:
    """The listeners that show the run outside the notebook: Prometheus metrics where a
    port is asked for (``metrics_port``; ``$NBLLM_METRICS_PORT`` may set it), and
    OpenTelemetry spans where a tracer provider is configured. Made before any request: a
    port in use or a missing package is a ``ConfigError`` now."""
    from nbllm.metrics import metrics_listener
    from nbllm.tracing import tracing_listener

    limits = {"rpm": config.rpm, "tpm": config.tpm}
    found = [
        metrics_listener(config.metrics_port, config.metrics_host, limits),
        tracing_listener(config.trace_content),
    ]
    return [listener for listener in found if listener is not None]


def alert_watcher(config: RunConfig) -> AlertWatcher | None:
    """The run's ``AlertWatcher`` (``alerts=`` checked now), or None with ``alerts=False``."""
    from nbllm.alerts import AlertWatcher, alert_rules

    rules = alert_rules(config.alerts)
    if rules is None:
        return None
    return AlertWatcher(rules, on_alert=config.on_alert, max_cost_usd=config.max_cost_usd)


def check_score(config: RunConfig, conversations: list[Conversation]) -> None:
    """``score=``: a metric it knows, and references to score against."""
    if config.score is None:
        return
    from nbllm.scoring import GIVE_REFERENCES, run_scorer

    run_scorer(config.score)
    if not any(ref for conv in conversations for ref in conv.references):
        what = "needs references to score against, and no conversation has one"
        msg = f"score= {what}; {GIVE_REFERENCES}"
        raise ConfigError(msg)


def scorer(config: RunConfig) -> Any:
    if config.score is None:
        return None
    from nbllm.scoring import run_scorer

    return run_scorer(config.score)


def budget(config: RunConfig) -> Budget | None:
    caps = (config.max_cost_usd, config.max_tokens_total, config.cost_per_1k_tokens)
    if all(cap is None for cap in caps):
        return None
    return Budget(
        max_cost_usd=config.max_cost_usd,
        max_tokens_total=config.max_tokens_total,
        cost_per_1k_tokens=config.cost_per_1k_tokens,
    )


def check_price(
    config: RunConfig, model: str, api_base: str | None, price: float | None = None
) -> None:
    """A dollar cap needs answers with a cost: litellm's price table, a deployment's
    ``price`` or ``cost_per_1k_tokens``. An ``Engine`` of the user's own may price its
    answers."""
    engine = config.engine
    if config.max_cost_usd is None or config.cost_per_1k_tokens is not None or price is not None:
        return
    if isinstance(engine, Engine):
        return
    through_litellm = engine == "litellm" or (
        engine == "auto" and api_base is None and not is_local(engine, model, None)
    )
    # A batch engine prices a provider's model from litellm's table, at any api_base.
    through_litellm = through_litellm or (config.batch_api and "/" in model)
    if through_litellm:
        from nbllm.engines.litellm import knows_price

        if knows_price(model):
            return
        why = f"litellm's price table has no price for model={model!r}"
    else:
        why = f"engine={engine!r} gives no cost for its answers"
    msg = f"max_cost_usd= needs a price: {why}; give cost_per_1k_tokens= as well"
    raise ConfigError(msg)


def for_batches(
    config: RunConfig,
    conversations: list[Conversation],
    models: tuple[str, ...],
    model: str,
    routed: bool,
) -> RunConfig:
    """``batch_api=True`` checked, before anything is made or sent; the run's options for
    it: every conversation in progress at once (a batch holds every turn that is ready;
    ``max_batches`` and ``batch_max_requests`` are the caps), and no per-request timeout
    (a batch has its own completion window)."""
    if not config.batch_api:
        return config
    engine = config.engine
    if isinstance(engine, Engine) or routed:
        what = "an Engine instance" if isinstance(engine, Engine) else "router= deployments"
        msg = f"batch_api=True goes to a provider's batch API; it cannot go through {what}"
        raise ConfigError(msg)
    for name in models or (model,):
        if is_local(engine, name, config.api_base):
            msg = (
                f"batch_api=True goes to a provider's batch API, but {name!r} runs on this "
                f"machine (engine={engine!r}): drop batch_api=True, or name a provider's "
                "model (openai/..., anthropic/...) or an api_base= server"
            )
            raise ConfigError(msg)
        batch_api_of(name, config.api_base)  # ConfigError: a provider without one
    for name in ("rpm", "tpm"):
        if getattr(config, name) is not None:
            msg = (
                f"batch_api=True with {name}={getattr(config, name)!r}: {name} limits live "
                "requests per minute, which a batch run does not send. A provider's batch "
                "quota is set with max_batches= (batches in flight) and batch_max_requests= "
                f"(requests per batch); drop {name}="
            )
            raise ConfigError(msg)
    everyone = max(1, len(conversations) * max(1, len(models)))
    return config.model_copy(update={"concurrency": everyone, "max_conversations": everyone})


def batched(config: RunConfig, model: str, api_key: str | None, live: Engine) -> Engine:
    """``live``, or with ``batch_api=True`` the engine that sends ``model``'s requests
    through its provider's batch API (``live`` answers what a batch did not, with
    ``batch_fallback="live"``)."""
    if not config.batch_api:
        return live
    return batch_engine(
        model, config.api_base, api_key, live=live, fallback=config.batch_fallback,
        max_batches=config.max_batches, max_requests=config.batch_max_requests,
        poll_s=config.batch_poll_s,
    )  # fmt: skip
