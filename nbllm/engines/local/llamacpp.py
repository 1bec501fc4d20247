"""The llama.cpp engine: a GGUF file run by ``llama-cpp-python``, the fast path on a CPU.

It reads the quantized weights as they are (no conversion) and renders the chat with
the template stored in the GGUF file. Its arithmetic on quantized weights differs from
the de-quantized float weights the other engines use, so its greedy answers can differ
from theirs (on the embedded model: most prompts agree, some do not). One llama.cpp
context answers one request at a time, so requests queue in arrival order for its one
long-lived model thread (no batcher); the speed comes from llama.cpp itself.
GPUs are left to the other engines (``auto`` skips this one where there is a GPU).

``request.timeout`` bounds a request's wait for the model thread, never its generation
(``nbllm.engines.local.base``). A logits processor sees each token: it counts them for the
"generating" phase and, once the request is cancelled, leaves end-of-text as the only
choice, so the generation ends at its next token.

The context is the one the model was trained for (``n_ctx_train``). llama.cpp tokenizes the
chat itself, in the model thread: a prompt that leaves no room for ``max_tokens`` is refused
(``RequestRejected``) once llama.cpp has read it, before its first token is generated, where
llama.cpp alone would quietly cut ``max_tokens`` short.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from nbllm.engines.base import EngineState
from nbllm.engines.local.base import Generation, LocalEngine, require
from nbllm.engines.local.batching import ModelThread
from nbllm.errors import EngineError, EngineUnavailable, RequestRejected
from nbllm.types import ChatRequest, ChatResponse, Message

__all__ = ["LlamaCppEngine"]

# llama.cpp's ValueError for a prompt at least as long as the context.
_PROMPT_TOO_LONG = re.compile(r"Requested tokens \((\d+)\) exceed context window")


@dataclass(slots=True, eq=False)
class _Chat:
    messages: list[Message]
    generation: Generation
    #: Set on the loop when the request is cancelled; read by the model thread.
    cancelled: bool = False


class LlamaCppEngine(LocalEngine):
    """``llama_cpp.Llama.create_chat_completion`` on a GGUF file, one request at a time."""

    name = "llamacpp"
    # One request at a time: conversations then run one after another, each turn
    # continuing the context the last one left (no state to save or restore).
    max_in_flight = 1
    #: Memory for the states of conversations in progress (llama.cpp's prompt cache).
    cache_bytes = 2 << 30

    def _load(self) -> None:
        llama_cpp = require("llama_cpp", "llamacpp", self.name)
        if not self.model.is_gguf:
            msg = f"llamacpp runs GGUF files, and {self.model.name} is a model directory"
            raise EngineUnavailable(msg)
        try:
            self.llama: Any = llama_cpp.Llama(
                model_path=str(self.model.path),
                n_ctx=0,  # the model's own context length
                n_threads=self.hardware.cpu_count,
                verbose=False,
            )
            # When conversations interleave, keep each one's state so that its next turn
            # evaluates only what is new. Saving a state costs, so with one request at a
            # time (where llama.cpp's own context already holds the conversation) it is off.
            self._states = llama_cpp.LlamaRAMCache(capacity_bytes=self.cache_bytes)
        except Exception as exc:
            msg = f"llama.cpp cannot load {self.model.path.name}: {type(exc).__name__}: {exc}"
            raise EngineUnavailable(msg) from exc
        self.context_length = int(self.llama.n_ctx()) or None
        self._logits_processors = llama_cpp.LogitsProcessorList
        self._in_flight = 0
        # ggml sets up its thread pool once per thread: every call runs on this one.
        self._model_thread = ModelThread("llamacpp-model")

    async def _complete(self, request: ChatRequest) -> ChatResponse:
        generation = self.generation(request)
        self.tokens.loop = asyncio.get_running_loop()
        chat = _Chat(list(request.messages), generation)
        self._in_flight += 1
        try:
            answer = await self._model_thread.call(self._run_chat, chat, timeout=request.timeout)
        except asyncio.CancelledError:
            chat.cancelled = True  # its generation ends at the next token
            raise
        finally:
            self._in_flight -= 1
        usage = answer.get("usage") or {}
        choice = answer["choices"][0]
        text = choice["message"].get("content") or ""
        return ChatResponse(
            text=generation.cut(text.strip()),
            model=self.model.name,
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            cost_usd=0.0,
            finish_reason=choice.get("finish_reason"),
        )

    def _run_chat(self, chat: _Chat) -> dict[str, Any]:
        """One chat completion (in the model thread)."""
        messages, generation = chat.messages, chat.generation
        sampled = 0
        # Why the prompt is refused, where it leaves no room for max_tokens in the context.
        refused: list[RequestRejected] = []

        def watch(input_ids: Any, logits: Any) -> Any:
            # Called before each token is chosen: every call after the first means the
            # token chosen last was kept (an end-of-text token ends the answer instead).
            # At the first, ``input_ids`` is the whole prompt as llama.cpp tokenized it.
            nonlocal sampled
            if sampled:
                self.tokens.add(1)
            elif (refusal := self.context_refusal(len(input_ids), generation)) is not None:
                refused.append(refusal)
            sampled += 1
            if not chat.cancelled and not refused:
                return logits
            eos = self.llama.token_eos()
            if eos < 0:  # a model without end-of-text cannot be cut short
                return logits
            ended = np.full_like(logits, -np.inf)
            ended[eos] = 0.0
            return ended

        options: dict[str, Any] = {
            "max_tokens": generation.max_new_tokens,
            "temperature": generation.temperature,
            "top_p": generation.top_p,
        }
        if generation.greedy:
            options.update(temperature=0.0, top_k=1)
        if generation.seed is not None:
            options["seed"] = generation.seed
        if generation.stop:
            options["stop"] = list(generation.stop)
        options["logits_processor"] = self._logits_processors([watch])
        with self._lock:
            if self.state is EngineState.CLOSED:
                msg = "the llamacpp engine was closed while requests were waiting"
                raise EngineError(msg)
            self.llama.set_cache(self._states if self._in_flight > 1 else None)
            try:
                answer: dict[str, Any] = self.llama.create_chat_completion(
                    messages=messages, **options
                )
            except Exception as exc:
                too_long = _PROMPT_TOO_LONG.match(str(exc))
                if too_long is not None:
                    refusal = self.context_refusal(int(too_long.group(1)), generation)
                    if refusal is not None:
                        raise refusal from exc
                msg = f"llama.cpp failed to generate: {type(exc).__name__}: {exc}"
                raise EngineError(msg) from exc
        if refused:
            raise refused[0]
        completion = (answer.get("usage") or {}).get("completion_tokens") or 0
        self.tokens.add(max(0, completion - max(0, sampled - 1)), flush=True)
        return answer

    async def aclose(self) -> None:
        if self.state is not EngineState.CLOSED:
            # Chats still queued are cancelled, as a batcher's are; the one running ends
            # before the model is released.
            self._model_thread.stop()
        await super().aclose()

    def _release(self) -> None:
        llama = getattr(self, "llama", None)
        if llama is not None:
            with contextlib.suppress(Exception):
                llama.close()
        self.llama = None
