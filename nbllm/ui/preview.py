"""A look at a result's first rows: the columns worth reading, each cell on one line.

The magic shows this under the verdict instead of the whole ``df`` (18 columns whose
questions wrap over many lines); the full table is the result's ``df``.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["PREVIEW_COLUMNS", "WIDTH", "ResultPreview", "clip"]

PREVIEW_COLUMNS = ("conversation_id", "turn", "question", "answer", "error", "latency_s")
_TEXT_COLUMNS = ("question", "answer", "error")
_OPTIONAL_COLUMNS = ("answer", "error", "latency_s")

# Cells keep to one line in a notebook's output, however narrow: the table scrolls instead.
# (!important: JupyterLab's and nbconvert's own table rules are more specific.)
_STYLE = (
    "<style>.nbllm-preview td, .nbllm-preview th "
    "{white-space: nowrap !important; text-align: left !important}</style>"
)
# About 40 characters of a question and of an answer fit a 600 px output beside the id.
WIDTH = 40


def clip(text: str, width: int = WIDTH) -> str:
    """``text`` on one line (runs of whitespace and line breaks become one space), cut to
    ``width`` characters with an ellipsis when longer."""
    line = " ".join(text.split())
    return line if len(line) <= width else line[:width].rstrip() + "…"


@dataclass(frozen=True)
class ResultPreview:
    """The first rows of a result's ``df``, its useful columns only, text clipped to one line.

    ``frame`` is that small table (without ``answer``, ``error`` or ``latency_s`` when no
    row of the result has one; with ``finish_reason`` after ``answer`` when some answer of
    the result ended otherwise than ``"stop"``, e.g. cut short by ``max_tokens``);
    ``note`` one line under it (where the rest is).
    """

    frame: pd.DataFrame
    note: str = ""

    @classmethod
    def of(
        cls, df: pd.DataFrame, rows: int = 5, width: int = WIDTH, note: str = ""
    ) -> ResultPreview:
        # A column no row fills (no error at all, no answer nor latency when nothing was
        # answered) only takes width from the ones that say something.
        columns = [
            c
            for c in PREVIEW_COLUMNS
            if c in df.columns and (c not in _OPTIONAL_COLUMNS or df[c].notna().any())
        ]
        if "finish_reason" in df.columns and "answer" in columns:
            reasons = df["finish_reason"]
            # A cut answer reads like a whole one: say so beside it, once any row was cut.
            if (reasons.notna() & (reasons != "stop")).any():
                columns.insert(columns.index("answer") + 1, "finish_reason")
        frame = df.loc[:, columns].head(rows).copy()
        for column in _TEXT_COLUMNS:
            if column in frame.columns:
                texts = frame[column].astype(object)
                frame[column] = [clip(v, width) if isinstance(v, str) else "" for v in texts]
        return cls(frame, note)

    def _formatters(self) -> dict[str, Any]:
        import pandas as pd

        def seconds(value: Any) -> str:
            return "" if pd.isna(value) else f"{value:.2f}"

        return {"latency_s": seconds} if "latency_s" in self.frame.columns else {}

    def __str__(self) -> str:
        import pandas as pd

        with pd.option_context("display.max_colwidth", None):
            table = self.frame.to_string(na_rep="", formatters=self._formatters())
        return f"{table}\n{self.note}" if self.note else table

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        import pandas as pd

        with pd.option_context("display.max_colwidth", None):
            table = self.frame.to_html(
                classes="nbllm-preview", na_rep="", formatters=self._formatters(), border=0
            )
        note = (
            f"<div style='color: gray; font-size: smaller'>{html.escape(self.note)}</div>"
            if self.note
            else ""
        )
        return f"{_STYLE}<div style='overflow-x: auto'>{table}</div>{note}"
