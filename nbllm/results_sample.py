"""Sorted samples and percentiles: how every latency figure of a run is computed."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["SortedSample", "percentile"]


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (as numpy's default) of already sorted values."""
    if not sorted_values:
        return None
    pos = (len(sorted_values) - 1) * q
    low = math.floor(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


class SortedSample:
    """Values added one at a time, read sorted. The values not merged in yet wait in a
    list of their own: an insort per value would move the whole list each time
    (quadratic over a long run); one merge per read is linear."""

    __slots__ = ("_new", "_sorted")

    def __init__(self) -> None:
        self._sorted: list[float] = []
        self._new: list[float] = []

    def add(self, value: float) -> None:
        self._new.append(value)

    def values(self) -> list[float]:
        if self._new:
            # Sorting a sorted run followed by a short unsorted one is a merge (Timsort).
            self._sorted.extend(self._new)
            self._sorted.sort()
            self._new.clear()
        return self._sorted
