"""What every in-process local engine shares: the model, its chat template, its lifecycle.

A subclass loads its backend in ``_load`` and answers in ``_complete``. Turning chat
messages into token ids with the model's own chat template, the end-of-text ids, the
sampling options and stop strings, and releasing the model once on ``aclose`` live here
once. Engines that generate token ids in batches extend ``BatchedEngine``
(``nbllm.engines.local.batched``); engines that schedule requests themselves (vllm,
llamacpp) extend ``LocalEngine`` directly.

Timeouts: a local engine applies ``request.timeout`` itself (``bounds_own_timeout``), to the
wait for the model only: a request still queued when its timeout runs out fails with
``RequestTimeout`` and leaves the queue, and a generation that started runs to its end,
however long a busy CPU makes it. Timing out a generation that is making progress would
only start it again from the beginning, and on a slow machine never finish. A request that
is cancelled (a stop) leaves the queue at once, and its generation is cut where the backend
allows: torch and onnx drop its row from the batch at the next token and end the batch once
no row is left, llama.cpp stops at the next token, and vLLM aborts the request in its
scheduler. (A torch batch still computes a dropped row's padding until the batch ends.)

Context: once loaded, an engine knows its model's context length (``context_length``,
tokens of prompt and answer together; None where the model does not say). A request whose
``max_tokens`` is beyond it is refused before its prompt is tokenized, and one whose prompt
tokens and ``max_tokens`` together exceed it is refused once the prompt is tokenized, before
anything generates: both with ``RequestRejected``, which is never retried. Without
``max_tokens`` the default (``DEFAULT_MAX_TOKENS``) counts.

Every answer says why it ended (``ChatResponse.finish_reason``): "length" when
``max_tokens`` cut it, "stop" when the model ended it or a stop string did. While a model
generates, ``on_phase`` hears "generating" with the tokens generated so far (``phases``).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import math
import threading
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nbllm.engines.base import Engine, EngineState
from nbllm.engines.hardware import Hardware, hardware
from nbllm.engines.local.batching import check_batching
from nbllm.engines.local.models import LocalModel, resolve_local_model
from nbllm.engines.local.phases import PhaseCallback, PhaseReport, TokenReport
from nbllm.errors import ConfigError, EngineUnavailable, RequestRejected
from nbllm.types import ChatRequest, ChatResponse, Message

__all__ = ["DEFAULT_MAX_TOKENS", "Generation", "LocalEngine", "context_length_of"]

#: Tokens generated per answer when the request does not say (``max_tokens=``).
DEFAULT_MAX_TOKENS = 256
# A context length beyond this is a placeholder, not a figure: transformers writes 1e30 as a
# tokenizer's model_max_length when the model does not say.
_LONGEST_CONTEXT = 1 << 24
# Where a model's configuration states its context length, in the order they are read.
_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_seq_len")

_KNOWN_PARAMS = frozenset(
    {"max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "n"}
)


@dataclass(frozen=True, slots=True)
class Generation:
    """The sampling options a batch shares. ``temperature == 0`` means greedy decoding."""

    max_new_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    #: True when the request gave no max_tokens (``max_new_tokens`` is then the default).
    #: Not compared: it never keeps two requests out of one batch.
    defaulted: bool = field(default=False, compare=False)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Generation:
        """Read OpenAI-style sampling parameters; anything a local engine cannot honour is refused.

        Temperature defaults to 0 (greedy): a local batch run should be repeatable.
        """
        unknown = sorted(set(params) - _KNOWN_PARAMS)
        if unknown:
            msg = (
                f"local engines do not support the parameter(s) {', '.join(unknown)}; "
                f"supported: {', '.join(sorted(_KNOWN_PARAMS))}"
            )
            raise RequestRejected(msg)
        if params.get("n", 1) != 1:
            msg = f"local engines answer with one choice, got n={params['n']!r}"
            raise RequestRejected(msg)
        max_tokens = params.get("max_tokens", params.get("max_completion_tokens"))
        stop = params.get("stop") or ()
        if isinstance(stop, str):
            stop = (stop,)
        try:
            generation = cls(
                max_new_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else int(max_tokens),
                temperature=float(params.get("temperature") or 0.0),
                top_p=float(params.get("top_p", 1.0) if params.get("top_p") is not None else 1.0),
                seed=None if params.get("seed") is None else int(params["seed"]),
                stop=tuple(str(s) for s in stop),
                defaulted=max_tokens is None,
            )
        except (TypeError, ValueError) as exc:
            msg = f"bad sampling parameter: {exc}"
            raise RequestRejected(msg) from exc
        if generation.max_new_tokens < 1:
            msg = f"max_tokens must be >= 1, got {max_tokens!r}"
            raise RequestRejected(msg)
        if not (0 < generation.top_p <= 1) or not math.isfinite(generation.temperature):
            msg = (
                f"bad sampling parameters: temperature={generation.temperature}, "
                f"top_p={generation.top_p}"
            )
            raise RequestRejected(msg)
        return generation

    def cut(self, text: str) -> str:
        """``text`` up to the first stop string."""
        for stop in self.stop:
            at = text.find(stop)
            if at >= 0:
                text = text[:at]
        return text

    def finish(self, text: str, new_tokens: int) -> tuple[str, str]:
        """The answer (``text`` up to the first stop string) and why it ended.

        "stop": the model ended it (``new_tokens`` fell short of ``max_new_tokens``) or a
        stop string did; "length": ``max_new_tokens`` cut it.
        """
        answer = self.cut(text)
        if answer != text or new_tokens < self.max_new_tokens:
            return answer, "stop"
        return answer, "length"


def check_prefix_cache(prefix_cache: object, prefix_cache_bytes: object) -> None:
    """Refuse a prefix-cache option no engine can use, naming it."""
    if not isinstance(prefix_cache, bool):
        msg = f"prefix_cache must be True or False, got {prefix_cache!r}"
        raise ConfigError(msg)
    if prefix_cache_bytes is not None and (
        isinstance(prefix_cache_bytes, bool)
        or not isinstance(prefix_cache_bytes, int)
        or prefix_cache_bytes < 0
    ):
        msg = f"prefix_cache_bytes must be a whole number of bytes >= 0, got {prefix_cache_bytes!r}"
        raise ConfigError(msg)


class LocalEngine(Engine):
    """A model loaded in this process.

    ``model``: a Hugging Face model directory, a GGUF file, or None / the embedded
    default's name (SmolLM2-135M-Instruct). ``device``: "cpu", "cuda", "mps" (default:
    the best this machine has). ``batch_size`` (default from ``nbllm.hardware()``) and
    ``batch_wait_s`` are taken by every local engine, so one set of options fits whichever
    ``auto`` picks; an engine that schedules requests itself reads what applies to it.
    So do ``continuous`` (admit requests into a running batch between tokens, rather than
    run fixed batches to their longest answer), ``prefix_cache`` (keep recent prompts' keys
    and values, so that a prompt that starts like one of them computes only the rest) and
    ``prefix_cache_bytes`` (that cache's bound; default a fifth of free memory, at most
    4 GiB): the torch engine uses them, the others schedule and cache in their own way.
    ``on_phase(phase, done, total, detail)`` hears the model being prepared: converted or
    exported once ("converting", "exporting"), then "loading" (None / None at the start,
    1 / 1 once loaded); see ``nbllm.engines.local.phases``.
    """

    name = "local"
    # A generation under way is never timed out: only the wait for the model is.
    bounds_own_timeout = True

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        batch_size: int | None = None,
        batch_wait_s: float = 0.01,
        device: str | None = None,
        on_phase: PhaseCallback | None = None,
        continuous: bool = True,
        prefix_cache: bool = True,
        prefix_cache_bytes: int | None = None,
    ) -> None:
        super().__init__()
        # Checked before anything loads: a bad option should not wait for a conversion.
        check_batching(1 if batch_size is None else batch_size, batch_wait_s)
        check_prefix_cache(prefix_cache, prefix_cache_bytes)
        self.continuous = bool(continuous)
        self.prefix_cache = prefix_cache
        self.prefix_cache_bytes = prefix_cache_bytes
        self.hardware: Hardware = hardware()
        self.device = device or self.hardware.device
        self.model: LocalModel = resolve_local_model(model)
        self.default_model = self.model.name
        self.batch_size = batch_size or self.hardware.default_batch_size
        self.batch_wait_s = batch_wait_s
        #: Hears the model's preparation (converting, exporting, loading), then the tokens
        #: generated while it answers ("generating"); see ``phases``.
        self.on_phase = on_phase
        self.tokens = TokenReport(lambda: self.on_phase)
        # Held by every model call and by the release, so a model is never dropped mid-call.
        self._lock = threading.Lock()
        self.tokenizer: Any = None
        #: Tokens of prompt and answer the model can hold, once loaded (None: it does not
        #: say); requests beyond it are refused (``generation``, ``context_refusal``).
        self.context_length: int | None = None
        self._prepare()
        loading = PhaseReport(on_phase, "loading")
        loading(None, f"loading {self.model.name} into {self.name} on {self.device}")
        self._load()
        loading.total = 1
        loading(1, f"loaded: {self.describe()}")

    # -- for subclasses ----------------------------------------------------------

    def _prepare(self) -> None:
        """Make what ``_load`` reads, once per model (a conversion, an export).

        Reports through ``self.on_phase``; raises EngineUnavailable.
        """

    @abstractmethod
    def _load(self) -> None:
        """Load the tokenizer (``self.tokenizer``) and the model, and set
        ``self.context_length`` where the model says it; raise EngineUnavailable."""

    def _release(self) -> None:
        """Drop the model (called once, by ``aclose``, holding the model lock)."""

    # -- shared ------------------------------------------------------------------

    async def complete(self, request: ChatRequest) -> ChatResponse:
        return await super().complete(schema_in_prompt(request))

    def describe(self) -> str:
        return f"{self.name} {self.model.name} on {self.device}"

    def generation(self, request: ChatRequest) -> Generation:
        """The request's sampling options; a ``max_tokens`` beyond the context is refused.

        Called before the prompt is tokenized: such a request costs no tokenizing.
        """
        generation = Generation.from_params(request.params)
        context = self.context_length
        if context is None or generation.max_new_tokens <= context:
            return generation
        msg = (
            f"max_tokens {generation.max_new_tokens}{_default(generation)} is beyond the "
            f"model's context of {context} tokens"
        )
        raise RequestRejected(msg)

    def context_refusal(self, prompt_tokens: int, generation: Generation) -> RequestRejected | None:
        """Why a prompt of ``prompt_tokens`` leaves no room for ``max_tokens`` in the
        context, or None where it fits."""
        context = self.context_length
        if context is None or prompt_tokens + generation.max_new_tokens <= context:
            return None
        msg = (
            f"the prompt's {prompt_tokens} tokens and max_tokens "
            f"{generation.max_new_tokens}{_default(generation)} exceed the context of "
            f"{context} tokens"
        )
        return RequestRejected(msg)

    def identity(self) -> str:
        return f"{self.name} {self.model.identity}"

    @functools.cached_property
    def eos_token_ids(self) -> list[int]:
        """End-of-text ids of the loaded model and tokenizer (read once)."""
        return end_of_text_ids(getattr(self, "hf_model", None), self.tokenizer)

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.eos_token_ids[0])

    def encode(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of the chat, rendered with the model's chat template, ready to answer."""
        try:
            ids = self.tokenizer.apply_chat_template(
                list(messages), add_generation_prompt=True, tokenize=True
            )
        except Exception as exc:
            msg = f"the chat template of {self.model.name} refused these messages: {exc}"
            raise RequestRejected(msg) from exc
        if isinstance(ids, Mapping):  # some tokenizers return a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True)).strip()

    def strip_eos(self, ids: Sequence[int]) -> list[int]:
        """The ids up to (not including) the first end-of-text token."""
        eos = set(self.eos_token_ids)
        out = []
        for token in ids:
            if token in eos:
                break
            out.append(int(token))
        return out

    def _free_cached_memory(self) -> None:
        gc.collect()
        try:
            import torch
        except ImportError:
            return
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    async def aclose(self) -> None:
        self.tokens.close()
        if self.state is not EngineState.CLOSED:
            with self._lock:
                # Closed before the release: a model call still queued then fails cleanly.
                self.state = EngineState.CLOSED
                self._release()
                self.tokenizer = None
            self._free_cached_memory()
        await super().aclose()


