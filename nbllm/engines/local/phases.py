"""What a local model reports while it is prepared, and the third-party bars kept out of sight.

Before a local engine answers, its model may be converted from GGUF once ("converting"),
exported to ONNX once ("exporting"), and is then loaded ("loading"). Each step calls
``on_phase(phase, done, total, detail)``: ``done`` / ``total`` count the phase's own unit
(percent of a conversion, steps of an export), or are None where nothing can be counted
(a load starts with None / None and ends with 1 / 1); ``detail`` says what is happening, in a
few words. The run turns these calls into ``EnginePhase`` events,
so the dashboard draws them as it draws the run.

While it answers, a local engine reports the phase "generating" (``GENERATING``): ``done``
counts the completion tokens it has generated since it was made, ``total`` is None. These
calls come on the event loop's thread, at most four times a second (``TokenReport``), and
the latest count always arrives, up to a quarter of a second after the tokens.

transformers, gguf and DeepSpeed draw their own progress bars and notices while a model is
read; inside ``quiet_loading()`` they draw nothing, and the conversion counts the GGUF tensors
it de-quantizes instead. Whatever the user set for their own loads is restored afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = [
    "GENERATING",
    "PHASES",
    "PhaseCallback",
    "PhaseReport",
    "TokenReport",
    "quiet_loading",
]

#: ``on_phase(phase, done, total, detail)``.
PhaseCallback = Callable[[str, float | None, float | None, str], None]

#: The phases of a model's preparation, in the order a first run goes through them.
PHASES = ("converting", "exporting", "loading")

#: The phase reported while a loaded model answers: tokens generated so far.
GENERATING = "generating"

# A bar redrawn more often than this shows nothing more; the last call always goes through.
_MIN_INTERVAL_S = 0.1
# Token counts reach ``on_phase`` at most this often; the model thread posts them to the
# loop a little more often, so that the latest count is never far behind.
_TOKENS_INTERVAL_S = 0.25
_TOKENS_POST_S = 0.05

# The module whose tensor loop draws "Converting and de-quantizing GGUF tensors..." with
# tqdm.auto, outside transformers' own switch for its bars.
_GGUF_LOADER = "transformers.modeling_gguf_pytorch_utils"

# accelerate imports DeepSpeed where it is installed, and DeepSpeed then announces on stdout,
# as a WARNING, that a machine without a GPU runs on its CPU.
_DEEPSPEED_LOGGER = "DeepSpeed"
_DEEPSPEED_CPU_NOTICE = "Setting accelerator to CPU"


class PhaseReport:
    """Sends one phase's progress to ``on_phase`` (if any), at most every 0.1 s.

    The first call, the last (``done == total``) and any call with a new ``detail`` always
    go through, so the final state is never dropped.
    """

    def __init__(
        self, on_phase: PhaseCallback | None, phase: str, total: float | None = None
    ) -> None:
        self.on_phase = on_phase
        self.phase = phase
        self.total = total
        self._sent_at: float | None = None
        self._detail: str | None = None

    def __call__(self, done: float | None, detail: str | None = None) -> None:
        if self.on_phase is None:
            return
        detail = self._detail if detail is None else detail
        now = time.monotonic()
        due = (
            self._sent_at is None
            or detail != self._detail
            or (done is not None and done == self.total)
            or now - self._sent_at >= _MIN_INTERVAL_S
        )
        self._detail = detail
        if due:
            self._sent_at = now
            self.on_phase(self.phase, done, self.total, detail or "")


class TokenReport:
    """Completion tokens an engine generated, heard by ``on_phase`` as ``GENERATING``.

    The model thread adds tokens as they come (``add``); the count reaches the callback on
    the thread of ``loop`` (set by the engine on each request), at most every 0.25 s, and
    the latest count always arrives in the end. ``on_phase()`` returns the engine's callback
    of the moment (None: nobody listens, and nothing is sent).
    """

    def __init__(self, on_phase: Callable[[], PhaseCallback | None]) -> None:
        self._on_phase = on_phase
        #: Tokens generated so far; written by the model thread only.
        self.count = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._posted_at = -_TOKENS_POST_S
        self._sent_at = -_TOKENS_INTERVAL_S
        self._sent: int | None = None
        self._trailing: asyncio.TimerHandle | None = None

    def add(self, tokens: int, *, flush: bool = False) -> None:
        """``tokens`` more were generated (in the model thread); ``flush`` at a batch's end."""
        if tokens > 0:
            self.count += tokens
        loop = self.loop
        if loop is None or self._on_phase() is None:
            return
        now = time.monotonic()
        if not flush and now - self._posted_at < _TOKENS_POST_S:
            return
        self._posted_at = now
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody listens
            loop.call_soon_threadsafe(self._deliver, loop)

    def close(self) -> None:
        """Send nothing more (the engine is closed)."""
        self.loop = None
        if self._trailing is not None:
            self._trailing.cancel()
            self._trailing = None

    def _deliver(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._trailing is not None or self.loop is not loop:
            return  # a send is due already and reads the count then; or closed
        wait = self._sent_at + _TOKENS_INTERVAL_S - time.monotonic()
        if wait > 0:
            self._trailing = loop.call_later(wait, self._send)
        else:
            self._send()

    def _send(self) -> None:
        self._trailing = None
        count, on_phase = self.count, self._on_phase()
        if on_phase is None or count == self._sent:
            return
        self._sent, self._sent_at = count, time.monotonic()
        on_phase(GENERATING, count, None, "")


class _CountedTensors:
    """Stands in for tqdm around the GGUF tensor loop: counts instead of drawing."""

    def __init__(self, iterable: Iterable[Any] | None = None, *_: Any, **__: Any) -> None:
        self._items = iterable if iterable is not None else ()

    def __iter__(self) -> Iterator[Any]:
        on_tensor = getattr(_current, "on_tensor", None)
        items = list(self._items)
        for index, item in enumerate(items):
            yield item
            if on_tensor is not None:
                on_tensor(index + 1, len(items))

    def __enter__(self) -> _CountedTensors:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def update(self, *_: Any, **__: Any) -> None:
        return None

    def close(self) -> None:
        return None


class _DropDeepSpeedCpuNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_DEEPSPEED_CPU_NOTICE)


