"""The words of a run's live views, from one ``Snapshot``.

The notebook widget, the static HTML left in a saved notebook and the one-line text
summary all say the same thing in the same units (seconds everywhere, as the summary), so
each figure is worded here once.
"""

from __future__ import annotations

from collections.abc import Sequence

from nbllm.executor.stats import BatchFigures, Snapshot
from nbllm.results import dollars

__all__ = [
    "bar_label",
    "bar_style",
    "batch_confirm_line",
    "batch_header",
    "batch_line",
    "batch_lines",
    "blocking_batch_note",
    "error_lines",
    "figure_items",
    "figures_line",
    "format_duration",
    "format_seconds",
    "generated_text",
    "phase_name",
    "phase_text",
    "status_line",
    "summary_line",
    "truncated_text",
]

_PHASES = {
    "converting": "converting the model",
    "exporting": "exporting the model",
    "loading": "loading the model",
}


def format_duration(seconds: float | None, *, tenths: bool = False) -> str:
    """``"42 s"``, ``"3 min 05 s"``, ``"2 h 07 min"``; ``"-"`` when unknown.

    ``tenths``: under a minute, to a tenth of a second (``"1.3 s"``), as the verdict says
    how long a run took.
    """
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "-"
    if tenths and seconds < 59.95:
        return f"{max(0.0, seconds):.1f} s"
    total = round(max(0.0, seconds))
    if total < 60:
        return f"{total} s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_seconds(seconds: float | None) -> str:
    """A latency: ``"0.21 s"``, ``"12.3 s"``, ``"125 s"``; ``"-"`` when unknown."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 100:
        return f"{seconds:.1f} s"
    return f"{seconds:,.0f} s"


def _rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 100 else f"{value:,.0f}"


def figure_items(snap: Snapshot) -> list[str]:
    """Every figure of the snapshot but the bars', one short item each.

    Counts that are zero and say nothing (cached, resumed, not run, cut short, prompt
    tokens cached, a cost of nothing) are left out, and so are the requests in flight and
    a local engine's tokens generated so far once the run has ended; failures are always
    shown, so "0 failed" says there were none.
    """
    items = [] if snap.finished else [f"in flight {snap.in_flight:,}"]
    if snap.generated_tokens is not None:  # a local generation moves before its turn ends
        items.append(generated_text(snap.generated_tokens))
    items += [f"{_rate(snap.requests_per_s)} req/s", f"{_rate(snap.tokens_per_s)} tok/s"]
    # An "auto" limit in force, beside the rates it bounds (per rate window: a minute).
    items += [f"{kind} limit {limit:,.0f}" for kind, limit in snap.auto_limits]
    if snap.latency_p50 is None:
        items.append("latency -")
    else:
        p50, p95 = format_seconds(snap.latency_p50), format_seconds(snap.latency_p95)
        items.append(f"latency p50 {p50} · p95 {p95}")
    if snap.score is not None:  # score= on the run: quality beside speed
        items.append(f"score {snap.score:.2f} ({snap.score_metric})")
    items += [f"retries {snap.retries:,}", f"{snap.failed:,} failed"]
    if snap.truncated:
        items.append(truncated_text(snap.truncated))
    if snap.not_run:
        items.append(f"{snap.not_run:,} not run")
    if snap.cached:
        items.append(f"cached {snap.cached:,}")
    if snap.cached_tokens:  # an engine with a prompt cache said how much of it served
        share = snap.cached_tokens_share or 0.0
        items.append(f"{snap.cached_tokens:,} prompt tokens cached ({share:.0%})")
    if snap.resumed:
        items.append(f"resumed {snap.resumed:,}")
    if snap.cost_usd:  # unknown, or nothing (a local model): no figure to show
        items.append(f"cost {dollars(snap.cost_usd)}")
    if snap.saved_usd:  # batch_api=True: the cost is at the batch price
        items.append(f"saved {dollars(snap.saved_usd)} (batch API)")
    items.append(f"elapsed {format_duration(snap.elapsed_s, tenths=snap.finished)}")
    if not snap.finished:
        items.append(f"ETA {format_duration(snap.eta_s)}")
    return items


def truncated_text(count: int) -> str:
    """Answers that max_tokens cut short: ``"12 cut short by max_tokens"``."""
    return f"{count:,} cut short by max_tokens"


def generated_text(tokens: int) -> str:
    """A local engine's progress within its turns: ``"1,234 tokens generated"``."""
    return f"{tokens:,} token{'' if tokens == 1 else 's'} generated"


