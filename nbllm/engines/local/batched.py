"""Local engines that generate token ids in batches: torch, onnx and deepspeed.

A subclass loads its model in ``_load`` and generates one batch in ``_generate`` (token
ids in, new token ids out). Gathering concurrent requests into those batches (the
``DynamicBatcher``, on one long-lived model thread) and halving a batch that runs out of
memory live here once. A subclass whose model can run on explicit keys and values hands a
``KVBackend`` to ``_batch_continuously`` instead: its requests then join a running batch
between tokens and reuse cached prefixes (``nbllm.engines.local.continuous``), and what
follows about batches applies to its static path only. A run keeps at most ``batch_size``
requests in flight (``max_in_flight``): more would only wait in the batcher's queue while
their timeouts run.

A request's prompt is tokenized in the model thread, when its batch starts, so that
tokenizing never holds up the event loop; a prompt that leaves no room for its
``max_tokens`` in the model's context is refused there (``RequestRejected``), alone, while
the rest of its batch generates.

``request.timeout`` bounds a request's wait in that queue, never its generation
(``nbllm.engines.local.base``). While a batch generates, ``_generate`` reports each step to
a ``BatchWatch``: the tokens it added (heard as the "generating" phase) and, in return,
which rows nobody waits for any more (their requests were cancelled), so that it drops them
and ends the batch once none is left.
"""

from __future__ import annotations

import asyncio
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

from nbllm.engines.base import EngineState
from nbllm.engines.local.base import Generation, LocalEngine
from nbllm.engines.local.batching import DynamicBatcher
from nbllm.engines.local.continuous import ContinuousBatcher
from nbllm.engines.local.kv_batch import Decoder, KVBackend, KVBatch
from nbllm.engines.local.memory import free_bytes, is_out_of_memory, memory_figures
from nbllm.engines.local.phases import PhaseCallback, TokenReport
from nbllm.engines.local.prefix_cache import PrefixCache, default_prefix_cache_bytes
from nbllm.errors import EngineError, RequestRejected
from nbllm.types import ChatRequest, ChatResponse, Message

__all__ = ["BatchWatch", "BatchedEngine"]


@dataclass(slots=True, eq=False)
class _Request:
    """One request in the batcher: its prompt, its sampling, and whether anyone waits for it."""

    #: Token ids; None until the model thread tokenizes ``messages``.
    prompt: list[int] | None
    generation: Generation
    #: Set on the loop when the request is cancelled; read by the model thread.
    cancelled: bool = False
    messages: Sequence[Message] = ()


#: What the batcher hands back for one request: its new token ids, or why it was refused.
_Output: TypeAlias = list[int] | RequestRejected


class BatchWatch:
    """One batch as it generates, seen from the model thread.

    ``_generate`` calls ``generated(n)`` after each step with the tokens it added (end-of-text
    tokens and dropped rows not counted) and reads ``dropped()`` to learn which rows nobody
    waits for any more.
    """

    def __init__(self, requests: Sequence[_Request], tokens: TokenReport) -> None:
        self._requests = requests
        self._tokens = tokens
        #: Tokens reported by ``generated`` so far.
        self.counted = 0

    def generated(self, tokens: int) -> None:
        self.counted += tokens
        self._tokens.add(tokens)

    def dropped(self) -> list[bool]:
        """Per row: True when its request was cancelled, so its answer is of no use."""
        return [request.cancelled for request in self._requests]


