"""nbllm's logging: library code speaks through the ``nbllm`` logger only.

Warnings (an alert, a limit that went local, a tracer that failed) are records of the
``nbllm`` logger, which shows nothing of its own below WARNING; the notebook dashboard and the
terminal progress show what a user must see. ``log_to_stderr(level)`` is a script's one-line
opt-in to see the records as they come.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["log_to_stderr"]

_FORMAT = "%(asctime)s nbllm %(levelname)s: %(message)s"


def log_to_stderr(level: int | str = "INFO") -> logging.Handler:
    """Print the ``nbllm`` logger's records at ``level`` and above on stderr, and return the
    handler (``logging.getLogger("nbllm").removeHandler(handler)`` undoes it). Called again,
    it replaces the handler it added before instead of adding a second one."""
    logger = logging.getLogger("nbllm")
    for old in [h for h in logger.handlers if getattr(h, "_nbllm_stderr", False)]:
        logger.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler._nbllm_stderr = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level if isinstance(level, int) else level.upper())
    return handler