def figures_line(snap: Snapshot) -> str:
    """``figure_items`` on one line."""
    return " · ".join(figure_items(snap))


def bar_label(done: int, total: int, unit: str) -> str:
    """A bar's words: ``"24 / 180 turns"``."""
    return f"{done:,} / {total:,} {unit}"


def bar_style(snap: Snapshot) -> str:
    """Red from the first failed row (or when the run gave up) to the end; orange when
    stopped early; green when done."""
    if snap.failed or snap.stop_reason:
        return "danger"
    if snap.interrupted or snap.not_run:
        return "warning"
    if snap.finished:
        return "success"
    return ""


def phase_name(phase: str) -> str:
    """A preparation phase in words: ``"converting"`` is ``"converting the model"``."""
    return _PHASES.get(phase, phase)


def phase_text(snap: Snapshot) -> str:
    """A local engine's preparation: ``"converting the model… 120 / 274 (de-quantizing the
    weights)"``, or ``"loading the model: starting a worker process"`` where nothing can be
    counted; empty once the run has started."""
    if snap.phase is None:
        return ""
    name = phase_name(snap.phase)
    detail = " ".join((snap.phase_detail or "").split())
    if snap.phase_done is None:
        return f"{name}: {detail}" if detail else f"{name}…"
    done = f"{snap.phase_done:,.0f}"
    counts = f"{done} / {snap.phase_total:,.0f}" if snap.phase_total else done
    return f"{name}… {counts} ({detail})" if detail else f"{name}… {counts}"


def error_lines(snap: Snapshot) -> list[str]:
    """What went wrong, in sight: the count by kind and the last error, whole, on one line.

    Before any turn failed, while retries pile up, the last error is what the retries are
    about: a run that retries without an answer says why.
    """
    lines = []
    if snap.errors_by_kind:
        lines.append("errors: " + " · ".join(f"{kind} {n:,}" for kind, n in snap.errors_by_kind))
    if snap.last_error:
        retrying = not snap.failed and snap.retries and not snap.finished
        lines.append(f"{'retrying after' if retrying else 'last error'}: {snap.last_error}")
    if snap.quota_note:
        lines.append(f"shared limits: {snap.quota_note}")
    if snap.breakers:
        lines.append(breaker_line(snap.breakers))
    lines.extend(f"alert: {message}" for message in snap.alerts[-3:])  # the latest three
    return lines


def breaker_line(breakers: Sequence[tuple[str, str, int]]) -> str:
    """The deployments whose breaker is not closed or has opened, and what that means."""
    parts = []
    for deployment, state, trips in breakers:
        opened = f" (opened {trips:,}x)" if trips else ""
        parts.append(f"{deployment} {state}{opened}")
    line = "breakers: " + " · ".join(parts)
    if any(state != "closed" for _, state, _ in breakers):
        line += " — turns go to the other deployments; one probe after the cooldown"
    return line


def status_line(snap: Snapshot, *, background: bool, grace_left_s: float | None = None) -> str:
    """What the user can do now, or how the run ended: never a stale instruction.

    ``background``: the run has a Stop button (the kernel is free); else it is stopped by
    interrupting the kernel. ``grace_left_s``: seconds left for the requests in flight.
    """
    if snap.finished:
        return snap.verdict or summary_line(snap).removeprefix("nbllm: ")
    if snap.stopping:
        n = snap.in_flight
        requests = "1 request" if n == 1 else f"{n:,} requests"
        wait = "" if grace_left_s is None else f" (up to {format_duration(grace_left_s)})"
        again = "Stop again" if background else "Interrupt again (■)"
        return f"stopping: {requests} in flight finish{wait}; {again} cancels them"
    if not snap.started or background:
        return ""
    # Not "the requests in flight finish": an interrupted ``await arun`` cancels them.
    return "Interrupt the kernel (■) to stop; every answer that arrived is kept."


