"""OpenTelemetry traces: the span tree a run's events make, what spans may hold, and that
nothing of OpenTelemetry is imported or paid for where it is not in use."""

from __future__ import annotations

import logging
import subprocess
import sys
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk.trace")

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NoOpTracerProvider, ProxyTracerProvider, StatusCode

import nbllm
from nbllm import RetryPolicy
from nbllm.executor import events
from nbllm.executor.events import (
    AttemptFinished,
    RequestSent,
    RetryScheduled,
    RunFinished,
    RunStarted,
    StopRequested,
    TurnFinished,
)
from nbllm.testing import TestServer
from nbllm.tracing import RunTracer, tracing_listener
from nbllm.types import TurnRecord

QUESTION = "What is the secret plan?"
ANSWER = "The plan is 42."
T0 = 1_700_000_000.0


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def ns(t: float) -> int:
    return round(t * 1e9)


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


def attempt(
    n: int, outcome: str, error: str | None, sent_at: float, t: float, conversation_id: int = 7
) -> AttemptFinished:
    ok = outcome == "ok"
    return AttemptFinished(
        conversation_id=conversation_id,
        turn=0,
        attempt=n,
        model="m",
        deployment="m@127.0.0.1:8000",
        outcome=outcome,
        error=error,
        latency_s=t - sent_at,
        sent_at=sent_at,
        t=t,
        response_model="m-2024" if ok else None,
        prompt_tokens=12 if ok else None,
        completion_tokens=5 if ok else None,
        finish_reason="stop" if ok else None,
        cost_usd=0.001 if ok else None,
        cached_tokens=8 if ok else None,
    )


def one_turn_with_a_retry() -> list[Any]:
    """A run of one conversation of one turn whose first attempt failed."""
    record = TurnRecord(
        conversation_id=7,
        turn=0,
        question=QUESTION,
        answer=ANSWER,
        model="m",
        attempts=2,
        started_at=T0 + 0.1,
        finished_at=T0 + 2.0,
    )
    return [
        RunStarted(conversations=1, turns=1, model="m", engine="openai", t=T0),
        RequestSent(7, 0, 1, in_flight=1, t=T0 + 0.1),
        attempt(1, "error", "ServerError", sent_at=T0 + 0.1, t=T0 + 0.5),
        RetryScheduled(7, 0, 1, error="ServerError: 500 boom", delay_s=0.5, t=T0 + 0.5),
        RequestSent(7, 0, 2, in_flight=1, t=T0 + 1.0),
        attempt(2, "ok", None, sent_at=T0 + 1.0, t=T0 + 2.0),
        TurnFinished(record, in_flight=0, t=T0 + 2.0, conversation_done=True),
        RunFinished(turns_ok=1, turns_failed=0, wall_s=2.5, interrupted=False, t=T0 + 2.5),
    ]


def feed(listener: Any, run_events: list[Any]) -> None:
    for event in run_events:
        listener(event)


def every_text(spans: tuple[ReadableSpan, ...]) -> list[str]:
    """Every string in the spans' names, attributes, events and statuses."""
    texts: list[str] = []
    for span in spans:
        texts.append(span.name)
        texts.append(span.status.description or "")
        attribute_sets = [span.attributes or {}, *(event.attributes or {} for event in span.events)]
        for attributes in attribute_sets:
            for value in attributes.values():
                values = value if isinstance(value, tuple) else (value,)
                texts.extend(str(v) for v in values)
    return texts


# --------------------------------------------------------------------------- the span tree


def test_one_turn_makes_a_run_a_conversation_and_an_attempt_span_each(provider, exporter):
    feed(RunTracer(provider.get_tracer("nbllm")), one_turn_with_a_retry())
    spans = exporter.get_finished_spans()
    assert sorted(span.name for span in spans) == [
        "chat m",
        "chat m",
        "nbllm conversation",
        "nbllm run",
    ]
    [run] = by_name(spans, "nbllm run")
    [conversation] = by_name(spans, "nbllm conversation")
    first, second = sorted(by_name(spans, "chat m"), key=lambda s: s.attributes["nbllm.attempt"])

    assert run.parent is None
    assert conversation.parent.span_id == run.context.span_id
    assert first.parent.span_id == conversation.context.span_id
    assert second.parent.span_id == conversation.context.span_id
    assert {span.context.trace_id for span in spans} == {run.context.trace_id}

    assert (run.start_time, run.end_time) == (ns(T0), ns(T0 + 2.5))
    assert (conversation.start_time, conversation.end_time) == (ns(T0 + 0.1), ns(T0 + 2.0))
    assert (first.start_time, first.end_time) == (ns(T0 + 0.1), ns(T0 + 0.5))
    assert (second.start_time, second.end_time) == (ns(T0 + 1.0), ns(T0 + 2.0))