# Loads in several threads share one set of patches: the first to enter installs them, the
# last to leave restores what was there.
_lock = threading.Lock()
_depth = 0
_restore: list[Callable[[], None]] = []
_current = threading.local()


def _silence() -> list[Callable[[], None]]:
    """Turn the third-party bars off; returns the undo steps, last first."""
    undo: list[Callable[[], None]] = []
    import transformers

    tf_logging = transformers.utils.logging
    set_hook = getattr(tf_logging, "set_tqdm_hook", None)
    if set_hook is not None:
        # A hook (transformers 5) leaves huggingface_hub's own switch as the user set it.
        empty = tf_logging.EmptyTqdm
        previous = set_hook(lambda _factory, args, kwargs: empty(*args, **kwargs))
        undo.append(lambda: set_hook(previous))
    elif tf_logging.is_progress_bar_enabled():
        tf_logging.disable_progress_bar()
        undo.append(tf_logging.enable_progress_bar)
    with contextlib.suppress(ImportError):
        loader = importlib.import_module(_GGUF_LOADER)
        if hasattr(loader, "tqdm"):
            original = loader.tqdm
            setattr(loader, "tqdm", _CountedTensors)  # noqa: B010 (a module's global)
            undo.append(lambda: setattr(loader, "tqdm", original))
    deepspeed_logger = logging.getLogger(_DEEPSPEED_LOGGER)
    notice_filter = _DropDeepSpeedCpuNotice()
    deepspeed_logger.addFilter(notice_filter)
    undo.append(lambda: deepspeed_logger.removeFilter(notice_filter))
    return undo[::-1]


@contextlib.contextmanager
def quiet_loading(on_tensor: Callable[[int, int], None] | None = None) -> Iterator[None]:
    """Load a model without third-party progress bars; ``on_tensor(done, total)`` counts the
    tensors a GGUF conversion de-quantizes (in this thread).

    Needs transformers (the caller has imported it). Nests, and is safe across threads.
    """
    global _depth, _restore
    with _lock:
        if _depth == 0:
            _restore = _silence()
        _depth += 1
    outer = getattr(_current, "on_tensor", None)
    _current.on_tensor = on_tensor
    try:
        yield
    finally:
        _current.on_tensor = outer
        with _lock:
            _depth -= 1
            if _depth == 0:
                for step in _restore:
                    step()
                _restore = []
