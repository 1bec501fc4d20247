"""The engine seam: one async method, ``complete(request) -> response``, plus ``aclose()``.

API engines send each request as it comes; local engines (a later addition) gather
concurrent requests into batches behind the same method, so the executor never
needs to know which kind it drives. Engines raise only ``nbllm.errors.EngineError``
subclasses from ``complete``: backend exceptions are mapped at this boundary, and
their messages leave with every secret masked (``nbllm.redact``): the engine's own key
(``secrets()``), every credential in the request's parameters (``extra_headers``), the
environment's keys, and anything shaped like one.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from types import TracebackType

from nbllm.errors import EngineError
from nbllm.redact import redact_error, secret_values
from nbllm.types import ChatRequest, ChatResponse

__all__ = ["Engine", "EngineState"]


class EngineState(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


class Engine(ABC):
    """Base class of every engine. Use as ``async with engine:`` or call ``aclose()``."""

    #: Recorded in every row's ``engine`` column; an instance may name itself more precisely.
    name: str = "engine"
    #: Requests beyond this many at once only wait in a queue inside the engine (a local
    #: model's batch); a run keeps at most this many in flight, so no request's timeout
    #: runs out while it waits its turn. None: no such limit.
    max_in_flight: int | None = None
    #: True when the engine applies ``request.timeout`` itself: a local model bounds the
    #: wait for a batch slot with it, never a generation that is making progress. The
    #: executor then sets no timer of its own around ``complete``.
    bounds_own_timeout: bool = False
    #: The model this engine answers with when a run names none (a local model's name).
    default_model: str | None = None

    def __init__(self) -> None:
        self.state = EngineState.OPEN

    async def complete(self, request: ChatRequest) -> ChatResponse:
        """Answer one chat request."""
        if self.state is EngineState.CLOSED:
            msg = f"the {self.name} engine is closed; create a new one to send more requests"
            raise EngineError(msg)
        try:
            return await self._complete(request)
        except EngineError as error:
            # A server may echo the key it received in its error text.
            redact_error(error, (*self.secrets(), *secret_values(request.params)))
            raise

    @abstractmethod
    async def _complete(self, request: ChatRequest) -> ChatResponse: ...

    async def aclose(self) -> None:
        """Release connections or models. Idempotent."""
        self.state = EngineState.CLOSED

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def secrets(self) -> tuple[str, ...]:
        """The credentials this engine sends (its key), masked in every error it raises."""
        return ()

    def describe(self) -> str:
        """A short, secret-free description for logs and results."""
        return self.name

    def identity(self) -> str:
        """What about this engine decides its answers (for a run's fingerprint); no secrets."""
        return self.name
