"""Every run option in one validated schema: each bad value is refused before any request.

``RunConfig`` is the single source of the options of ``nbllm.run`` (and ``arun``,
``submit``): their names, order, defaults and one-line descriptions. The command's flags
(``nbllm.config_args.add_run_arguments``), the magic's options and its session settings
and environment variables (``parse_run_option``) are derived from it, so an option is
added in one place.

A refused value is one line that names the option and says what was expected, e.g.
``concurrency= expected a whole number >= 1, got 0``; booleans are not numbers.
"""

from __future__ import annotations

import os
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    InstanceOf,
    JsonValue,
    SecretStr,
    ValidationError,
    field_validator,
)

from nbllm.errors import ConfigError
from nbllm.parsing import Parser, make_parser
from nbllm.redact import hidden, public_url
from nbllm.retry import RetryPolicy

__all__ = [
    "RunConfig",
    "config_of_call",
    "leaf_types",
    "option_about",
    "option_reader",
    "parse_run_option",
    "show",
    "shown_option",
    "takes_auto",
    "text_type",
]

# int or float, kept as given: a temperature of 0 stays 0 in cache keys and fingerprints.
ModelName = Annotated[str, Field(pattern=r"\S")]
PositiveNumber = Annotated[int, Field(gt=0)] | Annotated[float, Field(gt=0, allow_inf_nan=False)]
Temperature = (
    Annotated[int, Field(ge=0, le=2)] | Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)]
)
Place = bool | str | InstanceOf[os.PathLike] | None  # checkpoint= and cache=


def _option(
    default: Any,
    description: str,
    expected: str,
    *,
    metavar: str | None = None,
    **constraints: Any,
) -> Any:
    """A field: its default, a one-line description (help text), and what a refusal says."""
    extra: dict[str, JsonValue] = {"expected": expected, "metavar": metavar}
    return Field(default, description=description, json_schema_extra=extra, **constraints)


