"""The dynamic batcher: concurrent requests gathered into one generate call.

Engines without a scheduler of their own (deepspeed, onnx on CUDA, and torch or onnx with
``continuous=False``; see ``nbllm.engines.local.continuous`` for the others) run one batch at a
time on their model. A request joins the queue; a batch is cut as soon as it holds
``max_batch_size`` requests, or once its oldest request has waited ``max_wait_s`` —
so batching never adds more than ``max_wait_s`` to any request's wait before its batch
starts. Right after a batch of one the wait is skipped: with one request at a time
there is nobody to wait for. Requests whose sampling options differ are never mixed in one batch.

The model runs in one long-lived thread of the batcher's own, so the event loop (and the
dashboard on it) stays live while a batch generates, and libraries that keep state per
thread (OpenMP teams in torch, ggml's thread pool) set it up once, not once per run.

A request's ``timeout`` bounds only its wait for a batch slot: one still queued when it
runs out fails with ``RequestTimeout`` and leaves the queue, while one whose batch has
started is never timed out. On a busy CPU a generation may take longer than any timeout
meant for a network; timing it out would only start the same generation again, from the
beginning, forever. A request given up (its task cancelled) leaves the queue at once; one
whose batch already runs is not waited for, and the engine drops its row from the batch
where its backend can (``nbllm.engines.local.batched``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import queue
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from nbllm.errors import ConfigError, RequestTimeout

__all__ = ["DynamicBatcher", "ModelThread", "check_batching", "settle"]

Item = TypeVar("Item")
Out = TypeVar("Out")
Result = TypeVar("Result")


def check_batching(batch_size: object, batch_wait_s: object) -> None:
    """Refuse a batch size or wait no batcher can use, naming the engine option."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        msg = f"batch_size must be a whole number >= 1, got {batch_size!r}"
        raise ConfigError(msg)
    if (
        isinstance(batch_wait_s, bool)
        or not isinstance(batch_wait_s, int | float)
        or not 0 <= batch_wait_s < float("inf")  # NaN fails this too
    ):
        msg = f"batch_wait_s must be a finite number of seconds >= 0, got {batch_wait_s!r}"
        raise ConfigError(msg)


@dataclass(slots=True, eq=False)
class _Job:
    fn: Callable[[Any], Any]
    arg: Any
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    started: bool = False
    given_up: bool = False


class ModelThread:
    """One daemon thread that runs model calls in order, for whichever event loop asks.

    A call whose caller gave up (its future cancelled, or its ``timeout`` run out) before
    the call started is skipped; a call that started runs to its end.
    """

    def __init__(self, name: str = "local-model") -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # Settles, for each call, whether it starts or times out first: never both.
        self._claims = threading.Lock()

    def call(
        self, fn: Callable[[Any], Result], arg: Any, *, timeout: float | None = None
    ) -> asyncio.Future[Result]:
        """``fn(arg)`` in the thread; the returned future belongs to the running loop.

        ``timeout``: seconds the call may wait for the thread; it then fails with
        ``RequestTimeout`` without running.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
            self._thread.start()
        job = _Job(fn, arg, loop, future)
        if timeout is not None:
            expiry = loop.call_later(timeout, self._expire, job, timeout)
            future.add_done_callback(lambda _: expiry.cancel())
        self._jobs.put(job)
        return future

    def stop(self) -> None:
        """Let the thread end after the call it runs; calls still queued are cancelled."""
        if self._thread is None:
            return
        with contextlib.suppress(queue.Empty):
            while (job := self._jobs.get_nowait()) is not None:
                with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                    job.loop.call_soon_threadsafe(job.future.cancel)
        self._jobs.put(None)
        self._thread = None

    def _expire(self, job: _Job, timeout: float) -> None:
        with self._claims:
            if job.started or job.future.done():
                return
            job.given_up = True
        msg = (
            f"the model was busy for the whole {timeout:g} s timeout and this request "
            "never started (a local generation that started is never timed out)"
        )
        job.future.set_exception(RequestTimeout(msg))

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            with self._claims:
                # A future cancelled this very moment may still be read as pending: the
                # call then runs, and ``settle`` drops its outcome.
                if job.given_up or job.future.done():
                    continue
                job.started = True
            try:
                outcome, failed = job.fn(job.arg), False
            except BaseException as exc:
                outcome, failed = exc, True
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                job.loop.call_soon_threadsafe(settle, job.future, outcome, failed)


def settle(future: asyncio.Future[Any], outcome: Any, failed: bool) -> None:
    """Give ``future`` its outcome (an exception when ``failed``) unless it is already done;
    called on the future's loop (``loop.call_soon_threadsafe`` from a model thread)."""
    if future.done():
        return
    if failed:
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