class BatchedEngine(LocalEngine):
    """A local model answering batches of concurrent requests gathered by a dynamic batcher.

    ``batch_size`` and ``batch_wait_s`` set the batcher; ``batch_size=1`` turns batching
    off. Requests whose sampling options differ never share a batch. An engine that can run
    its model on explicit keys and values calls ``_batch_continuously(backend)`` once loaded:
    its requests then go to the continuous batcher (``nbllm.engines.local.continuous``) and,
    with ``prefix_cache``, reuse recent prompts' keys and values.
    """

    #: Whether this engine can batch continuously (DeepSpeed's wrapped ``generate`` cannot).
    can_batch_continuously = True
    #: The prefix cache (None when off, or when batching statically).
    prefix: PrefixCache | None = None
    #: What the continuous batcher runs the model through (None when batching statically).
    backend: KVBackend | None = None

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
        super().__init__(
            model,
            batch_size=batch_size,
            batch_wait_s=batch_wait_s,
            device=device,
            on_phase=on_phase,
            continuous=continuous,
            prefix_cache=prefix_cache,
            prefix_cache_bytes=prefix_cache_bytes,
        )
        self.max_in_flight = self.batch_size
        self._batcher: DynamicBatcher[_Request, _Output] = DynamicBatcher(
            self._run_batch, max_batch_size=self.batch_size, max_wait_s=self.batch_wait_s
        )

    def _batch_continuously(self, backend: KVBackend) -> None:
        """From now on, batch continuously over ``backend`` (see the class)."""
        self.backend = backend
        if self.prefix_cache:
            size = self.prefix_cache_bytes
            self.prefix = PrefixCache(
                default_prefix_cache_bytes(free_bytes(self.device)) if size is None else size
            )
        self._batcher = ContinuousBatcher(  # type: ignore[assignment]
            decoder=Decoder(backend, self.prefix),
            new_batch=lambda: KVBatch(backend),
            eos_ids=self.eos_token_ids,
            refuse=lambda row: self.context_refusal(len(row.prompt), row.generation),
            lock=self._lock,
            closed=lambda: self.state is EngineState.CLOSED,
            report=self.tokens.add,
            max_rows=self.batch_size,
            free_memory=self._free_memory_now,
            name=self.name,
        )

    def _free_memory_now(self) -> None:
        """Out of memory: forget the prefix cache and hand cached blocks back."""
        if self.prefix is not None:
            self.prefix.clear()
        self._free_cached_memory()

    async def _complete_continuously(
        self, batcher: ContinuousBatcher, request: ChatRequest
    ) -> ChatResponse:
        generation = self.generation(request)
        self.tokens.loop = asyncio.get_running_loop()
        messages = request.messages
        row = await batcher.submit(
            lambda: self.encode(messages), generation, timeout=request.timeout
        )
        new_ids = self.strip_eos(row.generated)
        text, finish_reason = generation.finish(self.decode(new_ids), len(new_ids))
        return ChatResponse(
            text=text,
            model=self.model.name,
            prompt_tokens=len(row.prompt),
            completion_tokens=len(new_ids),
            cost_usd=0.0,
            finish_reason=finish_reason,
            cached_tokens=row.reused if self.prefix is not None else None,
        )

    @abstractmethod
    def _generate(
        self, prompts: Sequence[list[int]], generation: Generation, watch: BatchWatch
    ) -> list[list[int]]:
        """New token ids for each prompt (left to right, without padding or end-of-text).

        Reports each step to ``watch`` and stops generating the rows it says are dropped
        (their ids are then of no use); returns once every row is finished or dropped.
        """

    async def _complete(self, request: ChatRequest) -> ChatResponse:
        batcher = self._batcher
        if isinstance(batcher, ContinuousBatcher):
            return await self._complete_continuously(batcher, request)
        generation = self.generation(request)
        self.tokens.loop = asyncio.get_running_loop()
        waiting = _Request(None, generation, messages=request.messages)
        try:
            output = await self._batcher.submit(waiting, generation, timeout=request.timeout)
        except asyncio.CancelledError:
            # The model thread drops this row at its next step (set before the caller
            # can send anything again), so no generation runs on for an unread answer.
            waiting.cancelled = True
            raise
        if isinstance(output, RequestRejected):
            raise output
        new_ids = output
        text, finish_reason = generation.finish(self.decode(new_ids), len(new_ids))
        return ChatResponse(
            text=text,
            model=self.model.name,
            prompt_tokens=len(waiting.prompt or ()),
            completion_tokens=len(new_ids),
            cost_usd=0.0,
            finish_reason=finish_reason,
        )

    def _run_batch(self, items: Sequence[_Request]) -> list[_Output]:
        """Tokenize the prompts, refuse those the context cannot hold, generate the rest
        (in the batcher's thread)."""
        with self._lock:
            if self.state is EngineState.CLOSED:
                msg = f"the {self.name} engine was closed while requests were waiting"
                raise EngineError(msg)
            outputs: list[_Output | None] = [None] * len(items)
            ready: list[int] = []
            for index, item in enumerate(items):
                try:
                    if item.prompt is None:
                        item.prompt = self.encode(item.messages)
                except RequestRejected as exc:
                    outputs[index] = exc
                    continue
                outputs[index] = self.context_refusal(len(item.prompt), item.generation)
                if outputs[index] is None:
                    ready.append(index)
            if ready:
                generated = self._generate_halving([items[i] for i in ready])
                for index, ids in zip(ready, generated, strict=True):
                    outputs[index] = ids
        return [output for output in outputs if output is not None]

    def _generate_halving(self, items: Sequence[_Request]) -> list[list[int]]:
        """Generate one batch (holding the model lock); on out-of-memory, halve and retry."""
        generation = items[0].generation
        prompts = [item.prompt or [] for item in items]
        watch = BatchWatch(items, self.tokens)
        try:
            outputs = self._generate(prompts, generation, watch)
        except Exception as exc:
            if not is_out_of_memory(exc):
                if isinstance(exc, EngineError):
                    raise
                msg = f"{self.name} failed to generate: {type(exc).__name__}: {exc}"
                raise EngineError(msg) from exc
            self._free_cached_memory()
            if len(prompts) == 1:
                msg = (
                    f"{self.device} out of memory generating one answer of up to "
                    f"{generation.max_new_tokens} tokens for a {len(prompts[0])}-token "
                    f"prompt ({memory_figures()}); lower max_tokens or use a smaller model"
                )
                raise EngineError(msg) from exc
        else:
            # The steps' counts leave out what a backend cannot see per step; the
            # batch's own figure settles it (never lowering what was shown).
            generated = sum(
                len(ids) for ids, item in zip(outputs, items, strict=True) if not item.cancelled
            )
            self.tokens.add(max(0, generated - watch.counted), flush=True)
            return outputs
        half = len(items) // 2
        return self._generate_halving(items[:half]) + self._generate_halving(items[half:])

    async def aclose(self) -> None:
        if self.state is not EngineState.CLOSED:
            await self._batcher.aclose()
        await super().aclose()
        if self.prefix is not None:
            self.prefix.clear()


def pad_left(prompts: Sequence[list[int]], pad_id: int) -> tuple[list[list[int]], list[list[int]]]:
    """Left-padded ids and their attention mask, so every prompt ends where generation starts."""
    width = max(len(p) for p in prompts)
    ids = [[pad_id] * (width - len(p)) + list(p) for p in prompts]
    mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
    return ids, mask