def _default(generation: Generation) -> str:
    return " (the default)" if generation.defaulted else ""


def end_of_text_ids(hf_model: Any, tokenizer: Any) -> list[int]:
    """The tokenizer's end-of-text id and those of the model's generation config, sorted."""
    found: set[int] = set()
    configured = getattr(getattr(hf_model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        found.add(configured)
    elif configured:
        found.update(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        found.add(int(tokenizer.eos_token_id))
    return sorted(found)


def context_length_of(config: Any, tokenizer: Any = None) -> int | None:
    """A model's context length in tokens, or None where nothing says it.

    Read from its configuration (a transformers config or the dict of ``config.json``:
    ``max_position_embeddings``, ``n_positions``, ``max_seq_len``), else from the
    tokenizer's ``model_max_length`` when that is a real figure, not transformers'
    placeholder for "no limit".
    """
    if config is not None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        for name in _CONTEXT_FIELDS:
            value = text.get(name) if isinstance(text, Mapping) else getattr(text, name, None)
            if (context := _context(value)) is not None:
                return context
    return _context(getattr(tokenizer, "model_max_length", None))


def _context(value: object) -> int | None:
    """``value`` as a context length, or None where it is no real figure."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 < value <= _LONGEST_CONTEXT else None


def require(module: str, extra: str, engine: str) -> Any:
    """Import ``module`` or raise EngineUnavailable saying which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        msg = (
            f"engine {engine!r} needs the Python package {module!r}, which is not installed "
            f"(pip install 'nbllm[{extra}]'): {exc}"
        )
        raise EngineUnavailable(msg) from exc


def json_instruction(response_format: Any) -> str:
    """``response_format`` asked in words, for a model that cannot be held to it: a single
    JSON object, following the schema where it gives one."""
    inner = response_format.get("json_schema") if isinstance(response_format, Mapping) else None
    schema = inner.get("schema") if isinstance(inner, Mapping) else None
    note = "Answer with a single JSON object"
    if schema is not None:
        note += " that follows this JSON schema: " + json.dumps(schema, ensure_ascii=False)
    return note + ", and nothing else."


def schema_in_prompt(request: ChatRequest) -> ChatRequest:
    """A request that asks for ``response_format``, as a local model is asked it: the schema
    in the last message, as an instruction (a local engine has no constrained decoding
    here; the run validates the answer and asks again where it does not parse)."""
    wanted = request.params.get("response_format")
    if wanted is None or not request.messages:
        return request
    params = {k: v for k, v in request.params.items() if k != "response_format"}
    last = request.messages[-1]
    content = f"{last.get('content', '')}\n\n{json_instruction(wanted)}"
    messages = [*request.messages[:-1], {**last, "content": content}]
    return dataclasses.replace(request, messages=messages, params=params)