@dataclass(slots=True, eq=False)
class _Pending(Generic[Item, Out]):
    item: Item
    group: Hashable
    future: asyncio.Future[Out]
    since: float
    expiry: asyncio.TimerHandle | None = None


class DynamicBatcher(Generic[Item, Out]):
    """Runs ``run_batch(items) -> outputs`` (same length, same order) on gathered requests.

    ``max_batch_size=1`` turns batching off: each request runs alone, in arrival order.
    Its batching task lives on the event loop of the latest ``submit``.
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[Item]], Sequence[Out]],
        *,
        max_batch_size: int = 8,
        max_wait_s: float = 0.01,
    ) -> None:
        check_batching(max_batch_size, max_wait_s)
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._queue: list[_Pending[Item, Out]] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._model_thread = ModelThread()
        self.batches_run = 0
        self.largest_batch = 0
        self._last_batch_size = 0
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # batches by size

    async def submit(
        self, item: Item, group: Hashable = None, *, timeout: float | None = None
    ) -> Out:
        """Queue ``item`` and wait for its output; requests of one ``group`` share batches.

        ``timeout``: seconds ``item`` may wait for its batch to start; it then leaves the
        queue and this raises ``RequestTimeout``. A batch that started is never timed out.
        """
        loop = asyncio.get_running_loop()
        wakeup, task = self._wakeup, self._task
        if wakeup is None or task is None or task.done() or task.get_loop() is not loop:
            # First use, or a new event loop (each nbllm.run in a notebook has its own).
            self._queue = [p for p in self._queue if p.future.get_loop() is loop]
            wakeup = self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._serve(wakeup))
        pending: _Pending[Item, Out] = _Pending(item, group, loop.create_future(), time.monotonic())
        if timeout is not None:
            pending.expiry = loop.call_later(timeout, self._expire, pending, timeout)
        self._queue.append(pending)
        wakeup.set()
        try:
            return await pending.future
        except asyncio.CancelledError:
            # A request given up before its batch started leaves the queue; one whose
            # batch already runs is simply not waited for.
            with contextlib.suppress(ValueError):
                self._queue.remove(pending)
            raise
        finally:
            if pending.expiry is not None:
                pending.expiry.cancel()

    def _expire(self, pending: _Pending[Item, Out], timeout: float) -> None:
        """``pending`` waited ``timeout`` s; it fails unless its batch started (on the loop)."""
        if pending not in self._queue or pending.future.done():
            return
        self._queue.remove(pending)
        msg = (
            f"no batch slot freed within the {timeout:g} s timeout: the model was busy with "
            "earlier batches and this request never started (a local generation that "
            "started is never timed out)"
        )
        pending.future.set_exception(RequestTimeout(msg))

    async def _serve(self, wakeup: asyncio.Event) -> None:
        while True:
            if not self._queue:
                wakeup.clear()
                await wakeup.wait()
                continue
            batch = await self._gather(wakeup)
            if not batch:
                continue
            self.batches_run += 1
            self.largest_batch = max(self.largest_batch, len(batch))
            self.batch_sizes[len(batch)] += 1
            self._last_batch_size = len(batch)
            try:
                outputs = await self._model_thread.call(self._run_batch, [p.item for p in batch])
            except Exception as exc:
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            for pending, output in zip(batch, outputs, strict=True):
                if not pending.future.done():
                    pending.future.set_result(output)

    async def _gather(self, wakeup: asyncio.Event) -> list[_Pending[Item, Out]]:
        """Wait until the oldest request's group fills a batch or the oldest waited enough."""
        while self._queue:
            oldest = self._queue[0]
            same = [p for p in self._queue if p.group == oldest.group]
            # After a batch of one, nothing suggests company is coming: a lone request
            # (one conversation at a time) then starts at once instead of waiting in vain.
            wait = 0.0 if self._last_batch_size == 1 else self.max_wait_s
            left = oldest.since + wait - time.monotonic()
            if len(same) >= self.max_batch_size or left <= 0:
                batch = same[: self.max_batch_size]
                taken = {id(p) for p in batch}
                self._queue = [p for p in self._queue if id(p) not in taken]
                for pending in batch:
                    if pending.expiry is not None:
                        pending.expiry.cancel()  # started: no timeout applies any more
                return batch
            wakeup.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wakeup.wait(), left)
        return []

    async def aclose(self) -> None:
        """Stop the batching task; requests still queued fail with ``CancelledError``."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            loop = task.get_loop()
            if loop is asyncio.get_running_loop():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            elif not loop.is_closed():
                loop.call_soon_threadsafe(task.cancel)
        for pending in self._queue:
            if not pending.future.done():
                pending.future.cancel()
        self._queue.clear()
        self._model_thread.stop()
