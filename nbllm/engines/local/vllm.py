"""The vLLM engine: vLLM's async engine in this process, with its own continuous batching.

Prefix caching is on, so the earlier turns of a conversation (sent again with every
turn) are not recomputed. ``tensor_parallel_size`` defaults to the visible GPUs;
``tensor_parallel_size``, ``pipeline_parallel_size`` and ``distributed_executor_backend``
("ray" to spread a model too large for one machine over a Ray cluster) pass through to vLLM,
which keeps its own distribution. vLLM
keeps GPU memory while the process lives, so in a notebook prefer ``worker=True``
(the default on a GPU): the model then lives in a worker process that can be stopped.

vLLM queues and schedules requests itself, so ``request.timeout`` bounds the wait for a
request's first output (its queue and its prompt's prefill), never the generation after it
(``nbllm.engines.local.base``). A request that is cancelled, or times out before its first
output, is aborted in vLLM's scheduler: its sequence leaves the running batch at once.
vLLM's own ``finish_reason`` ("stop", "length", "abort") is passed on as it is.

A request with ``response_format`` is decoded under vLLM's structured outputs (guided
decoding: the JSON schema, or any JSON object), besides the schema in the prompt that every
local engine is given: the answer cannot leave the schema (``guided``).

The context is vLLM's ``max_model_len``. The prompt is tokenized in a thread, off the event
loop, and one that leaves no room for ``max_tokens`` is refused before vLLM sees it.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
from collections.abc import Mapping
from typing import Any

from nbllm.engines.local.base import Generation, LocalEngine, require
from nbllm.engines.local.models import transformers_checkpoint
from nbllm.engines.local.phases import quiet_loading
from nbllm.errors import ConfigError, EngineError, EngineUnavailable, RequestTimeout
from nbllm.types import ChatRequest, ChatResponse

__all__ = ["VllmEngine", "guided"]

_request_ids = itertools.count()
# The response_format of the request being sent (schema_in_prompt takes it out of params).
_WANTED: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "response_format", default=None
)


def guided(sampling_params: Any, response_format: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``SamplingParams`` keywords that hold vLLM's decoding to ``response_format``
    (OpenAI's wire form): ``structured_outputs=StructuredOutputsParams(...)`` where vLLM
    has it (0.10.2 on), else ``guided_decoding=GuidedDecodingParams(...)``; none without
    a response_format, or on a vLLM with neither."""
    if not isinstance(response_format, Mapping):
        return {}
    inner = response_format.get("json_schema")
    schema = inner.get("schema") if isinstance(inner, Mapping) else None
    if schema is None and response_format.get("type") != "json_object":
        return {}
    what = {"json": dict(schema)} if schema is not None else {"json_object": True}
    if hasattr(sampling_params, "StructuredOutputsParams"):
        return {"structured_outputs": sampling_params.StructuredOutputsParams(**what)}
    if hasattr(sampling_params, "GuidedDecodingParams"):
        return {"guided_decoding": sampling_params.GuidedDecodingParams(**what)}
    return {}


