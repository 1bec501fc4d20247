"""Telling an out-of-memory failure from others, and saying how much memory each GPU has."""

from __future__ import annotations

__all__ = ["is_out_of_memory", "memory_figures"]


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