def test_spans_carry_the_run_and_request_figures(provider, exporter):
    feed(RunTracer(provider.get_tracer("nbllm")), one_turn_with_a_retry())
    spans = exporter.get_finished_spans()
    [run] = by_name(spans, "nbllm run")
    [conversation] = by_name(spans, "nbllm conversation")
    failed, ok = sorted(by_name(spans, "chat m"), key=lambda s: s.attributes["nbllm.attempt"])

    assert dict(run.attributes) == {
        "nbllm.conversations": 1,
        "nbllm.turns": 1,
        "gen_ai.request.model": "m",
        "nbllm.engine": "openai",
        "nbllm.turns_ok": 1,
        "nbllm.turns_failed": 0,
        "nbllm.interrupted": False,
    }
    assert run.status.status_code is StatusCode.UNSET
    assert dict(conversation.attributes) == {"nbllm.conversation_id": "7", "nbllm.turns": 1}
    assert conversation.status.status_code is StatusCode.UNSET

    assert dict(ok.attributes) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "m",
        "gen_ai.response.model": "m-2024",
        "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.cache_read.input_tokens": 8,  # of the 12: from the engine's cache
        "gen_ai.usage.output_tokens": 5,
        "gen_ai.response.finish_reasons": ("stop",),
        "nbllm.attempt": 2,
        "nbllm.outcome": "ok",
        "nbllm.deployment": "m@127.0.0.1:8000",
        "nbllm.turn": 0,
        "nbllm.cost_usd": 0.001,
    }
    assert ok.status.status_code is StatusCode.UNSET
    assert dict(failed.attributes) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "m",
        "nbllm.attempt": 1,
        "nbllm.outcome": "error",
        "nbllm.deployment": "m@127.0.0.1:8000",
        "nbllm.turn": 0,
        "error.type": "ServerError",
    }
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == "ServerError"


def test_a_failed_turn_marks_its_conversation_with_the_first_error_kind(provider, exporter):
    tracer = RunTracer(provider.get_tracer("nbllm"))
    failed = TurnRecord(7, 0, QUESTION, error="ServerError: 500 from http://u:pw@host/v1")
    skipped = TurnRecord(7, 1, QUESTION, error="skipped: an earlier turn failed")
    feed(
        tracer,
        [
            RunStarted(conversations=1, turns=2, model="m", engine="openai", t=T0),
            RequestSent(7, 0, 1, in_flight=1, t=T0),
            attempt(1, "error", "ServerError", sent_at=T0, t=T0 + 1),
            TurnFinished(failed, in_flight=0, t=T0 + 1),
            TurnFinished(skipped, in_flight=0, t=T0 + 1, conversation_done=True),
            RunFinished(turns_ok=0, turns_failed=2, wall_s=1, interrupted=False, t=T0 + 1),
        ],
    )
    spans = exporter.get_finished_spans()
    [conversation] = by_name(spans, "nbllm conversation")
    assert conversation.status.status_code is StatusCode.ERROR
    assert conversation.status.description == "ServerError"
    assert conversation.attributes["nbllm.turns"] == 2
    [run] = by_name(spans, "nbllm run")
    assert run.status.status_code is StatusCode.UNSET  # failed turns are not a failed run
    assert not any("pw" in text or "500" in text for text in every_text(spans))


def test_a_conversation_from_the_cache_gets_a_span_without_requests(provider, exporter):
    record = TurnRecord(3, 0, QUESTION, answer=ANSWER, cached=True)
    feed(
        RunTracer(provider.get_tracer("nbllm")),
        [
            RunStarted(conversations=1, turns=1, model="m", engine="openai", t=T0),
            TurnFinished(record, in_flight=0, t=T0 + 0.2, conversation_done=True),
            RunFinished(turns_ok=1, turns_failed=0, wall_s=0.3, interrupted=False, t=T0 + 0.3),
        ],
    )
    spans = exporter.get_finished_spans()
    [conversation] = by_name(spans, "nbllm conversation")
    assert (conversation.start_time, conversation.end_time) == (ns(T0 + 0.2), ns(T0 + 0.2))
    assert conversation.attributes["nbllm.turns"] == 1
    assert len(spans) == 2


