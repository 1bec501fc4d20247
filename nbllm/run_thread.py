"""A run on its own event loop in a daemon thread, beside the caller's loop (a kernel's).

``nbllm.run`` inside a running loop waits for one; ``nbllm.submit`` hands one back as a
``Job`` and lets the kernel go on. Either way there is one stop path: ``stop()``, from any
thread and at any time (even before the run's loop exists), presses the run's own Stop
(``PreparedRun.stop``): the first lets the requests in flight finish, a second cancels
them. The executor then returns what finished with ``interrupted=True``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

from nbllm.executor.events import Event, RunFinished
from nbllm.results import RunResult

__all__ = ["RunThread"]

Settle = Callable[[RunResult | None, BaseException | None], None]


class _RunEnd:
    """A listener for ``RunFinished`` only, so the executor builds no other event for it."""

    event_types = (RunFinished,)

    def __init__(self) -> None:
        self.seen = False

    def __call__(self, event: Event) -> None:
        self.seen = True


class RunThread:
    """Runs ``execute()`` once, in a daemon thread named ``name``, when ``start()`` is called.

    ``stop``: the run's own stop (thread-safe, any number of times), which ``stop()`` calls.
    Add ``listener`` to the run's listeners: once the run has emitted ``RunFinished`` its
    result is complete, and a stop is ignored. ``settle(result, error)`` is called in the
    thread when the run ends.
    """

    def __init__(
        self,
        execute: Callable[[], Awaitable[RunResult]],
        *,
        name: str,
        stop: Callable[[], None],
        settle: Settle | None = None,
    ) -> None:
        self._execute = execute
        self._settle = settle
        self._stop_run = stop
        self.listener = _RunEnd()
        self._ended = threading.Event()
        self.result: RunResult | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the run to end; False if ``timeout`` seconds passed first."""
        return self._ended.wait(timeout)

    def outcome(self) -> RunResult:
        """The run's result, or the exception it raised, raised again."""
        if self.error is not None:
            raise self.error
        if self.result is None:
            msg = f"{self.thread.name} has not ended yet"
            raise RuntimeError(msg)
        return self.result

    def stop(self) -> None:
        """Stop the run, keeping what finished. Safe from any thread, at any time."""
        if not self.listener.seen:
            self._stop_run()

    async def _run(self) -> RunResult:
        return await self._execute()

    def _main(self) -> None:
        try:
            self.result = asyncio.run(self._run())
        except BaseException as exc:  # handed to the caller, who raises it again
            self.error = exc
        if self._settle is not None:
            self._settle(self.result, self.error)
        self._ended.set()