class RunConfig(BaseModel):
    """The options of one run, checked on creation; frozen. ``api_key`` is a ``SecretStr``:
    it never appears in ``repr``, ``str`` or a dump. ``repr`` and ``str`` also show
    ``api_base`` without a user name or password, and ``params`` with every value under a
    credential-like name (``extra_headers``, ``api_key``, ``auth_token``, at any depth)
    hidden."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        strict=True,
        arbitrary_types_allowed=True,
        # A ValidationError raised past __init__ (model_validate) must not echo a value.
        hide_input_in_errors=True,
    )

    model: ModelName | Annotated[list[ModelName], Field(min_length=1, strict=False)] | None = (
        _option(
            None,
            "a litellm model string (openai/gpt-4o-mini), the name a server at api_base serves, or "
            "a local model folder or .gguf file; none: the embedded SmolLM2-135M-Instruct; several "
            "(a list, or -m given again): every conversation is asked of each",
            "a model name such as 'openai/gpt-4o-mini', or a list of them",
        )
    )
    api_base: str | None = _option(
        None,
        "an OpenAI-compatible server's URL",
        "an http(s) URL such as 'http://127.0.0.1:8000/v1'",
        metavar="URL",
        pattern=r"^https?://",
    )
    api_key: SecretStr | None = _option(
        None,
        "the key for api_base or the provider, never printed nor written anywhere by nbllm; "
        "none: from the environment, which is safer (a key typed on a command or magic line "
        "stays in the notebook or the history, and others can see it in ps)",
        "a string",
        metavar="KEY",
    )
    concurrency: Annotated[int, Field(ge=1)] | Literal["auto"] = _option(
        32,
        "requests in flight; 'auto': found while running (from 8, halved on a 429, grown "
        "while answers come, at most 256)",
        "a whole number >= 1 or 'auto'",
        metavar="N",
    )
    rpm: PositiveNumber | Literal["auto"] | None = _option(
        None,
        "requests per minute, at most; 'auto': found while running (the server's 429s and "
        "x-ratelimit headers), at most max_rpm",
        "a number > 0, 'auto' or None",
        metavar="N",
    )
    tpm: PositiveNumber | Literal["auto"] | None = _option(
        None,
        "tokens per minute, at most; 'auto': found while running, at most max_tpm",
        "a number > 0, 'auto' or None",
        metavar="N",
    )
    max_rpm: PositiveNumber | None = _option(
        None,
        "the ceiling of rpm='auto' (also where it starts: half of it)",
        "a number > 0 or None",
        metavar="N",
    )
    max_tpm: PositiveNumber | None = _option(
        None,
        "the ceiling of tpm='auto' (also where it starts: half of it)",
        "a number > 0 or None",
        metavar="N",
    )
    timeout: PositiveNumber | None = _option(
        120.0, "seconds per attempt", "a number > 0 or None", metavar="S"
    )
    retries: Annotated[int, Field(ge=0)] | InstanceOf[RetryPolicy] = _option(
        5,
        "more attempts after a failed one (429, 5xx, timeouts)",
        "a whole number >= 0 or a RetryPolicy",
        metavar="N",
    )
    system: str | None = _option(None, "default system prompt", "a string or None", metavar="TEXT")
    max_tokens: int | None = _option(
        None, "the longest answer, in tokens", "a whole number >= 1 or None", metavar="N", ge=1
    )
    temperature: Temperature | None = _option(
        None, "sampling temperature", "a number between 0 and 2 or None", metavar="T"
    )
    progress: bool | None = _option(
        None,
        "live progress: the dashboard in a notebook, a text bar on stderr in a terminal; "
        "none: only there, not into a file or a pipe",
        "True, False or None (automatic)",
    )
    checkpoint: Place = _option(
        True,
        "where finished turns are kept: a file or folder (True: .nbllm/runs/<id>/; False: nowhere)",
        "True, False or a path",
        metavar="PATH",
    )
    cache: Place = _option(
        True,
        "answer identical requests from earlier runs: True (.nbllm/cache.sqlite), a path, "
        "'always' (sampled ones too) or False",
        "True, False, 'always' or a path",
        metavar="PATH",
    )
    resume: bool = _option(
        True, "skip the turns the checkpoint holds; False starts over", "True or False"
    )
    # Any, not str | Engine: Engine lives a layer above; create_engine checks the value.
    engine: Any = _option(
        "auto",
        "which engine: auto, openai, litellm or a local one (vllm, deepspeed, onnx, torch, "
        "llamacpp)",
        "an engine name or an Engine instance",
    )
    worker: bool | None = _option(
        None,
        "run a local engine in a child process; none: on a CUDA GPU",
        "True, False or None (automatic)",
    )
    replicas: Annotated[int, Field(ge=1)] | Literal["auto"] | None = _option(
        None,
        "copies of a local model, each in a worker process (one per GPU with 'auto'); none: one",
        "a whole number >= 1, 'auto' or None",
        metavar="N",
    )
    cluster: Literal["ray"] | None = _option(
        None,
        "run the replicas as Ray actors ('ray'); none: worker processes of this machine",
        "'ray' or None",
    )
    ray_address: str | None = _option(
        None,
        "the Ray cluster to run replicas on, e.g. ray://head:10001 (implies cluster='ray')",
        "an address or None",
        metavar="ADDRESS",
    )
    allow_oversubscribe: bool = _option(
        False,
        "let replicas outnumber the GPUs (or CPU cores) and share them",
        "True or False",
    )
    prefix_cache: bool = _option(
        True,
        "a local engine reuses the keys and values of recent prompts' shared beginnings",
        "True or False",
    )
    prefix_cache_bytes: int | None = _option(
        None,
        "the bound on a local engine's prefix cache; none: a fifth of free memory, <= 4 GiB",
        "a whole number of bytes >= 0 or None",
        metavar="BYTES",
        ge=0,
    )
    max_conversations: int | None = _option(
        None,
        "conversations in progress at once; none: 4 x concurrency",
        "a whole number >= 1 or None",
        metavar="N",
        ge=1,
    )
    stop_grace_s: (
        Annotated[int, Field(ge=0)] | Annotated[float, Field(ge=0, allow_inf_nan=False)]
    ) = _option(
        10.0,
        "after a first stop, seconds the requests in flight may take to finish (0: cancel "
        "them at once); a second stop cancels them",
        "a number >= 0",
        metavar="S",
    )
    redis_url: str | None = _option(
        None,
        "share the rpm/tpm budgets with every process that uses this Redis and the same "
        "deployment (none: $NBLLM_REDIS_URL, else this run's own)",
        "a redis:// or rediss:// URL",
        metavar="URL",
        pattern=r"^(rediss?|unix)://",
    )
    max_cost_usd: PositiveNumber | None = _option(
        None,
        "a hard cap in dollars: no new request once the run's answers cost this much (those "
        "in flight finish); a re-run with a higher cap resumes",
        "a number > 0 or None",
        metavar="USD",
    )
    max_tokens_total: int | None = _option(
        None,
        "a hard cap in tokens (prompt and completion): no new request once the run's answers "
        "used this many",
        "a whole number >= 1 or None",
        metavar="N",
        ge=1,
    )
    cost_per_1k_tokens: PositiveNumber | None = _option(
        None,
        "the price in dollars of 1,000 tokens (prompt and completion) for answers whose "
        "engine gives no cost",
        "a number > 0 or None",
        metavar="USD",
    )
    batch_api: bool = _option(
        False,
        "send the run through the provider's batch API (openai/..., anthropic/..., or an "
        "api_base= with /v1/batches): about half the price, answers within 24 h",
        "True or False",
    )
    batch_fallback: Literal["batch", "live"] = _option(
        "batch",
        "where a request a batch failed or left unanswered goes again (up to retries): in "
        "the next batch, or as a live request",
        "'batch' or 'live'",
        metavar="WHERE",
    )
    max_batches: Annotated[int, Field(ge=1)] = _option(
        4, "batch_api: batches in flight at once (more requests wait)", "a whole number >= 1",
        metavar="N",
    )  # fmt: skip
    batch_max_requests: int | None = _option(
        None,
        "batch_api: requests per batch at most; none: the provider's limit (OpenAI 50,000, "
        "Anthropic 100,000)",
        "a whole number >= 1 or None",
        metavar="N",
        ge=1,
    )
    batch_poll_s: PositiveNumber = _option(
        30.0, "batch_api: seconds between polls of a batch in flight", "a number > 0",
        metavar="S",
    )  # fmt: skip
    router: list[Any] | dict[str, Any] | str | InstanceOf[os.PathLike] | None = _option(
        None,
        "deployments in litellm's model_list format (a list, a mapping with model_list, or a "
        "YAML file such as litellm proxy's config.yaml); model= then names a group "
        "(model_name), and each request goes to one of its deployments",
        "a list of deployments, a mapping with 'model_list', or a YAML file's path",
        metavar="YAML",
    )
    routing: str | None = _option(
        None,
        "how router= spreads requests: simple-shuffle (weighted, the default), least-busy, "
        "latency-based or usage-based",
        "'simple-shuffle', 'least-busy', 'latency-based' or 'usage-based'",
        metavar="STRATEGY",
    )
    fallbacks: list[Any] | dict[str, Any] | None = _option(
        None,
        "router= groups to try, in order, while every deployment of a group is down: "
        '[{"group": ["other-group", ...]}]',
        'a list like [{"group": ["other-group"]}]',
    )
    cooldown_s: (
        Annotated[int, Field(ge=0)] | Annotated[float, Field(ge=0, allow_inf_nan=False)] | None
    ) = _option(
        None,
        "seconds a router= deployment's breaker stays open before one probe is sent (default 5)",
        "a number >= 0 or None",
        metavar="S",
    )
    allowed_fails: int | None = _option(
        None,
        "consecutive failures (5xx, timeouts, refused connections) that open a router= "
        "deployment's breaker (default 3)",
        "a whole number >= 1 or None",
        metavar="N",
        ge=1,
    )
    ensemble: Literal["first", "vote"] | None = _option(
        None,
        "with several models: 'first' sends each turn to every model and keeps the first "
        "valid answer (the others are cancelled); 'vote' keeps the answer most models gave",
        "'first', 'vote' or None",
        metavar="HOW",
    )
    response_format: Any = _option(
        None,
        "structured answers: a pydantic model class or a JSON schema; each answer is validated "
        "and its value goes into the parsed column (an answer that fails is asked again)",
        "a pydantic model class or a JSON schema (a dict)",
        metavar="SCHEMA",
    )
    parse: Any = _option(
        None,
        "a callable answer -> value, or 'number', whose value goes into the parsed column",
        "a callable or 'number'",
        metavar="PARSER",
    )
    parse_retries: Annotated[int, Field(ge=0)] = _option(
        2,
        "times a turn is asked again, shown its answer's error, when the answer does not parse",
        "a whole number >= 0",
        metavar="N",
    )
    score: Any = _option(
        None,
        "score each answer against its reference as the run goes: 'exact', 'contains', "
        "'numeric', 'f1' or a callable (answer, reference) -> 0..1; shown live, in the summary "
        "and in a score column",
        "'exact', 'contains', 'numeric', 'f1' or a callable",
        metavar="METRIC",
    )
    metrics_port: Annotated[int, Field(ge=1, le=65535)] | None = _option(
        None,
        "serve Prometheus metrics on /metrics at this port while the run goes (none: "
        "$NBLLM_METRICS_PORT, else no endpoint); needs nbllm[metrics]",
        "a port number from 1 to 65535, or None",
        metavar="PORT",
    )
    metrics_host: str = _option(
        "127.0.0.1",
        "the address /metrics listens on (0.0.0.0: every interface, for a scraper elsewhere)",
        "an IP address or host name",
        metavar="HOST",
        pattern=r"\S",
    )
    trace_content: bool = _option(
        False,
        "with OpenTelemetry configured, also record each turn's question and answer in its "
        "conversation's span (never by default)",
        "True or False",
    )
    alerts: Any = _option(
        None,
        "alert rules: a dict of rule -> threshold (latency_p95_s, error_rate, "
        "rate_limited_rate, throughput_drop, gpu_memory, spend_share; False turns one off) "
        "with window_s and cooldown_s; None: the defaults; False: no alerts",
        "a dict of rule -> threshold, False or None",
        metavar="RULES",
    )
    on_alert: Callable[[Any], Any] | None = _option(
        None, "called with each Alert as it is raised (a webhook of one's own)", "a callable"
    )
    listeners: tuple[Callable[[Any], Any], ...] = _option(
        (), "callables receiving the executor's events", "a list of callables", strict=False
    )
    params: dict[str, Any] = _option(
        {}, "other sampling parameters for the engine (top_p, seed, ...)", "a dict"
    )

    def __init__(self, **options: Any) -> None:
        try:
            super().__init__(**options)
        except ValidationError as exc:
            # from None: pydantic's multi-line report as the cause would undo the one line.
            raise ConfigError(_one_line(exc, options)) from None

    def __repr_args__(self) -> Iterable[tuple[str | None, Any]]:
        # pydantic's repr, str and pretty-printers all read these.
        for name, value in super().__repr_args__():
            yield name, shown_option(name, value) if name is not None else value

    @field_validator("model")
    @classmethod
    def _one_model(cls, value: Any) -> Any:
        return value[0] if isinstance(value, list) and len(value) == 1 else value

    @property
    def models(self) -> tuple[str, ...]:
        """The models of ``model=[...]``, or () for one model (or none)."""
        return tuple(self.model) if isinstance(self.model, list) else ()

    @property
    def retry_policy(self) -> RetryPolicy:
        if isinstance(self.retries, RetryPolicy):
            return self.retries
        return RetryPolicy(retries=self.retries)

    @property
    def sampling_params(self) -> dict[str, Any]:
        """What the engine receives besides the messages."""
        params: dict[str, Any] = {}
        if self.max_tokens is not None:
            params["max_tokens"] = self.max_tokens
        if self.temperature is not None:
            params["temperature"] = self.temperature
        params.update(self.params)
        parser = self.parser
        if parser is not None and parser.wire is not None:
            params["response_format"] = parser.wire
        return params

    @property
    def parser(self) -> Parser | None:
        """What reads the answers (``response_format`` / ``parse``); ConfigError if either
        is not something it can be."""
        return make_parser(self.response_format, self.parse)


def shown_option(name: str, value: Any) -> Any:
    """An option's value fit to show or store: URLs (``api_base``, ``redis_url``) without a
    password, every credential-like value in ``params`` and ``router`` hidden."""
    if name in ("api_base", "redis_url") and isinstance(value, str):
        return public_url(value)
    if name in ("params", "router") and isinstance(value, (Mapping, list)):
        return hidden({name: value})[name]
    return value


def show() -> str:
    """Every run option's value below the call, and where it comes from: the environment
    (``NBLLM_<OPTION>``), the project's or the user's ``nbllm.toml``, or the default (a
    key never shown). See ``nbllm.settings``."""
    from nbllm.settings import show as settings_show

    return settings_show()


def config_of_call(call: Mapping[str, Any]) -> RunConfig:
    """The ``RunConfig`` of a call of ``run``, ``arun`` or ``submit``, from its ``locals()``
    on entry: their keywords are the schema's fields, by name (a test holds them equal)."""
    return RunConfig(**{name: call[name] for name in RunConfig.model_fields})