def test_the_same_conversation_again_gets_a_new_span(provider, exporter):
    """One dataset conversation asked of two models, one after the other."""
    tracer = RunTracer(provider.get_tracer("nbllm"))
    run_events: list[Any] = [RunStarted(conversations=2, turns=2, model="a,b", engine="x", t=T0)]
    for k, model in enumerate(("a", "b")):
        record = TurnRecord(7, 0, QUESTION, answer=ANSWER, model=model)
        run_events += [
            attempt(1, "ok", None, sent_at=T0 + k, t=T0 + k + 0.4),
            TurnFinished(record, in_flight=0, t=T0 + k + 0.5, conversation_done=True),
        ]
    run_events.append(RunFinished(2, 0, wall_s=2, interrupted=False, t=T0 + 2))
    feed(tracer, run_events)
    conversations = by_name(exporter.get_finished_spans(), "nbllm conversation")
    assert sorted(span.start_time for span in conversations) == [ns(T0), ns(T0 + 1)]
    assert len({span.context.span_id for span in conversations}) == 2


def test_an_interrupted_run_ends_its_open_spans_with_an_error(provider, exporter):
    tracer = RunTracer(provider.get_tracer("nbllm"))
    feed(
        tracer,
        [
            RunStarted(conversations=2, turns=4, model="m", engine="openai", t=T0),
            RequestSent(1, 0, 1, in_flight=1, t=T0),
            StopRequested(grace_s=0, in_flight=1, t=T0 + 1),
            attempt(1, "cancelled", None, sent_at=T0, t=T0 + 1, conversation_id=1),
            RunFinished(0, 0, wall_s=1, interrupted=True, t=T0 + 1),
        ],
    )
    spans = exporter.get_finished_spans()
    [run] = by_name(spans, "nbllm run")
    assert run.status.status_code is StatusCode.ERROR
    assert run.status.description == "interrupted"
    [conversation] = by_name(spans, "nbllm conversation")
    assert conversation.end_time == ns(T0 + 1)
    [cancelled] = by_name(spans, "chat m")
    assert cancelled.attributes["error.type"] == "cancelled"
    assert cancelled.status.status_code is StatusCode.ERROR


def test_a_run_that_gave_up_says_why_without_credentials(provider, exporter):
    reason = "nothing could be reached: http://user:not-a-real-password-0@host/v1"
    feed(
        RunTracer(provider.get_tracer("nbllm")),
        [
            RunStarted(conversations=1, turns=1, model="m", engine="openai", t=T0),
            RunFinished(0, 0, wall_s=1, interrupted=False, t=T0 + 1, stop_reason=reason),
        ],
    )
    [run] = exporter.get_finished_spans()
    assert run.status.status_code is StatusCode.ERROR
    assert run.attributes["nbllm.stop_reason"].startswith("nothing could be reached")
    assert not any("not-a-real-password-0" in text for text in every_text((run,)))


def test_the_run_span_is_a_child_of_the_callers_span(provider, exporter):
    outer = provider.get_tracer("evaluation")
    with outer.start_as_current_span("evaluation") as evaluation:
        tracer = RunTracer(provider.get_tracer("nbllm"))
    feed(tracer, one_turn_with_a_retry())
    [run] = by_name(exporter.get_finished_spans(), "nbllm run")
    assert run.parent.span_id == evaluation.get_span_context().span_id


# --------------------------------------------------------------------------- content


def test_no_question_or_answer_in_spans_by_default(provider, exporter):
    feed(RunTracer(provider.get_tracer("nbllm")), one_turn_with_a_retry())
    spans = exporter.get_finished_spans()
    assert all(not span.events for span in spans)
    texts = every_text(spans)
    assert not any(QUESTION in text or ANSWER in text for text in texts)


def test_trace_content_adds_each_turn_as_an_event(provider, exporter):
    feed(RunTracer(provider.get_tracer("nbllm"), trace_content=True), one_turn_with_a_retry())
    spans = exporter.get_finished_spans()
    [conversation] = by_name(spans, "nbllm conversation")
    [event] = conversation.events
    assert event.name == "nbllm.turn"
    assert event.timestamp == ns(T0 + 2.0)
    assert dict(event.attributes) == {
        "nbllm.turn": 0,
        "gen_ai.prompt": QUESTION,
        "gen_ai.completion": ANSWER,
    }
    assert all(not span.events for span in spans if span is not conversation)


