"""OpenTelemetry traces of a run: one span for the run, one per conversation, one per request.

``tracing_listener()`` gives a listener for ``nbllm.run(..., listeners=[...])`` when the
process traces with OpenTelemetry (``opentelemetry.trace`` is imported and a real tracer
provider is set), and None otherwise; it never imports OpenTelemetry itself, so a process
without it pays nothing. The spans, all made with the times of the executor's events::

    nbllm run                      RunStarted .. RunFinished
      nbllm conversation           its first request sent (or row) .. its last row
        chat {model}               one request attempt: sent .. answered, refused or failed

A conversation's spans are made together when it ends (or when the run does): a request
costs a list append while the run is busy, and its span is exported with its conversation's.

The run span is a child of the span current where the listener was made (``nbllm.run``'s
caller), so a run inside a traced evaluation shows under it. Request spans follow
OpenTelemetry's GenAI conventions (``gen_ai.operation.name`` "chat", ``gen_ai.request.model``,
``gen_ai.usage.input_tokens``, ``gen_ai.usage.cache_read.input_tokens`` where the engine
said how many of them came from its cache, ...) with nbllm's own figures under ``nbllm.*``;
a request that was not answered has status ERROR and ``error.type``. A conversation with a
failed turn has status ERROR with the error's kind; the run span has status ERROR only when
the run was interrupted or gave up by itself (``stop_reason``), not because some turns
failed.

Spans hold no message text, answers, keys or URLs: error texts are cut to their kind. Only
``trace_content=True`` adds, at each finished turn, an event ``"nbllm.turn"`` on the
conversation span with ``gen_ai.prompt`` (the question) and ``gen_ai.completion`` (the
answer). The same conversation asked of several models runs once per model; each run of it
gets a span of its own when they follow one another. A listener that fails logs it once to
the ``nbllm`` logger and stops tracing, never the run.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

from nbllm.executor.events import (
    AttemptFinished,
    Event,
    RunFinished,
    RunStarted,
    TurnFinished,
)
from nbllm.executor.stats import error_kind
from nbllm.redact import redact

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

__all__ = ["RunTracer", "tracing_listener"]

log = logging.getLogger("nbllm")

RUN_SPAN = "nbllm run"
CONVERSATION_SPAN = "nbllm conversation"
TURN_EVENT = "nbllm.turn"


def tracing_listener(trace_content: bool = False) -> Callable[[Event], None] | None:
    """A ``RunTracer`` on the process's tracer provider, or None when OpenTelemetry is not
    in use: ``opentelemetry.trace`` not imported, or no tracer provider set (the default
    proxy or no-op one). Imports nothing in that case."""
    otel = sys.modules.get("opentelemetry.trace")
    if otel is None:
        return None
    provider = otel.get_tracer_provider()
    if isinstance(provider, (otel.ProxyTracerProvider, otel.NoOpTracerProvider)):
        return None
    from nbllm import __version__

    return RunTracer(provider.get_tracer("nbllm", __version__), trace_content)


def _ns(t: float) -> int:
    """Unix seconds to the integer nanoseconds OpenTelemetry takes."""
    return round(t * 1e9)


class RunTracer:
    """A listener that turns a run's events into spans of ``tracer`` (see the module's
    docstring). ``trace_content``: also record each turn's question and answer.

    One instance may follow several runs one after another; each ``RunStarted`` starts a
    new run span, under the span that was current when the instance was made. It handles
    only the events in ``event_types``: an ended attempt is kept with its conversation, and
    a conversation's spans are made when it ends, from the events' own times.
    """

    event_types = (RunStarted, AttemptFinished, TurnFinished, RunFinished)

    def __init__(self, tracer: Tracer, trace_content: bool = False) -> None:
        from opentelemetry import context, trace

        self._tracer = tracer
        self._trace_content = trace_content
        self._trace: Any = trace
        self._parent = context.get_current()
        self._on = True
        self._run: Span | None = None
        self._run_context: Any = self._parent
        # The open conversation spans, with the context of each and its turns finished so far.
        self._conversations: dict[Hashable, _Conversation] = {}
        # Per (model, deployment): the request span's name and its attributes that never change.
        self._requests: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
        self._handlers: dict[type, Callable[[Any], None]] = {
            RunStarted: self._run_started,
            AttemptFinished: self._attempt_finished,
            TurnFinished: self._turn_finished,
            RunFinished: self._run_finished,
        }

    def __repr__(self) -> str:
        return f"RunTracer(trace_content={self._trace_content})"

    def __call__(self, event: Event) -> None:
        if not self._on:
            return
        handler = self._handlers.get(type(event))
        if handler is None:
            return
        try:
            handler(event)
        except Exception:
            self._on = False
            log.exception("nbllm: tracing failed and is turned off")

    # --- the run

    def _run_started(self, event: RunStarted) -> None:
        self._conversations.clear()
        self._run = self._tracer.start_span(
            RUN_SPAN,
            context=self._parent,
            start_time=_ns(event.t),
            attributes={
                "nbllm.conversations": event.conversations,
                "nbllm.turns": event.turns,
                "gen_ai.request.model": event.model,
                "nbllm.engine": event.engine,
            },
        )
        self._run_context = self._trace.set_span_in_context(self._run, self._parent)

    def _run_finished(self, event: RunFinished) -> None:
        end = _ns(event.t)
        for conversation in self._conversations.values():
            self._spans(conversation, event.t)
        self._conversations.clear()
        run = self._run
        if run is None:
            return
        self._run = None
        self._run_context = self._parent
        run.set_attribute("nbllm.turns_ok", event.turns_ok)
        run.set_attribute("nbllm.turns_failed", event.turns_failed)
        run.set_attribute("nbllm.interrupted", event.interrupted)
        if event.stop_reason is not None:
            reason = redact(event.stop_reason)
            run.set_attribute("nbllm.stop_reason", reason)
            run.set_status(self._error(reason))
        elif event.interrupted:
            run.set_status(self._error("interrupted"))
        run.end(end_time=end)

    # --- conversations and their requests

    def _conversation(self, conversation_id: Hashable, t: float) -> _Conversation:
        """The open conversation ``conversation_id``, begun at ``t`` when it has none."""
        conversation = self._conversations.get(conversation_id)
        if conversation is None:
            conversation = self._conversations[conversation_id] = _Conversation(conversation_id, t)
        return conversation

    def _attempt_finished(self, event: AttemptFinished) -> None:
        self._conversation(event.conversation_id, event.sent_at).attempts.append(event)

    def _turn_finished(self, event: TurnFinished) -> None:
        record = event.record
        conversation = self._conversation(record.conversation_id, event.t)
        conversation.turns += 1
        if conversation.failed is None and not record.ok and not record.not_run:
            conversation.failed = error_kind(record.error or "no answer")
        if self._trace_content:
            conversation.content.append((event.t, record.turn, record.question, record.answer))
        if event.conversation_done:
            del self._conversations[record.conversation_id]
            self._spans(conversation, event.t)

    def _spans(self, conversation: _Conversation, t: float) -> None:
        """The spans of a conversation that ended at ``t``: its own, then one per request,
        made together from the times the events carried."""
        span = self._tracer.start_span(
            CONVERSATION_SPAN,
            context=self._run_context,
            start_time=_ns(conversation.start),
            attributes={
                "nbllm.conversation_id": str(conversation.id),
                "nbllm.turns": conversation.turns,
            },
        )
        if conversation.failed is not None:
            span.set_status(self._error(conversation.failed))
        for at, turn, question, answer in conversation.content:
            span.add_event(
                TURN_EVENT,
                attributes={
                    "nbllm.turn": turn,
                    "gen_ai.prompt": question,
                    "gen_ai.completion": answer or "",
                },
                timestamp=_ns(at),
            )
        context = self._trace.set_span_in_context(span)
        start_span = self._tracer.start_span
        for event in conversation.attempts:
            name, attributes = self._request(event)
            failed = event.outcome != "ok"
            if failed:
                attributes["error.type"] = event.error or event.outcome
            request = start_span(
                name, context=context, start_time=_ns(event.sent_at), attributes=attributes
            )
            if failed:
                request.set_status(self._error(event.error or event.outcome))
            request.end(end_time=_ns(event.t))
        span.end(end_time=_ns(t))

    def _request(self, event: AttemptFinished) -> tuple[str, dict[str, Any]]:
        """A request span's name and attributes (GenAI's conventions and nbllm's own)."""
        key = (event.model, event.deployment)
        known = self._requests.get(key)
        if known is None:
            known = self._requests[key] = (
                f"chat {event.model}",
                {
                    "gen_ai.operation.name": "chat",
                    "gen_ai.request.model": event.model,
                    "nbllm.deployment": event.deployment,
                },
            )
        name, constant = known
        attributes = constant.copy()
        attributes["nbllm.attempt"] = event.attempt
        attributes["nbllm.outcome"] = event.outcome
        attributes["nbllm.turn"] = event.turn
        if event.response_model is not None:
            attributes["gen_ai.response.model"] = event.response_model
        if event.prompt_tokens is not None:
            attributes["gen_ai.usage.input_tokens"] = event.prompt_tokens
        if event.cached_tokens is not None:  # part of input_tokens, as the convention says
            attributes["gen_ai.usage.cache_read.input_tokens"] = event.cached_tokens
        if event.completion_tokens is not None:
            attributes["gen_ai.usage.output_tokens"] = event.completion_tokens
        if event.finish_reason is not None:
            attributes["gen_ai.response.finish_reasons"] = (event.finish_reason,)
        if event.cost_usd is not None:
            attributes["nbllm.cost_usd"] = event.cost_usd
        return name, attributes

    def _error(self, description: str) -> Any:
        return self._trace.Status(self._trace.StatusCode.ERROR, description)


class _Conversation:
    """A conversation not yet ended: when it began, its request attempts, its turns so far,
    the kind of its first failure, and (with ``trace_content``) its questions and answers."""

    __slots__ = ("attempts", "content", "failed", "id", "start", "turns")

    def __init__(self, conversation_id: Hashable, start: float) -> None:
        self.id = conversation_id
        self.start = start
        self.attempts: list[AttemptFinished] = []
        self.content: list[tuple[float, int, str, str | None]] = []
        self.turns = 0
        self.failed: str | None = None