def option_about(name: str, key: str) -> str | None:
    """What the schema says of option ``name`` under ``key`` ("expected", "metavar")."""
    extra = RunConfig.model_fields[name].json_schema_extra
    value = extra.get(key) if isinstance(extra, dict) else None
    return None if value is None else str(value)


def _one_line(exc: ValidationError, options: Mapping[str, Any]) -> str:
    error = exc.errors()[0]
    name = str(error["loc"][0])
    if error["type"] == "extra_forbidden":
        return f"{name}= is not a run option; the options are {', '.join(RunConfig.model_fields)}"
    return f"{name}= expected {option_about(name, 'expected')}, got {_shown(name, options[name])}"


def _shown(name: str, got: Any) -> str:
    """A refused value as a message may show it: never the key, a URL's password or a
    credential in a mapping (``params``)."""
    if name == "api_key":
        return f"a {type(got).__name__}"
    if isinstance(got, str) and name == "api_base":
        return repr(public_url(got))
    if isinstance(got, (Mapping, list, tuple)):  # credentials inside hidden, at any depth
        shown = hidden({name: got})[name]
        return repr(tuple(shown) if isinstance(got, tuple) else shown)
    return repr(got)


def leaf_types(annotation: Any) -> set[Any]:
    """The types an option's annotation is made of, and the values of its ``Literal``s."""
    if typing.get_origin(annotation) is Annotated:
        return leaf_types(typing.get_args(annotation)[0])
    args = typing.get_args(annotation)
    return {leaf for arg in args for leaf in leaf_types(arg)} if args else {annotation}


