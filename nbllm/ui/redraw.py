"""When a live view redraws: on a timer, so that the last state is always drawn.

Redrawing on each event would cost the run too much (thousands of events a second), and a
throttle that drops the redraws falling too soon after the last one can drop the last
change of all: the view then shows a stale state for as long as no new event comes. A
``RedrawTimer`` instead wakes at most ``max_per_s`` times a second in a daemon thread and
draws when something changed since its last draw, and at least every ``1 / min_per_s``
seconds anyway (the elapsed time and the ETA move without events).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from nbllm.errors import ConfigError

__all__ = ["RedrawTimer"]

log = logging.getLogger("nbllm")


class RedrawTimer:
    """Calls ``draw`` from a daemon thread named ``name`` while a run goes on.

    ``changed()`` (cheap: call it for every event) marks the view stale and starts the
    thread if it is not running. The thread ends on ``stop()``, when the thread that last
    called ``changed()`` has ended (a run that died without saying so), or after ``idle_s``
    seconds without a change; a later ``changed()`` starts it again. ``draw`` runs in the
    timer's thread: it must be safe to call beside the caller's own draws.
    """

    def __init__(
        self,
        draw: Callable[[], None],
        *,
        max_per_s: float = 10.0,
        min_per_s: float = 1.0,
        idle_s: float = 600.0,
        name: str = "nbllm-redraw",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for option, value in (("max_per_s", max_per_s), ("min_per_s", min_per_s)):
            if not value > 0:
                msg = f"{option}= expected a number of redraws a second > 0, got {value!r}"
                raise ConfigError(msg)
        self._draw = draw
        self.interval_s = 1.0 / max_per_s
        self.longest_gap_s = max(self.interval_s, 1.0 / min_per_s)
        self.idle_s = idle_s
        self.name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._source: threading.Thread | None = None
        self.stale = False
        self._last_change = clock()
        self._last_draw = float("-inf")

    @property
    def running(self) -> bool:
        return self._thread is not None

    def changed(self) -> None:
        self.stale = True
        if self._thread is None:
            self._start()

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._source = threading.current_thread()
            self._last_change = self._clock()
            self._stopping = threading.Event()
            self._thread = threading.Thread(
                target=self._run, args=(self._stopping,), name=self.name, daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        """End the thread (after a draw in progress); any number of times, from any thread."""
        with self._lock:
            thread, self._thread = self._thread, None
            self._stopping.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def tick(self, now: float) -> bool:
        """One wake-up of the timer at ``now``: draw if due; True when it drew."""
        if self.stale:
            self._last_change = now
        elif now - self._last_draw < self.longest_gap_s:
            return False
        self.stale = False  # before drawing: a change during the draw is drawn next time
        self._last_draw = now
        self._draw()
        return True

    def _run(self, stopping: threading.Event) -> None:
        source = self._source
        try:
            while not stopping.wait(self.interval_s):
                now = self._clock()
                self.tick(now)
                idle = now - self._last_change > self.idle_s
                if idle or (source is not None and not source.is_alive()):
                    break
        except Exception:
            log.exception("nbllm: the live view failed to redraw and stops updating")
        finally:
            with self._lock:
                if self._thread is threading.current_thread():
                    self._thread = None
