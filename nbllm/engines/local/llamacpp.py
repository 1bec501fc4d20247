"""The llama.cpp engine: a GGUF file run by ``llama-cpp-python``, the fast path on a CPU.

It reads the quantized weights as they are (no conversion) and renders the chat with
the template stored in the GGUF file. Its arithmetic on quantized weights differs from
the de-quantized float weights the other engines use, so its greedy answers can differ
from theirs (on the embedded model: most prompts agree, some do not). One llama.cpp
context answers one request at a time, so requests queue in arrival order for its one
long-lived model thread (no batcher); the speed comes from llama.cpp itself.
GPUs are left to the other engines (``auto`` skips this one where there is a GPU).
"""

from __future__ import annotations

import contextlib
from typing import Any

from nbllm.engines.base import EngineState
from nbllm.engines.local.base import Generation, LocalEngine, require
from nbllm.engines.local.batching import ModelThread
from nbllm.errors import EngineError, EngineUnavailable
from nbllm.types import ChatRequest, ChatResponse, Message

__all__ = ["LlamaCppEngine"]

_Chat = tuple[list[Message], Generation]


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
        self._in_flight = 0
        # ggml sets up its thread pool once per thread: every call runs on this one.
        self._model_thread = ModelThread("llamacpp-model")

    async def _complete(self, request: ChatRequest) -> ChatResponse:
        generation = Generation.from_params(request.params)
        self._in_flight += 1
        try:
            answer = await self._model_thread.call(
                self._run_chat, (list(request.messages), generation)
            )
        finally:
            self._in_flight -= 1
        usage = answer.get("usage") or {}
        text = answer["choices"][0]["message"].get("content") or ""
        return ChatResponse(
            text=generation.cut(text.strip()),
            model=self.model.name,
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            cost_usd=0.0,
        )

    def _run_chat(self, chat: _Chat) -> dict[str, Any]:
        """One chat completion (in the model thread)."""
        messages, generation = chat
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
                msg = f"llama.cpp failed to generate: {type(exc).__name__}: {exc}"
                raise EngineError(msg) from exc
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