def takes_many(name: str) -> bool:
    """Whether option ``name`` also takes a list of names (``model=["a", "b"]``, which a
    command line gives as ``-m a -m b``)."""
    annotation = RunConfig.model_fields[name].annotation
    lists = [_bare(a) for a in typing.get_args(annotation) if typing.get_origin(_bare(a)) is list]
    return any(_bare(typing.get_args(a)[0]) is str for a in lists)  # of names, not of mappings


def _bare(annotation: Any) -> Any:
    return (
        typing.get_args(annotation)[0] if typing.get_origin(annotation) is Annotated else annotation
    )


def text_type(name: str) -> type:
    """How an option given as text is read: a number, a whole number, or the text itself
    (a number option that also takes ``"auto"`` reads that word as it is)."""
    leaves = leaf_types(RunConfig.model_fields[name].annotation)
    return float if float in leaves else int if int in leaves else str


def takes_auto(name: str) -> bool:
    """Whether option ``name`` also takes ``"auto"`` (``rpm="auto"``)."""
    return "auto" in leaf_types(RunConfig.model_fields[name].annotation)


def option_reader(name: str) -> Any:
    """The function that reads option ``name`` from text (a flag, a setting)."""
    kind = text_type(name)
    if not takes_auto(name):
        return kind

    def read(text: str) -> Any:
        return "auto" if text.strip().lower() == "auto" else kind(text)

    read.__name__ = kind.__name__  # argparse names the type in "invalid int value: 'x'"

    return read


def parse_run_option(name: str, text: str) -> Any:
    """The value of option ``name`` given as text (a setting, an environment variable),
    checked by the schema's rules; ``ConfigError`` otherwise."""
    kind = text_type(name)
    try:
        value = option_reader(name)(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        what += " or 'auto'" if takes_auto(name) else ""
        msg = f"{name} expects {what}, got {text!r}"
        raise ConfigError(msg) from None
    RunConfig(**{name: value})
    return value
