"""Continuous batching: requests join a running batch between any two tokens and leave it the
moment they end.

The static batcher (``nbllm.engines.local.batching``) runs a batch until its longest answer
ends, while new requests wait; with uneven answer lengths most of a batch's rows idle. Here
the model thread runs one loop for as long as anything is waiting or generating. At each
token it admits waiting requests (up to ``max_rows`` generating at once): each one's prompt
is tokenized and computed alone, reusing the longest cached prefix of earlier prompts
(``nbllm.engines.local.prefix_cache``), and joins the batch; then every row gets its next
token in one model call; a row that reached an end-of-text token or its ``max_tokens``, or
whose request was given up, is answered and leaves at once, and its keys and values go to
the prefix cache for the conversation's next turn.

Rows with different sampling options share the batch (each row is sampled on its own). As
with the static batcher, ``timeout`` bounds only a request's wait to be admitted, never its
generation, and a request given up is dropped at the next token.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nbllm.engines.local.batching import ModelThread, settle
from nbllm.engines.local.memory import is_out_of_memory, memory_figures
from nbllm.errors import EngineError, RequestRejected, RequestTimeout

if TYPE_CHECKING:
    from nbllm.engines.local.base import Generation
    from nbllm.engines.local.kv_batch import Decoder, KVBatch

__all__ = ["ContinuousBatcher", "Row"]


@dataclass(slots=True, eq=False)
class Row:
    """One request in the continuous batcher, from its wait to its last token."""

    tokenize: Callable[[], list[int]]
    generation: Generation
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Row]
    prompt: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    #: Prompt tokens taken from the prefix cache.
    reused: int = 0
    started: bool = False
    cancelled: bool = False
    generator: Any = None


class ContinuousBatcher:
    """Runs the loop of the module's docstring in a ``ModelThread`` of its own.

    The engine gives: ``decoder`` (prefill, sampling, the prefix cache), ``new_batch()``
    (an empty ``KVBatch``), ``eos_ids``, ``refuse(row)`` (a ``RequestRejected`` for a
    prompt the context cannot hold, or None), ``lock`` (held for each model call, so that
    the model is never released mid-call), ``closed()``, and ``report(tokens)`` for the
    tokens generated (``report(n, flush=...)``: flushed before an answer goes back),
    ``free_memory()`` after running out of memory, and its ``name``.

    Out of memory in a step with several rows, the newer half of them waits again and the
    batch keeps at most the older half from then on; with one row, or computing one prompt,
    that request fails with the memory figures.
    """

    def __init__(
        self,
        *,
        decoder: Decoder,
        new_batch: Callable[[], KVBatch],
        eos_ids: list[int],
        refuse: Callable[[Row], RequestRejected | None],
        lock: threading.Lock,
        closed: Callable[[], bool],
        report: Callable[..., None],
        max_rows: int,
        free_memory: Callable[[], None],
        name: str,
    ) -> None:
        self.decoder = decoder
        self.new_batch = new_batch
        self.eos_ids = frozenset(eos_ids)
        self.refuse = refuse
        self.lock = lock
        self.closed = closed
        self.report = report
        self.max_rows = max_rows
        self.free_memory = free_memory
        self.name = name
        self._waiting: list[Row] = []
        self._guard = threading.Lock()  # the waiting list and whether the loop runs
        self._running = False
        self._counted = 0  # tokens picked since the last report
        self._thread = ModelThread("local-model")
        #: Model steps run, the most rows one had, and the steps by their rows.
        self.batches_run = 0
        self.largest_batch = 0
        self.batch_sizes: collections.Counter[int] = collections.Counter()

    async def submit(
        self,
        tokenize: Callable[[], list[int]],
        generation: Generation,
        *,
        timeout: float | None = None,
    ) -> Row:
        """Queue a request (its prompt made by ``tokenize`` in the model thread) and wait
        for its last token; ``timeout`` bounds the wait to be admitted."""
        loop = asyncio.get_running_loop()
        row = Row(tokenize, generation, loop, loop.create_future())
        with self._guard:
            self._waiting.append(row)
            start = not self._running
            self._running = True
        if start:
            self._thread.call(self._serve, None)
        expiry = None
        if timeout is not None:
            expiry = loop.call_later(timeout, self._expire, row, timeout)
        try:
            return await row.future
        except asyncio.CancelledError:
            row.cancelled = True  # dropped at the next token
            with self._guard, contextlib.suppress(ValueError):
                self._waiting.remove(row)
            raise
        finally:
            if expiry is not None:
                expiry.cancel()

    def _expire(self, row: Row, timeout: float) -> None:
        with self._guard:
            if row.started or row not in self._waiting:
                return
            self._waiting.remove(row)
        msg = (
            f"the model was busy for the whole {timeout:g} s timeout and this request "
            "never started (a local generation that started is never timed out)"
        )
        if not row.future.done():
            row.future.set_exception(RequestTimeout(msg))

    # -- the model thread -------------------------------------------------------------

    def _admit(self, free: int) -> list[Row] | None:
        """Up to ``free`` waiting requests, now started; None when the loop should end
        (nothing waits and ``free`` says nothing generates)."""
        with self._guard:
            taken = self._waiting[:free]
            del self._waiting[:free]
            for row in taken:
                row.started = True
            if not taken and free == self.max_rows:
                self._running = False
                return None
        return taken

    def _serve(self, _: object) -> None:
        batch = self.new_batch()
        rows: list[Row] = []
        try:
            while True:
                admitted = self._admit(self.max_rows - len(rows))
                if admitted is None:
                    return
                with self.lock:
                    if self.closed():
                        msg = "the local engine was closed while requests were waiting"
                        raise EngineError(msg)
                    for row in admitted:
                        self._start(row, batch, rows)
                    if rows:
                        try:
                            self._step(batch, rows)
                        except Exception as exc:
                            if not is_out_of_memory(exc) or len(rows) == 1:
                                raise
                            self._shrink(batch, rows)

        except BaseException as exc:
            # Every request this loop holds or that waits fails with it; the next one
            # submitted starts a new loop.
            with self._guard:
                left, self._waiting = self._waiting, []
                self._running = False
            failure = exc
            if isinstance(exc, Exception) and not isinstance(exc, EngineError):
                failure = EngineError(f"{self.name} failed to generate: {_said(exc)}")
                failure.__cause__ = exc
            for row in rows + left:
                _answer(row, failure)

    def _shrink(self, batch: KVBatch, rows: list[Row]) -> None:
        """Out of memory with several rows: the newer half waits again, from its prompt, at
        the head of the queue, and the batch holds at most the older half from now on."""
        half = len(rows) // 2
        again = rows[half:]
        batch.keep(range(half))
        del rows[half:]
        for row in again:
            row.generated.clear()
            row.started = False
        self.max_rows = half
        self.free_memory()
        with self._guard:
            self._waiting[:0] = again

    def _start(self, row: Row, batch: KVBatch, rows: list[Row]) -> None:
        """Tokenize and compute a new request's prompt; it joins the batch unless its first
        token already ends it."""
        if row.cancelled:
            return
        try:
            row.prompt = row.tokenize()
        except RequestRejected as exc:
            _answer(row, exc)
            return
        refusal = self.refuse(row)
        if refusal is not None:
            _answer(row, refusal)
            return
        generation = row.generation
        if not generation.greedy:
            seed = generation.seed if generation.seed is not None else time.time_ns()
            row.generator = self.decoder.generator(seed)
        try:
            layers, scores, row.reused = self.decoder.prefill(row.prompt)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            self.free_memory()
            msg = (
                f"out of memory computing a {len(row.prompt)}-token prompt "
                f"({memory_figures()}); lower max_tokens or use a smaller model"
            )
            _answer(row, EngineError(msg))
            return
        if self._take(row, scores):
            self._report(flush=True)
            _answer(row, row)
            return
        batch.join(layers, len(row.prompt))
        rows.append(row)

    def _take(self, row: Row, scores: Any) -> bool:
        """Pick the row's next token from ``scores``; True when its answer has ended (an
        end-of-text token, which is not part of the answer, or ``max_tokens`` reached)."""
        generation = row.generation
        token = self.decoder.pick(scores, generation.temperature, generation.top_p, row.generator)
        row.generated.append(token)
        if token in self.eos_ids:
            return True
        self._counted += 1
        return len(row.generated) >= generation.max_new_tokens

    def _step(self, batch: KVBatch, rows: list[Row]) -> None:
        """One token for every row; the rows that ended (or were given up) leave."""
        scores = batch.step([row.generated[-1] for row in rows])
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, len(rows))
        self.batch_sizes[len(rows)] += 1
        kept: list[int] = []
        ended: list[Row] = []
        for index, row in enumerate(rows):
            if row.cancelled:
                continue
            if not self._take(row, scores[index]):
                kept.append(index)
                continue
            # The last token picked was never fed: the row holds the rest.
            held = row.prompt + row.generated[:-1]
            self.decoder.keep(held, batch.row(index))
            ended.append(row)
        if len(kept) < len(rows):
            batch.keep(kept)
            rows[:] = [rows[i] for i in kept]
        self._report(flush=bool(ended))
        for row in ended:
            _answer(row, row)

    def _report(self, *, flush: bool) -> None:
        """Tell the tokens picked since the last report; ``flush`` before an answer goes
        back, so that its tokens are counted by the time its caller reads them."""
        if self._counted or flush:
            self.report(self._counted, flush=flush)
            self._counted = 0

    async def aclose(self) -> None:
        """Stop the model thread once its loop ends; requests still waiting are cancelled."""
        with self._guard:
            left, self._waiting = self._waiting, []
        for row in left:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                row.loop.call_soon_threadsafe(row.future.cancel)
        self._thread.stop()


def _said(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _answer(row: Row, outcome: Row | BaseException) -> None:
    """Settle ``row``'s future on its own loop (from the model thread)."""
    failed = isinstance(outcome, BaseException)
    with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
        row.loop.call_soon_threadsafe(settle, row.future, outcome, failed)