def summary_line(snap: Snapshot) -> str:
    """``"nbllm: 120/300 turns, 2 failed, 35.2 req/s, ETA 5 s"``; the verdict once finished."""
    if snap.phase is not None:
        return f"nbllm: {phase_text(snap)}"
    if not snap.started:
        return "nbllm: waiting for the run to start"
    if snap.finished and snap.verdict:
        return f"nbllm: {snap.verdict}"
    parts = [f"{snap.turns_done:,}/{snap.turns_total:,} turns", f"{snap.failed:,} failed"]
    if snap.truncated:
        parts.append(truncated_text(snap.truncated))
    if snap.generated_tokens is not None and not snap.finished:
        parts.append(generated_text(snap.generated_tokens))
    if snap.not_run:
        parts.append(f"{snap.not_run:,} not run")
    if snap.finished:
        word = "stopped after" if snap.interrupted else "done in"
        parts.append(f"{word} {format_duration(snap.elapsed_s)}")
    else:
        parts += [f"{_rate(snap.requests_per_s)} req/s", f"ETA {format_duration(snap.eta_s)}"]
    return "nbllm: " + ", ".join(parts)


# -- batch_api=True ----------------------------------------------------------------------

_DAY_S = 24 * 3600.0  # the completion window both OpenAI and Anthropic give a batch


def _span(seconds: float) -> str:
    """``"42 s"``, ``"2 h 05 min"``, and a window of whole hours as ``"24 h"``."""
    return format_duration(seconds).removesuffix(" 00 min")


def batch_line(batch: BatchFigures) -> str:
    """One batch: ``"batch_abc123 · in_progress · 120/400 done, 3 failed · 2 h 05 min of
    24 h · 400 waiting"``. The waiting requests are left out once the batch has ended, and
    a failed batch says why."""
    done = f"{batch.completed:,}/{batch.total:,} done"
    if batch.failed:
        done += f", {batch.failed:,} failed"
    parts = [batch.id, batch.status, done]
    if batch.age_s is not None:
        window = f" of {_span(batch.window_s)}" if batch.window_s else ""
        parts.append(f"{_span(batch.age_s)}{window}")
    if batch.waiting and not batch.ended:
        parts.append(f"{batch.waiting:,} waiting")
    if batch.error:
        parts.append(f"error: {batch.error}")
    return " · ".join(parts)


def batch_header(snap: Snapshot) -> str:
    """``"3 batches in flight (openai batch API)"``, with the ended ones after a comma;
    empty for a run without batches."""
    if not snap.batches:
        return ""
    n = snap.batches_in_flight
    line = f"{n:,} {'batch' if n == 1 else 'batches'} in flight"
    ended = len(snap.batches) + snap.batches_not_shown - n
    if ended:
        line += f", {ended:,} ended"
    apis = ", ".join(sorted({batch.api for batch in snap.batches}))
    return f"{line} ({apis} batch API)"


def blocking_batch_note(snap: Snapshot) -> str:
    """What a blocking run through a batch API means for the user: it may wait up to the
    completion window, there is a way not to, and an interrupt leaves the batches alone."""
    windows = [b.window_s for b in snap.batches if b.window_s and not b.ended]
    window = _span(max(windows)) if windows else _span(_DAY_S)
    return (
        f"a run through a batch API may take up to its completion window ({window}); "
        "nbllm.submit(...) or %%llm_batch --background runs it in the background. "
        "Interrupting does not cancel the batches: running the same call again re-attaches "
        "to them"
    )


def batch_lines(snap: Snapshot, *, blocking: bool = False) -> list[str]:
    """The live views' words for a run's batches: the header, a line per batch shown, how
    many more there are, and for a ``blocking`` run with batches in flight, what that means
    (``blocking_batch_note``). Empty for a run without batches."""
    if not snap.batches:
        return []
    lines = [batch_header(snap), *(batch_line(batch) for batch in snap.batches)]
    if snap.batches_not_shown:
        n = snap.batches_not_shown
        lines.append(f"… and {n:,} more {'batch' if n == 1 else 'batches'}")
    if blocking and snap.batches_in_flight and not snap.finished:
        lines.append(blocking_batch_note(snap))
    return lines


def batch_confirm_line(batches: int) -> str:
    """What a second press of Stop does while ``batches`` are in flight, and what does not."""
    these = "the batch" if batches == 1 else f"the {batches:,} batches"
    return (
        f"Press again to cancel {these} in flight and stop: the answers already returned are "
        "kept. An interrupt or a kernel restart does NOT cancel them (running the cell again "
        "re-attaches)."
    )
