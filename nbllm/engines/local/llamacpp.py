"""The llama.cpp engine: a GGUF file run by ``llama-cpp-python``, the fast path on a CPU.

It reads the quantized weights as they are (no conversion) and renders the chat with
the template stored in the GGUF file. Its arithmetic on quantized weights differs from
the de-quantized float weights the other engines use, so its greedy answers can differ
from theirs (on the embedded model: most prompts agree, some do not). One llama.cpp
context answers one request at a time, so requests are queued in arrival order; the
speed comes from llama.cpp itself.
GPUs are left to the other engines (``auto`` skips this one where there is a GPU).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from nbllm.engines.base import EngineState
from nbllm.engines.local.base import Generation, LocalEngine, require
from nbllm.engines.local.batching import DynamicBatcher
from nbllm.errors import EngineError, EngineUnavailable
from nbllm.types import ChatRequest, ChatResponse, Message

__all__ = ["LlamaCppEngine"]

_Chat = tuple[list[Message], Generation]


class LlamaCppEngine(LocalEngine):
    """``llama_cpp.Llama.create_chat_completion`` on a GGUF file, one request at a time."""

    name = "llamacpp"
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
        # One request at a time: conversations then run one after another, each turn
        # continuing the context the last one left (no state to save or restore).
        self.max_in_flight = 1
        self._chats: DynamicBatcher[_Chat, dict[str, Any]] = DynamicBatcher(
            self._run_chats, max_batch_size=1, max_wait_s=0
        )

    def _generate(self, prompts: Sequence[list[int]], generation: Generation) -> list[list[int]]:
        msg = "llamacpp renders chats itself; requests go through complete()"
        raise NotImplementedError(msg)

    async def _complete(self, request: ChatRequest) -> ChatResponse:
        generation = Generation.from_params(request.params)
        self._in_flight += 1
        try:
            answer = await self._chats.submit((list(request.messages), generation))
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

    def _run_chats(self, chats: Sequence[_Chat]) -> list[dict[str, Any]]:
        messages, generation = chats[0]
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
                return [self.llama.create_chat_completion(messages=messages, **options)]
            except Exception as exc:
                msg = f"llama.cpp failed to generate: {type(exc).__name__}: {exc}"
                raise EngineError(msg) from exc

    async def aclose(self) -> None:
        if self.state is not EngineState.CLOSED:
            await self._chats.aclose()
        await super().aclose()

    def _release(self) -> None:
        llama = getattr(self, "llama", None)
        if llama is not None:
            with contextlib.suppress(Exception):
                llama.close()
        self.llama = None