class VllmEngine(LocalEngine):
    """``vllm.AsyncLLMEngine`` behind the engine seam (GPU only).

    vLLM schedules any number of requests itself (``max_in_flight`` stays None);
    ``batch_size`` only raises its ``max_num_seqs``.
    """

    name = "vllm"

    def __init__(
        self,
        *args: Any,
        tensor_parallel_size: int | None = None,
        pipeline_parallel_size: int | None = None,
        distributed_executor_backend: str | None = None,
        **kwargs: Any,
    ) -> None:
        for option, value in (
            ("tensor_parallel_size", tensor_parallel_size),
            ("pipeline_parallel_size", pipeline_parallel_size),
        ):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                msg = f"{option} must be a whole number >= 1, got {value!r}"
                raise ConfigError(msg)
        self.parallel: dict[str, Any] = {
            k: v
            for k, v in (
                ("tensor_parallel_size", tensor_parallel_size),
                ("pipeline_parallel_size", pipeline_parallel_size),
                ("distributed_executor_backend", distributed_executor_backend),
            )
            if v is not None
        }
        super().__init__(*args, **kwargs)

    def _prepare(self) -> None:
        if not self.hardware.has_cuda:
            msg = "vllm needs a CUDA or ROCm GPU, and none was found"
            raise EngineUnavailable(msg)
        require("vllm", "vllm", self.name)
        require("transformers", "local", self.name)
        self.checkpoint = transformers_checkpoint(self.model, on_phase=self.on_phase)

    def _load(self) -> None:
        vllm = require("vllm", "vllm", self.name)
        transformers = require("transformers", "local", self.name)
        checkpoint = str(self.checkpoint)
        with quiet_loading():
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
        gpus = sum(1 for g in self.hardware.gpus if g.kind in ("cuda", "rocm"))
        parallel = {"tensor_parallel_size": max(1, gpus), **self.parallel}
        try:
            args = vllm.AsyncEngineArgs(
                model=checkpoint,
                served_model_name=self.model.name,
                enable_prefix_caching=True,
                max_num_seqs=max(self.batch_size, 8),
                **parallel,
            )
            self.vllm_engine: Any = vllm.AsyncLLMEngine.from_engine_args(args)
        except Exception as exc:
            msg = f"vllm cannot load {self.model.name}: {type(exc).__name__}: {exc}"
            raise EngineUnavailable(msg) from exc
        self._vllm = vllm
        self.context_length = _max_model_len(self.vllm_engine)

    def _sampling_params(self, generation: Generation) -> Any:
        return self._vllm.SamplingParams(
            max_tokens=generation.max_new_tokens,
            temperature=generation.temperature,
            top_p=generation.top_p,
            seed=generation.seed,
            stop=list(generation.stop) or None,
            **guided(self._vllm.sampling_params, _WANTED.get()),
        )

    async def complete(self, request: ChatRequest) -> ChatResponse:
        token = _WANTED.set(request.params.get("response_format"))
        try:
            return await super().complete(request)
        finally:
            _WANTED.reset(token)

    async def _complete(self, request: ChatRequest) -> ChatResponse:
        generation = self.generation(request)
        prompt = await asyncio.to_thread(self.encode, request.messages)
        refusal = self.context_refusal(len(prompt), generation)
        if refusal is not None:
            raise refusal
        self.tokens.loop = asyncio.get_running_loop()
        outputs = self.vllm_engine.generate(
            {"prompt_token_ids": prompt},
            self._sampling_params(generation),
            request_id=f"nbllm-{next(_request_ids)}",
        )
        final = None
        try:
            # Cancelling the generator's step (a stop, or the timeout) or closing it makes
            # vLLM abort the request.
            final = await asyncio.wait_for(anext(outputs, None), request.timeout)
            seen = 0
            while final is not None:
                generated = len(final.outputs[0].token_ids) if final.outputs else 0
                self.tokens.add(generated - seen)
                seen = max(seen, generated)
                following = await anext(outputs, None)
                if following is None:
                    break
                final = following
            self.tokens.add(0, flush=True)
        except asyncio.TimeoutError as exc:
            msg = (
                f"vllm gave no first token within the {request.timeout:g} s timeout: the "
                "request never started and was aborted (a generation that started is never "
                "timed out)"
            )
            raise RequestTimeout(msg) from exc
        except Exception as exc:
            msg = f"vllm failed to generate: {type(exc).__name__}: {exc}"
            raise EngineError(msg) from exc
        finally:
            await outputs.aclose()
        if final is None or not final.outputs:
            msg = "vllm returned no output"
            raise EngineError(msg)
        completion = final.outputs[0]
        return ChatResponse(
            text=generation.cut(completion.text.strip()),
            model=self.model.name,
            prompt_tokens=len(prompt),
            completion_tokens=len(completion.token_ids),
            cost_usd=0.0,
            finish_reason=completion.finish_reason,
        )

    def _release(self) -> None:
        engine = getattr(self, "vllm_engine", None)
        shutdown = getattr(engine, "shutdown", None)
        if callable(shutdown):
            shutdown()
        self.vllm_engine = None


def _max_model_len(vllm_engine: Any) -> int | None:
    """vLLM's ``max_model_len`` (its engine's ``model_config``, or an older engine's
    ``engine.model_config``); None where neither is there."""
    config = getattr(vllm_engine, "model_config", None)
    if config is None:
        config = getattr(getattr(vllm_engine, "engine", None), "model_config", None)
    value = getattr(config, "max_model_len", None)
    return value if isinstance(value, int) and value > 0 else None
