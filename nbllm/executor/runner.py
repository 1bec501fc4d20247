"""The executor: conversations in, one ``TurnRecord`` per turn out.

Each conversation is a chain of turns run by one worker; turn k+1 is sent the moment
turn k's answer arrives, never after a barrier across conversations. Workers take
conversations longest first and take the next one as soon as they finish.

There are more conversations in progress (``max_conversations``, by default
``CONVERSATIONS_PER_SLOT`` x ``concurrency``) than request slots, so a freed slot always
finds a turn ready to go. It goes to the turn of the conversation with the most turns
left (then the longest conversation, then the first to ask): the longest chains never
wait behind short ones, so they do not end up running alone at the end of a run while
slots stand empty. A request passes through a chain of single-concern steps::

    _turn      retries: backoff with jitter, Retry-After, never 4xx; after a deployment's
               own failure, at once on another deployment
    _attempt   a request slot (``concurrency``, by priority); then ``Lanes.admit``: the
               deployment (nbllm's router, breakers), its slot, its pause, its budgets
    Lane.send  the engine call under the per-request timeout

A failure ends only its own conversation: its later turns are marked as skipped.

Stopping keeps every answer that arrived. ``stop()`` the first time sends nothing new and
lets the requests in flight finish for up to ``stop_grace_s`` seconds; a second
``stop()``, or the grace running out, cancels what is still in flight. Cancelling the
run's task cancels at once. Either way an answer that has arrived is recorded (and
checkpointed) before the worker that asked for it can be cancelled: each request is
sent as its own task, so a cancel can only cut a request short, never drop its answer.
Turns that never ran carry a "not run" error.

When the first attempts all fail to connect (refused, DNS, TLS) on every deployment,
retrying cannot help: the run stops with ``stop_reason`` "cannot reach <url>: <why>".
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from nbllm.engines.base import Engine
from nbllm.engines.batch.engine import BatchEngine
from nbllm.errors import EngineError
from nbllm.executor.arguments import check_seconds, check_whole
from nbllm.executor.batch_runs import attach_batches, pending_rows
from nbllm.executor.budget import Budget
from nbllm.executor.cache import KeyChain, ResponseCache
from nbllm.executor.checkpoint import CheckpointStore
from nbllm.executor.ensemble import Ensembles, Member, check_ensemble, members
from nbllm.executor.events import (
    Alert,
    AttemptFinished,
    Event,
    EventBus,
    RequestSent,
    RetryScheduled,
    RunFinished,
    RunStarted,
    TurnFinished,
)
from nbllm.executor.lanes import (
    Attempts,
    Lanes,
    NoDeployment,
    Routes,
)
from nbllm.executor.limiter import estimate_tokens
from nbllm.executor.limits import AUTO_CONCURRENCY, RunLimits
from nbllm.executor.redis_link import check
from nbllm.executor.rows import answered, cached, complete, reparsed, unanswered, user
from nbllm.executor.sending import WORKER, Sending
from nbllm.executor.stopping import Stopping
from nbllm.executor.timing import time_split
from nbllm.executor.unreachable import unreachable_reason
from nbllm.parsing import Parser
from nbllm.redact import redact, secret_values
from nbllm.results import RunResult, Scorer
from nbllm.results_models import EnsembleTotals
from nbllm.retry import RetryPolicy
from nbllm.types import NOT_RUN, SKIPPED, Conversation, TurnRecord

__all__ = ["CONVERSATIONS_PER_SLOT", "Executor"]

#: Default conversations in progress per request slot: enough choice for a freed slot
#: that more gains nothing (benchmarks/multi_turn_wall.py, 40 seeds, wall / lower bound:
#: 1x 1.120, 2x 1.109, 4x 1.106, all at once 1.105), while each one holds its history.
CONVERSATIONS_PER_SLOT = 4

STOPPED = f"{NOT_RUN}: the run was stopped before this turn finished"
# Attempts that must all fail to connect, with none reaching the server, before a run
# gives up: enough that one unlucky connection does not end a run.
UNREACHABLE_AFTER = 3


class Executor(Stopping, Ensembles, Sending):
    """Runs conversations against one engine, or the deployments of ``routes`` (then
    ``engine`` is None and ``model`` names the group), with caps, limits and retries.
    ``models``: several models, each (name, engine or routes); every conversation is
    asked of each (``model`` names them all), or with ``ensemble`` ("first", "vote") each
    turn is asked of all and one answer kept (see ``nbllm.executor.ensemble``); then
    ``concurrency`` (a number) is each model's: the run has that many slots per model.

    ``concurrency`` caps requests in flight ("auto": found while running, from 429s);
    ``max_conversations`` caps conversations
    in progress (default: ``CONVERSATIONS_PER_SLOT`` x ``concurrency``; a value given is
    obeyed exactly). A freed request slot goes to the conversation with the most turns
    left. ``rpm`` / ``tpm``: no minute ever holds more requests / tokens than these (each
    deployment's own where it sets them). ``timeout``: seconds per request attempt.
    ``rate_window_s``: the length in seconds of the "minute" of ``rpm`` / ``tpm``; tests
    and benchmarks shorten it so that a limit binds within seconds. ``stop_grace_s``:
    after a first ``stop()``, how long requests in flight may take to finish.
    """

    def __init__(
        self,
        engine: Engine | None,
        *,
        model: str,
        concurrency: int | str = 32,
        max_conversations: int | None = None,
        rpm: float | str | None = None,
        tpm: float | str | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        system: str | None = None,
        params: Mapping[str, Any] | None = None,
        listeners: Iterable[Callable[[Event], None]] = (),
        checkpoint: CheckpointStore | None = None,
        cache: ResponseCache | None = None,
        rate_window_s: float = 60.0,
        stop_grace_s: float = 10.0,
        budget: Budget | None = None,
        redis_url: str | None = None,
        max_rpm: float | None = None,
        max_tpm: float | None = None,
        routes: Routes | None = None,
        parser: Parser | None = None,
        parse_retries: int = 2,
        score: tuple[str, Scorer] | None = None,
        models: Sequence[tuple[str, Engine | Routes]] = (),
        ensemble: str | None = None,
        alerts: Sequence[Alert] | None = None,
    ) -> None:
        if concurrency != "auto":
            check_whole("concurrency", concurrency)
        if max_conversations is not None:
            check_whole("max_conversations", max_conversations)
        check_seconds("timeout", timeout, none=True)
        check_seconds("stop_grace_s", stop_grace_s, zero=True)
        check_seconds("rate_window_s", rate_window_s)
        sends_to = engine if engine is not None else routes
        targets = list(models) or ([(model, sends_to)] if sends_to is not None else [])
        if not targets:
            msg = "Executor needs an engine, routes= (a deployment list) or models="
            raise TypeError(msg)
        check_ensemble(ensemble, len(targets))
        self.engine = engine
        self.routes = routes
        self.model = model
        self.concurrency = concurrency
        most = AUTO_CONCURRENCY["ceiling"] if concurrency == "auto" else concurrency
        # With several models, concurrency is each model's (side by side, in conversations).
        self._slot_count = concurrency if concurrency == "auto" else concurrency * len(targets)
        each = 1 if ensemble else len(targets)
        self.max_conversations = max_conversations or CONVERSATIONS_PER_SLOT * int(most) * each
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.system = system
        self.parser = parser
        self.parse_retries = parse_retries
        self.score = score  # score=: (metric name, row scorer)
        # What answers depend on: the run's parameters over those the group's deployments set.
        self.params = {**(routes.params if routes is not None else {}), **(params or {})}
        self.checkpoint = checkpoint
        self.cache = cache
        self.budget = budget
        self._reuse_cached = cache is not None and cache.reusable(self.params)
        self._events = EventBus(listeners)
        self.redis_url = redis_url
        limits: dict[str, Any] = {"rpm": rpm, "tpm": tpm, "max_rpm": max_rpm, "max_tpm": max_tpm}

        def run_limits(deployment: str, own: dict[str, Any]) -> RunLimits:
            given = {k: v if own.get(k) is None else own[k] for k, v in limits.items()}
            return RunLimits(
                given["rpm"], given["tpm"], rate_window_s, max_rpm=given["max_rpm"],
                max_tpm=given["max_tpm"], redis_url=redis_url, deployment=deployment,
                emit=self._emit,
            )  # fmt: skip

        self.members = members(
            targets, dict(params or {}), timeout, run_limits, self._emit, cache is not None
        )
        self.ensemble = ensemble
        self.alerts = alerts  # alerts=: the list the run's alert watcher fills, for the result
        self._withdrawing: set[asyncio.Task[Any]] = set()
        self._ensemble_totals: EnsembleTotals | None = None
        self._turn_parsers: dict[int, Parser | None] = {}  # by id of a turn's response_format
        parts = [m.lanes for m in self.members]
        self.lanes = Lanes.joined(parts) if len(parts) > 1 else parts[0]
        self.limits = self.lanes.lanes[0].limits  # the only lane's, for a single engine
        self._tpm = any(lane.limits.tpm is not None for lane in self.lanes.lanes)
        names = dict.fromkeys(to.name if isinstance(to, Engine) else "router" for _, to in targets)
        self._engine_name = ", ".join(names)
        self._wants_sent = self._events.wants(RequestSent)
        self._wants_attempt = self._events.wants(AttemptFinished)
        self._wants_retry = self._events.wants(RetryScheduled)
        self._wants_finished = self._events.wants(TurnFinished)
        self.stop_grace_s = stop_grace_s
        self._stopping = False
        self._stops_asked = 0
        self._running = False
        self._stop_loop: asyncio.AbstractEventLoop | None = None  # the running batch's
        self._batch_engines: list[BatchEngine] = []  # batch_api=True: what a stop cancels

    async def run(self, conversations: Sequence[Conversation]) -> RunResult:
        """Run every conversation; rows come back in input order, whatever finished first."""
        if self._running:
            msg = "this Executor is already running; create another for a second run"
            raise RuntimeError(msg)
        if self.redis_url is not None:
            await check(self.redis_url)  # before any request: ConfigError if unreachable
        self._running = True
        self._stopping = self._stops_asked > 0  # a stop() before the run stops it at once
        engines = [lane.engine for lane in self.lanes.lanes]
        self._batch_engines = attach_batches(
            engines, self.checkpoint, self._emit, self.budget, self._stop_for
        )
        try:
            return await self._run(conversations)
        finally:
            self._running = False
            self._stop_loop = None
            self._stops_asked = 0
            await self.lanes.aclose()

    async def _run(self, conversations: Sequence[Conversation]) -> RunResult:
        # Side by side, each (conversation, model) is a conversation of its own.
        each = 1 if len(self.members) == 1 or self.ensemble else len(self.members)
        conversations = [conv for conv in conversations for _ in range(each)]
        self._member_of = [[i % each] for i in range(len(conversations))]
        if self.ensemble:
            self._member_of = [list(range(len(self.members)))] * len(conversations)
            self._ensemble_totals = EnsembleTotals([m.name for m in self.members])
        self._conversations = conversations
        self._offsets = []
        total = 0
        for conv in conversations:
            self._offsets.append(total)
            total += len(conv)
        self._records: list[TurnRecord | None] = [None] * total
        self._slots = self.lanes.request_slots(self._slot_count, self._emit)
        self._in_flight = 0
        self._sending: dict[asyncio.Task[Any], int] = {}  # workers awaiting answers
        self._workers: list[asyncio.Task[None]] = []
        self._grace: asyncio.TimerHandle | None = None
        self._stop_reason: str | None = None
        self._reached = False  # some attempt got an answer (even an error) from the engine
        self._stop_announced = False
        self._finished_run = False
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stop_loop = loop
        self._done = self.checkpoint.done(conversations) if self.checkpoint is not None else {}
        if self.budget is not None:
            self.budget.count_stored(self._done.values())

        started_at = time.time()
        t0 = time.perf_counter()
        self._emit(
            RunStarted(
                len(conversations),
                total,
                self.model,
                self._engine_name,
                started_at,
                resumed=len(self._done),
                score=self.score,
            )
        )
        order = sorted(range(len(conversations)), key=lambda i: -len(conversations[i]))
        queue = collections.deque(order)
        n_workers = min(self.max_conversations, len(conversations))
        workers = [loop.create_task(self._worker(queue)) for _ in range(n_workers)]
        self._workers = workers
        if self._stopping:
            self._on_stop()
        interrupted = False
        try:
            # A worker cancelled by a stop ends cleanly; only a cancel of this task raises.
            ended = await asyncio.gather(*workers, return_exceptions=True)
            for outcome in ended:
                if isinstance(outcome, Exception):
                    raise outcome
        except asyncio.CancelledError:
            # A cancelled task (``await arun`` cancelled): cancel at once, keep what arrived.
            interrupted = True
            self._stopping = True
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        finally:
            self._finished_run = True
            if self._grace is not None:
                self._grace.cancel()
        wall = time.perf_counter() - t0
        unfinished = any(r is None for r in self._records)
        interrupted = interrupted or (self._stopping and self._stop_reason is None and unfinished)
        why = STOPPED if self._stop_reason is None else f"{NOT_RUN}: {self._stop_reason}"
        rows = complete(self._conversations, self._offsets, self._records, self._done, why)
        result = RunResult(
            pending_rows(rows, self._batch_engines) if self._batch_engines else rows,
            conversations=len(conversations),
            wall_s=wall,
            started_at=started_at,
            interrupted=interrupted,
            model=self.model,
            engine=self._engine_name,
            stop_reason=self._stop_reason,
            deployments=self.lanes.figures(),
            limit_history=self.lanes.limit_history(),
            score=self.score,
            models=[m.name for m in self.members] if len(self.members) > 1 else (),
            ensemble=self._ensemble_totals.figures() if self._ensemble_totals else None,
            alerts=self.alerts or (),
        )
        # The summary's own counts (computed once, kept by the result), so they agree.
        summary = result.summary
        self._emit(
            RunFinished(
                summary.turns_ok,
                summary.turns_failed,
                wall,
                interrupted,
                time.time(),
                stop_reason=self._stop_reason,
            )
        )
        return result

    # -- conversations -------------------------------------------------------------

    async def _worker(self, queue: collections.deque[int]) -> None:
        WORKER.set(asyncio.current_task())  # its ensemble members' tasks inherit it
        try:
            while queue and not self._stopping:
                await self._conversation(queue.popleft())
        except asyncio.CancelledError:
            # A stop: every answer that arrived is recorded already (see _attempt).
            self._stopping = True

    async def _conversation(self, index: int) -> None:
        conv = self._conversations[index]
        base = self._offsets[index]
        answers: list[str] = []
        keys: list[KeyChain | None] = []
        for m in self._member_of[index]:
            chain = None
            if self.cache is not None:
                member = self.members[m]
                chain = KeyChain(member.name, self.params, member.scope)
                for message in conv.start_messages(self.system):
                    chain.extend(message)
            keys.append(chain)
        for k in range(len(conv)):
            stored = self._done.get((index, k))
            answer: str | None
            if stored is not None:
                self._finish(index, base + k, reparsed(stored, self._parser_for(conv, k)))
                answer = stored.answer or ""
            else:
                if self._stopping:
                    return
                answer = await self._run_turn(index, base, conv, k, answers, keys)
                if answer is None:
                    return
            answers.append(answer)
            for chain in keys:
                if chain is not None:
                    chain.extend(conv.user_message(k))
                    chain.extend({"role": "assistant", "content": answer})

    async def _run_turn(
        self,
        index: int,
        base: int,
        conv: Conversation,
        k: int,
        answers: Sequence[str],
        keys: Sequence[KeyChain | None],
    ) -> str | None:
        """Turn k of a conversation; its answer, or None when the conversation ends here."""
        if self.ensemble:
            record = await self._ensemble_turn(conv, k, answers, keys)
        else:
            member = self.members[self._member_of[index][0]]
            record = await self._answer(member, conv, k, answers, keys[0])
        if record is None:
            return None  # stopped before this turn was sent
        self._finish(index, base + k, record)
        if record.ok and self.checkpoint is not None:
            self.checkpoint.record(index, record)
        if not record.ok:
            reason = f"{SKIPPED}: turn {k} failed"
            for j in range(k + 1, len(conv)):
                self._finish(index, base + j, unanswered(conv, j, reason))
        return record.answer if record.ok else None

    def _finish(self, index: int, slot: int, record: TurnRecord) -> None:
        self._records[slot] = record
        if self._wants_finished:
            last = record.turn == len(self._conversations[index]) - 1
            self._emit(TurnFinished(record, self._in_flight, time.time(), last))

    # -- one turn: retries, then each attempt ------------------------------------------

    async def _turn(
        self,
        member: Member,
        conv: Conversation,
        k: int,
        answers: Sequence[str],
        keys: KeyChain | None,
        repair: tuple[str, str] | None = None,
    ) -> TurnRecord | None:
        """Turn k: from the cache, or sent (with retries); None if stopped before sending.

        ``keys`` hashes this conversation's requests for the cache (None without a cache).
        Each attempt goes to the lane ``Lanes.pick`` gives; a retry after a failure that
        was the deployment's fault goes to another one at once where one is available.
        """
        ready = self._loop.time()
        messages = conv.messages_for(k, answers, self.system)
        if repair is not None:  # asked again: the answer that did not parse, and why
            messages += [{"role": "assistant", "content": repair[0]}, user(repair[1])]
        extra = self._turn_params(conv, k)  # this turn's own parameters, over the run's
        params = {**self.params, **extra} if extra else self.params
        key = None
        if self.cache is not None and keys is not None:
            # A turn's own parameters are part of its key (no message carries that field).
            key = keys.key_with({**messages[-1], "turn_params": extra} if extra else messages[-1])
            reuse = self.cache.reusable(params) if extra else self._reuse_cached
            hit = self.cache.get(key) if reuse else None
            if hit is not None:
                return cached(conv, k, hit, member.row_model)
        estimate = estimate_tokens(messages, params) if self._tpm else 0
        # Most turns left first, then the longest conversation (see RequestSlots).
        priority = (k - len(conv), -len(conv))
        log = Attempts()
        attempt = 0
        while True:
            attempt += 1
            try:
                sent = await self._attempt(
                    member.lanes, messages, conv.id, k, attempt, estimate, log, priority, extra
                )
                if sent is None:
                    return None
                response, latency, lane, cost = sent
                self._reached = True
            except EngineError as error:
                # The lane it failed on; none when no deployment could take it.
                on = None if isinstance(error, NoDeployment) or not log.lanes else log.lanes[-1]
                secrets = on.secrets if on is not None else secret_values(self.params)
                if not self._reached and on is not None:
                    reason = unreachable_reason(error)
                    if reason is None:
                        self._reached = True
                    else:
                        on.unreachable += 1
                        if self.lanes.unreachable(UNREACHABLE_AFTER):
                            self._give_up(f"cannot reach {self.lanes.target()}: {reason}")
                if self._stopping:
                    return None  # not retried now, nor an error: the turn never finished
                if not self.retry.should_retry(error, attempt):
                    return unanswered(
                        conv,
                        k,
                        redact(f"{type(error).__name__}: {error}", secrets),
                        model=member.name,
                        engine=self._engine_name if on is None else on.engine.name,
                        deployment=None if on is None else on.id,
                        attempts=attempt,
                        started_at=log.sends[0] if log.sends else time.time(),
                        finished_at=time.time(),
                        **time_split(ready, self._loop.time(), log.spent),
                    )
                delay = self.retry.delay(error, attempt)
                if on is not None:
                    delay = member.lanes.after_failure(on, error, estimate, delay)
                if self._wants_retry:
                    text = redact(str(error), secrets)
                    self._emit(RetryScheduled(conv.id, k, attempt, text, delay, time.time()))
                await asyncio.sleep(delay)
                continue
            if key is not None and self.cache is not None:
                self.cache.put(key, response, engine=lane.engine.name)
            return answered(
                conv,
                k,
                response,
                model=member.row_model,
                engine=response.engine or lane.engine.name,
                deployment=lane.id,
                latency_s=latency,
                cost_usd=cost,
                attempts=attempt,
                started_at=log.sends[0],
                finished_at=time.time(),
                **time_split(ready, self._loop.time(), log.spent),
            )

    def _emit(self, event: Event) -> None:
        self._events.emit(event)
