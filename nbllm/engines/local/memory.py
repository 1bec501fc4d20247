"""Telling an out-of-memory failure from others, and saying how much memory is free."""

from __future__ import annotations

import os

__all__ = ["free_bytes", "is_out_of_memory", "memory_figures"]


def free_bytes(device: str) -> int | None:
    """Bytes free on ``device`` (its memory on CUDA, the machine's otherwise), if known."""
    try:
        if device.startswith("cuda"):
            import torch

            return int(torch.cuda.mem_get_info()[0])
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, RuntimeError, AttributeError):
        return None


def is_out_of_memory(exc: BaseException) -> bool:
    if type(exc).__name__ in ("OutOfMemoryError", "OutOfMemoryException"):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def memory_figures() -> str:
    """Free and total memory of each CUDA device, as far as torch can tell."""
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA device"
        figures = []
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            figures.append(f"GPU {index}: {free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
        return "; ".join(figures)
    except Exception as exc:
        return f"memory figures unavailable: {exc}"
