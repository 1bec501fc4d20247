"""``BatchEngine``: the engine seam over a provider's batch API.

The executor asks it as it asks any engine, one request per turn, and each conversation's
next turn is asked the moment its answer arrives; the engine gathers the requests that
arrive together (``GATHER_S`` after the last, at most ``GATHER_MAX_S`` after the first)
into one batch. So a run's first batch holds every conversation's turn 0, and when a
batch ends, the conversations it answered go on at once into the next batch, while
others still wait on theirs. A wave larger than the provider's limits (requests, bytes,
or ``max_requests``) is split; at most ``max_batches`` are in flight, and the rest wait.

Each batch is written to the ``BatchJournal`` (the run's checkpoint) the moment the
provider has created it, with its lines' fingerprints and who asked them. A re-run of
the same call asks the same requests again (its finished turns come from the checkpoint,
so the histories are the same): a request whose fingerprint is a line of a batch in the
journal waits on that batch (followed again, never created again), or takes its answer
at once where the batch was collected already.

A line that failed (the error file) or was left unanswered (an expired or cancelled
batch) fails its request with a retryable error, so the executor's retries send it in a
later batch; with ``fallback="live"`` the request is sent to ``live`` instead. A batch
the provider refused (a bad file, a quota) fails each of its requests with the
provider's message. ``cancel_batches()`` (a stop) cancels the batches in flight; the
answers they had are kept. Closing the engine (a kernel restart, an interrupt) leaves
them running: the next run collects them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from nbllm.engines.base import Engine
from nbllm.engines.batch.http import BatchClient
from nbllm.engines.batch.lines import (
    ASKING,
    BatchBudget,
    BatchInfo,
    BatchJournal,
    BatchLine,
    BatchRecord,
    custom_id,
)
from nbllm.engines.batch.prices import DEFAULT_MAX_OUTPUT, Prices
from nbllm.engines.local.batching import settle
from nbllm.errors import EngineError, RequestRejected, RetryableError, ServerError
from nbllm.images import prompt_tokens
from nbllm.types import ChatRequest, ChatResponse

__all__ = ["GATHER_MAX_S", "GATHER_S", "BatchEngine", "BatchUpdate"]

log = logging.getLogger("nbllm")

#: Seconds a batch waits for more requests after the last one arrived, and at most after
#: the first: the next turns of the conversations a batch answered arrive within these.
GATHER_S = 0.25
GATHER_MAX_S = 5.0
#: Tries to read an ended batch's answers before its requests fail (and are asked again).
_READ_TRIES = 5


@dataclass(frozen=True, slots=True)
class BatchUpdate:
    """What the live view shows of a batch: the provider's report and the requests of this
    run still waiting on it."""

    api: str
    info: BatchInfo
    waiting: int


@dataclass(eq=False)
class _Ask:
    fingerprint: str
    body: dict[str, Any]
    future: asyncio.Future[ChatResponse]
    asking: tuple[str, int] | None
    prompt_tokens: int  # its messages' estimate, for a budget's worst case


@dataclass(eq=False)
class _Batch:
    record: BatchRecord
    waiters: dict[str, asyncio.Future[ChatResponse]] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    held: tuple[float, int] = (0.0, 0)  # the budget's hold: worst-case dollars, tokens


class BatchEngine(Engine):
    """Answers requests through ``client``'s batch API (see the module)."""

    bounds_own_timeout = True  # a batch has its own window; no per-request timer applies

    def __init__(
        self,
        client: BatchClient,
        *,
        live: Engine | None = None,
        fallback: str = "batch",
        max_batches: int = 4,
        max_requests: int | None = None,
        poll_s: float = 30.0,
        prices: Prices | None = None,
    ) -> None:
        super().__init__()
        self.client = client
        self.name = f"{client.api} batch"
        self.live = live
        self.fallback = fallback
        self.max_batches = max_batches
        self.max_requests = min(max_requests or client.max_requests, client.max_requests)
        self.poll_s = poll_s
        self.prices = prices
        self.journal: BatchJournal | None = None
        self.budget: BatchBudget | None = None
        self.on_update: Callable[[BatchUpdate], None] | None = None
        self._waiting: deque[_Ask] = deque()
        self._open: dict[str, _Batch] = {}
        self._known: dict[str, deque[tuple[str, str]]] = defaultdict(deque)
        self._answers: dict[str, ChatResponse] = {}  # collected, asked by nobody yet
        self._failed: set[str] = set()  # fingerprints a batch did not answer
        self._timer: asyncio.TimerHandle | None = None
        self._first_wait: float | None = None
        self._started = False
        self._stopped = False
        self._cancelled: set[str] = set()  # batches asked to cancel
        self._made = 0  # lines made, for unique custom ids

    def __repr__(self) -> str:
        return f"BatchEngine(api={self.client.api!r}, api_base={self.client.where!r})"

    def describe(self) -> str:
        return f"{self.client.api} batch API @ {self.client.where}"

    def identity(self) -> str:
        # The same model at the same place answers alike live or in a batch: a run started
        # live and run again with batch_api=True resumes from the same checkpoint.
        return self.live.identity() if self.live is not None else self.describe()

    def secrets(self) -> tuple[str, ...]:
        return (*self.client.secrets(), *(self.live.secrets() if self.live else ()))

    def attach(
        self,
        journal: BatchJournal | None,
        on_update: Callable[[BatchUpdate], None] | None,
        budget: BatchBudget | None = None,
    ) -> None:
        """Where batches are recorded (None: nowhere, no re-attaching), who hears of them,
        and the run's cap, which holds each batch's worst case before it is created."""
        self.journal = journal
        self.on_update = on_update
        self.budget = budget

    # -- asking ---------------------------------------------------------------------

    async def _complete(self, request: ChatRequest) -> ChatResponse:
        body = self.client.body(request)
        fingerprint = self.client.fingerprint(body)
        self._start()
        answer = self._answers.pop(fingerprint, None) or self._stored(fingerprint)
        if answer is not None:
            return answer
        if self.fallback == "live" and self.live is not None and fingerprint in self._failed:
            return await self.live.complete(request)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ChatResponse] = loop.create_future()
        known = self._known.get(fingerprint)
        if known:
            batch_id, custom_id = known.popleft()
            self._open[batch_id].waiters[custom_id] = future
        else:
            if self._stopped:
                msg = "not sent: the run's batches were cancelled"
                raise ServerError(msg)
            estimate = prompt_tokens(request.messages) if self.budget is not None else 0
            self._waiting.append(_Ask(fingerprint, body, future, ASKING.get(), estimate))
            self._schedule(loop)
        return await future

    def _stored(self, fingerprint: str) -> ChatResponse | None:
        text = self.journal.answer(fingerprint) if self.journal is not None else None
        return None if text is None else ChatResponse(**json.loads(text))

    def _start(self) -> None:
        """Follow the journal's open batches again (once, on the run's loop)."""
        if self._started:
            return
        self._started = True
        for record in self.journal.open_batches() if self.journal is not None else ():
            batch = _Batch(record)
            self._open[record.id] = batch
            for line in record.lines:
                self._known[line.fingerprint].append((record.id, line.custom_id))
            batch.task = asyncio.get_running_loop().create_task(self._follow(batch, None))

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        if self._first_wait is None:
            self._first_wait = now
        if self._timer is not None:
            self._timer.cancel()
        wait = min(GATHER_S, self._first_wait + GATHER_MAX_S - now)
        self._timer = loop.call_later(max(0.0, wait), self._flush)

    def _flush(self) -> None:
        """Make batches of the waiting requests, as many as the cap lets."""
        self._timer = None
        loop = asyncio.get_running_loop()
        while self._waiting and len(self._open) < self.max_batches and not self._stopped:
            asks: list[_Ask] = []
            ids: list[str] = []
            lines: list[bytes] = []
            size = 0
            while self._waiting and len(asks) < self.max_requests:
                ask = self._waiting[0]
                if ask.future.done():  # its asker has gone
                    self._waiting.popleft()
                    continue
                line_id = custom_id(ask.fingerprint, self._made)
                line = self.client.line(line_id, ask.body)
                if asks and size + len(line) + 1 > self.client.max_bytes:
                    break
                self._made += 1
                self._waiting.popleft()
                asks.append(ask)
                ids.append(line_id)
                lines.append(line)
                size += len(line) + 1
            if not asks:
                break
            fits, held = self._hold(asks)
            if fits < len(asks):  # the budget stops the run: the rest is never sent
                self._stopped = True
                for ask in [*asks[fits:], *self._waiting]:
                    _settle(ask.future, ServerError("not sent: the run's budget is spent"))
                self._waiting.clear()
                del asks[fits:], ids[fits:], lines[fits:]
            if not asks:
                return
            batch = _Batch(BatchRecord("", self.client.api, time.time(), None, None, ()))
            self._open[f"pending-{id(batch)}"] = batch  # counts against the cap at once
            batch.held = held
            batch.task = loop.create_task(self._create(batch, asks, ids, lines))
        self._first_wait = loop.time() if self._waiting else None

    def _hold(self, asks: list[_Ask]) -> tuple[int, tuple[float, int]]:
        """How many of ``asks`` the run's budget lets go, their worst case held there."""
        if self.budget is None:
            return len(asks), (0.0, 0)
        return self.budget.fit([self._worst(ask) for ask in asks])

    def _worst(self, ask: _Ask) -> tuple[float | None, int]:
        """A request's worst case: its prompt (``nbllm.images.prompt_tokens``) and all the
        answer tokens it may take, at the batch price where known."""
        prompt = ask.prompt_tokens
        answer = ask.body.get("max_tokens") or ask.body.get("max_completion_tokens")
        if not isinstance(answer, int):
            answer = self.prices.max_output if self.prices is not None else DEFAULT_MAX_OUTPUT
        cost = self.prices.of(prompt, answer)[0] if self.prices is not None else None
        return cost, prompt + answer

    async def _create(
        self, batch: _Batch, asks: list[_Ask], ids: list[str], lines: list[bytes]
    ) -> None:
        placeholder = f"pending-{id(batch)}"
        try:
            info = await self.client.create(lines)
        except EngineError as error:
            del self._open[placeholder]
            if self.budget is not None:
                self.budget.release(*batch.held)
            for ask in asks:
                _settle(ask.future, error)
            self._flush_soon()
            return
        record = BatchRecord(
            info.id, self.client.api, info.created_at or time.time(), info.expires_at,
            info.input_file_id,
            tuple(
                BatchLine(i, a.fingerprint, *(a.asking or (None, None)))
                for i, a in zip(ids, asks, strict=True)
            ),
            info.status,
        )  # fmt: skip
        batch.record = record
        batch.waiters = {i: a.future for i, a in zip(ids, asks, strict=True)}
        del self._open[placeholder]
        self._open[info.id] = batch
        if self.journal is not None:
            self.journal.created(record)  # committed: a kill from here on re-attaches
        await self._follow(batch, info)

    # -- following a batch ----------------------------------------------------------

    async def _follow(self, batch: _Batch, info: BatchInfo | None) -> None:
        batch_id = batch.record.id
        try:
            while info is None or not info.ended:
                if info is not None:
                    self._report(batch, info)
                    await asyncio.sleep(self.poll_s)
                try:
                    latest = await self.client.retrieve(batch_id)
                except RetryableError as error:
                    log.warning("nbllm: could not poll batch %s (%s); again later", batch_id, error)
                    if info is None:
                        await asyncio.sleep(self.poll_s)
                    continue
                if self.journal is not None and (info is None or latest.status != info.status):
                    self.journal.updated(batch_id, latest.status)
                info = latest
            self._report(batch, info)
            await self._collect(batch, info)
        except EngineError as error:  # the provider refused a poll: the batch is lost to us
            log.warning("nbllm: batch %s cannot be followed: %s", batch_id, error)
            if self.journal is not None:
                self.journal.collected(batch_id, "lost", {})  # its requests are asked again
            self._failed.update(line.fingerprint for line in batch.record.lines)
            self._forget(batch)
            for future in batch.waiters.values():
                _settle(future, error)
        finally:
            self._open.pop(batch_id, None)
            if self.budget is not None and batch.held != (0.0, 0):
                self.budget.release(*batch.held)
            self._flush_soon()

    async def _collect(self, batch: _Batch, info: BatchInfo) -> None:
        results: dict[str, ChatResponse | EngineError] = {}
        if info.status == "failed":
            refused = RequestRejected(f"batch {info.id} failed: {info.error or 'no reason given'}")
        else:
            refused = None
            for attempt in range(_READ_TRIES):
                try:
                    results = await self.client.results(info)
                    break
                except RetryableError:
                    if attempt == _READ_TRIES - 1:
                        raise
                    await asyncio.sleep(self.poll_s)
        unanswered = ServerError(
            f"batch {info.id} ended {info.status} before this request was answered"
        )
        answers: dict[str, str] = {}
        delivered: list[tuple[BatchLine, ChatResponse | EngineError]] = []
        for line in batch.record.lines:
            result = results.get(line.custom_id, refused or unanswered)
            if isinstance(result, ChatResponse):
                result = self._priced(result)
                answers[line.fingerprint] = json.dumps(_fields(result))
            else:
                self._failed.add(line.fingerprint)
            delivered.append((line, result))
        if self.journal is not None:
            self.journal.collected(info.id, info.status, answers)
        for line, result in delivered:
            future = batch.waiters.get(line.custom_id)
            if future is not None and not future.done():
                _settle(future, result)
            elif isinstance(result, ChatResponse):
                self._answers[line.fingerprint] = result  # for an asker still to come
        self._forget(batch)

    def _forget(self, batch: _Batch) -> None:
        """A batch collected (or lost): requests no longer wait on its lines, even those of a
        re-attached batch that no request of this run asked for."""
        for line in batch.record.lines:
            known = self._known.get(line.fingerprint)
            if known and (batch.record.id, line.custom_id) in known:
                known.remove((batch.record.id, line.custom_id))

    def _priced(self, response: ChatResponse) -> ChatResponse:
        if self.prices is None:
            return response
        cost, saved = self.prices.of(response.prompt_tokens, response.completion_tokens)
        return replace(response, cost_usd=cost, saved_usd=saved)

    def _report(self, batch: _Batch, info: BatchInfo) -> None:
        if self.on_update is not None:
            waiting = sum(not f.done() for f in batch.waiters.values())
            self.on_update(BatchUpdate(self.client.api, info, waiting))

    def _flush_soon(self) -> None:
        if self._waiting and not self._stopped:
            asyncio.get_running_loop().call_soon(self._flush)

    # -- stopping -------------------------------------------------------------------

    async def cancel_batches(self) -> int:
        """Cancel every batch in flight and send no new one; the answers they had are
        collected as they end. Returns how many were asked to cancel."""
        self._stopped = True
        for ask in self._waiting:
            _settle(ask.future, ServerError("not sent: the run's batches were cancelled"))
        self._waiting.clear()
        asked = 0
        for batch_id in [b for b in self._open if not b.startswith("pending-")]:
            try:
                self._cancelled.add(batch_id)
                await self.client.cancel(batch_id)
                asked += 1
            except EngineError as error:  # ended meanwhile, or the provider refuses
                log.warning("nbllm: could not cancel batch %s: %s", batch_id, error)
        return asked

    def pending(self) -> dict[tuple[str, int], str]:
        """The batch each asked (conversation, turn) waits on, for batches not yet collected."""
        return {
            (line.conversation, line.turn): batch_id
            for batch_id, batch in self._open.items()
            if batch_id not in self._cancelled
            for line in batch.record.lines
            if line.conversation is not None and line.turn is not None
        }

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        tasks = [b.task for b in self._open.values() if b.task is not None]
        for task in tasks:
            task.cancel()  # the batches go on at the provider: the next run collects them
        await asyncio.gather(*tasks, return_exceptions=True)
        self._open.clear()
        await self.client.aclose()
        if self.live is not None:
            await self.live.aclose()
        await super().aclose()


def _settle(future: asyncio.Future[ChatResponse], result: ChatResponse | EngineError) -> None:
    settle(future, result, isinstance(result, EngineError))


def _fields(response: ChatResponse) -> dict[str, Any]:
    keep = (
        "text", "model", "prompt_tokens", "completion_tokens", "cost_usd", "finish_reason",
        "cached_tokens", "engine", "saved_usd",
    )  # fmt: skip
    return {name: getattr(response, name) for name in keep}