# --------------------------------------------------------------------------- failures


def test_a_failing_tracer_logs_once_and_turns_itself_off(exporter, caplog):
    class BrokenTracer:
        calls = 0

        def start_span(self, *args: Any, **kwargs: Any) -> Any:
            BrokenTracer.calls += 1
            raise RuntimeError("exporter broke")

    tracer = RunTracer(BrokenTracer())
    with caplog.at_level(logging.ERROR, logger="nbllm"):
        feed(tracer, one_turn_with_a_retry())  # raises nothing
    assert BrokenTracer.calls == 1
    assert len([r for r in caplog.records if r.name == "nbllm"]) == 1


def test_other_events_are_not_delivered(provider):
    tracer = RunTracer(provider.get_tracer("nbllm"))
    assert set(tracer.event_types) == {
        RunStarted,
        events.AttemptFinished,
        TurnFinished,
        RunFinished,
    }
    bus = events.EventBus([tracer])
    assert not bus.wants(RetryScheduled)
    assert not bus.wants(RequestSent)  # a request's span is made once, when it has ended
    assert bus.wants(events.AttemptFinished)


# --------------------------------------------------------------------------- a real run


def test_a_run_against_a_flaky_server_traces_every_request(provider, exporter):
    data = [{"id": i, "turns": ["hi", "again", "more"]} for i in range(5)]
    tracer = RunTracer(provider.get_tracer("nbllm"))
    with TestServer(faults={"server_error": 0.2}, seed=3) as server:
        result = nbllm.run(
            data,
            model="m",
            api_base=server.url,
            checkpoint=False,
            cache=False,
            progress=False,
            retries=RetryPolicy(retries=8, initial=0),
            listeners=[tracer],
        )
        requests = len(server.requests)
    assert result.summary.turns_ok == 15

    spans = exporter.get_finished_spans()
    [run] = by_name(spans, "nbllm run")
    conversations = by_name(spans, "nbllm conversation")
    attempts = by_name(spans, "chat m")
    assert len(spans) == 1 + len(conversations) + len(attempts)
    assert len(conversations) == 5
    assert sorted(s.attributes["nbllm.conversation_id"] for s in conversations) == list("01234")
    assert all(s.parent.span_id == run.context.span_id for s in conversations)
    assert len(attempts) == requests
    conversation_ids = {s.context.span_id for s in conversations}
    assert all(s.parent.span_id in conversation_ids for s in attempts)
    failed = [s for s in attempts if s.attributes["nbllm.outcome"] != "ok"]
    assert failed  # the server's faults made some
    assert all(s.status.status_code is StatusCode.ERROR for s in failed)
    assert all("error.type" in s.attributes for s in failed)
    assert sum(s.attributes["nbllm.outcome"] == "ok" for s in attempts) == 15
    assert not {"hi", "again", "more"} & set(every_text(spans))


# --------------------------------------------------------------------------- detection


def test_no_tracing_without_a_tracer_provider(monkeypatch):
    monkeypatch.setattr(trace, "get_tracer_provider", ProxyTracerProvider)
    assert tracing_listener() is None
    monkeypatch.setattr(trace, "get_tracer_provider", NoOpTracerProvider)
    assert tracing_listener() is None


def test_no_tracing_while_opentelemetry_is_not_imported(monkeypatch, provider):
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    monkeypatch.delitem(sys.modules, "opentelemetry.trace")
    assert tracing_listener() is None


def test_a_set_tracer_provider_gives_a_tracer(monkeypatch, provider, exporter):
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    listener = tracing_listener(trace_content=True)
    assert isinstance(listener, RunTracer)
    feed(listener, one_turn_with_a_retry())
    spans = exporter.get_finished_spans()
    assert len(spans) == 4
    assert spans[0].instrumentation_scope.name == "nbllm"
    assert spans[0].instrumentation_scope.version == nbllm.__version__
    [conversation] = by_name(spans, "nbllm conversation")
    assert conversation.events


def test_importing_nbllm_imports_no_opentelemetry():
    code = "import nbllm, nbllm.tracing, sys; print('opentelemetry' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"
