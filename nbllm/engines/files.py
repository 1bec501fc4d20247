"""Folders nbllm creates for what must stay private: prompts, answers, converted models."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DIR_MODE", "private_dir"]

DIR_MODE = 0o700


def private_dir(path: Path) -> None:
    """Create ``path`` and any missing folder above it, each 0700 whatever the umask.

    Folders that already exist are left as they are (``os.makedirs`` would give the
    missing parents the umask's mode).
    """
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=DIR_MODE)
        except FileExistsError:  # made by another process meanwhile: theirs, left as it is
            continue
        os.chmod(folder, DIR_MODE)  # a umask such as 0o277 would take bits from mkdir's mode
