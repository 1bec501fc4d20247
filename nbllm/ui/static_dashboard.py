"""The dashboard as static HTML: what a saved notebook keeps once the run has ended.

A widget needs its kernel: a notebook reopened later, or exported by nbconvert, shows
"Error displaying widget" where it was. So when a run ends, the dashboard's output is
replaced by this rendering of its last snapshot: the title, the bars, the figures, a
batch API's batches, the errors and the verdict. Inline styles only (no ``<style>``, no
script), which notebook viewers keep; where even those are dropped the text still reads
on its own.
The live widget draws its figures and errors with the same pieces.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from nbllm.executor.stats import Snapshot
from nbllm.ui.gpu import GpuSample
from nbllm.ui.snapshot_text import bar_label, bar_style, figure_items

__all__ = [
    "batches_html",
    "dashboard_html",
    "errors_html",
    "figures_html",
    "progress_html",
    "title_html",
]

# ipywidgets' own bar colours, so the static bars look like the live ones.
_BAR_COLORS = {
    "": "#2196f3",
    "info": "#00bcd4",
    "success": "#4caf50",
    "warning": "#ff9800",
    "danger": "#f44336",
}
_ERROR_COLOR = "#d32f2f"


def figures_html(items: Sequence[str]) -> str:
    """The figures as items that wrap onto more lines in a narrow window, never cut off."""
    spans = "".join(f'<span style="white-space:nowrap">{html.escape(i)}</span>' for i in items)
    flow = "display:flex;flex-wrap:wrap;column-gap:1.1em;line-height:1.6"
    return f'<div style="{flow}">{spans}</div>'


def errors_html(lines: Sequence[str]) -> str:
    """Error lines in red; a long message wraps rather than being cut."""
    if not lines:
        return ""
    rows = "".join(f"<div>{html.escape(line)}</div>" for line in lines)
    return f'<div style="color:{_ERROR_COLOR};overflow-wrap:anywhere;line-height:1.5">{rows}</div>'


def batches_html(lines: Sequence[str]) -> str:
    """A batch API's batches (``nbllm.ui.snapshot_text.batch_lines``): plain text, a line
    each, wrapping rather than cut; nothing without batches."""
    if not lines:
        return ""
    rows = "".join(f"<div>{html.escape(line)}</div>" for line in lines)
    return f'<div class="nbllm-batches" style="overflow-wrap:anywhere;line-height:1.5">{rows}</div>'


def progress_html(done: float | None, total: float | None, label: str, style: str = "info") -> str:
    """A bar with its label beside it; without a ``total``, an indeterminate (moving) bar."""
    color = _BAR_COLORS.get(style, _BAR_COLORS[""])
    text = f'<span style="min-width:0;overflow-wrap:anywhere">{html.escape(label)}</span>'
    row = '<div style="display:flex;align-items:center;column-gap:.6em;margin:2px 0">'
    if not total:
        moving = f'<progress aria-label="{html.escape(label)}" style="width:50%;min-width:8em">'
        return f"{row}{moving}</progress>{text}</div>"
    done = done or 0.0
    ratio = max(0.0, min(1.0, done / total))
    return (
        f'{row}<div role="progressbar" aria-valuemin="0" aria-valuenow="{done:g}" '
        f'aria-valuemax="{total:g}" aria-label="{html.escape(label)}" '
        'style="flex:0 1 50%;min-width:8em;height:.9em;border-radius:2px;overflow:hidden;'
        'background:rgba(128,128,128,.22)">'
        f'<div style="width:{ratio * 100:.1f}%;height:100%;background:{color}"></div></div>'
        f"{text}</div>"
    )


def title_html(snap: Snapshot) -> str:
    """``<b>nbllm</b> · model · engine``, as far as they are known."""
    parts = ["<b>nbllm</b>"]
    parts += [html.escape(name) for name in (snap.model, snap.engine) if name]
    return " · ".join(parts)


def dashboard_html(
    snap: Snapshot,
    *,
    status: str = "",
    errors: Sequence[str] = (),
    phase: str = "",
    gpu: Sequence[GpuSample] = (),
    batches: Sequence[str] = (),
) -> str:
    """The whole dashboard for ``snap`` as one block of HTML.

    ``status``: the verdict (or what to do now); ``errors``: the error lines; ``phase``: a
    local engine's preparation, shown as a bar of its own; ``gpu``: the latest sample of
    each device (no GPU row without one); ``batches``: the lines of a batch API's batches,
    under the figures.
    """
    style = bar_style(snap)
    rows = [f"<div>{title_html(snap)}</div>"]
    if phase:
        rows.append(progress_html(snap.phase_done, snap.phase_total, phase))
    if snap.started and snap.phase is None:
        rows.append(
            progress_html(
                snap.turns_done,
                snap.turns_total or 1,
                bar_label(snap.turns_done, snap.turns_total, "turns"),
                style,
            )
        )
        rows.append(
            progress_html(
                snap.conversations_done,
                snap.conversations_total or 1,
                bar_label(snap.conversations_done, snap.conversations_total, "conversations"),
                style,
            )
        )
        rows.append(figures_html(figure_items(snap)))
    if batches:
        rows.append(batches_html(batches))
    if errors:
        rows.append(errors_html(errors))
    for sample in gpu:
        rows.append(f'<div style="opacity:.8">{html.escape(sample.describe())}</div>')
    if status:
        rows.append(f'<div style="font-weight:600;margin-top:2px">{html.escape(status)}</div>')
    body = "".join(rows)
    return (
        '<div class="nbllm-dashboard" style="font-family:var(--jp-ui-font-family,system-ui,'
        f'sans-serif);font-size:13px;line-height:1.4;max-width:100%">{body}</div>'
    )
