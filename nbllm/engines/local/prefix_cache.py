"""The key/value caches of recent prompts, kept so that a prompt that starts like one of them
computes only the rest.

Turn k+1 of a conversation repeats turn k's prompt and answer, and conversations that share a
system prompt or a document repeat it at every turn. A local engine that computes a prompt's
keys and values (and, at the end of a request, its answer's) puts them here under the token
ids they hold; the next prompt takes the entry with the longest common prefix of ids and
computes only the tokens after it. Any common prefix serves, not only a whole entry: the keys
and values of the first n tokens depend on those n tokens alone.

The cache is bounded in bytes and forgets the least recently used entry first. An entry that
another one extends (turn k's, once turn k+1's is in) is dropped at once; one that an entry
already holds is not added. The cache knows nothing of tensors: an engine gives each entry's
size in bytes and slices what it gets back.
"""

from __future__ import annotations

import collections
import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["PrefixCache", "PrefixEntry", "default_prefix_cache_bytes"]

#: The share of free memory a prefix cache takes when no size is given.
DEFAULT_SHARE = 0.2
#: ... and never more than this many bytes.
DEFAULT_CEILING = 4 << 30


def default_prefix_cache_bytes(free_bytes: int | None) -> int:
    """A fifth of ``free_bytes`` (the device's free memory), at most 4 GiB; 256 MiB when the
    free memory is not known."""
    if not free_bytes or free_bytes <= 0:
        return 256 << 20
    return int(min(free_bytes * DEFAULT_SHARE, DEFAULT_CEILING))


@dataclass(slots=True, eq=False)
class PrefixEntry:
    """The keys and values (``kv``, as the engine keeps them) of the token ids ``tokens``."""

    tokens: np.ndarray
    kv: Any
    nbytes: int


class PrefixCache:
    """Key/value caches by the token ids they hold, at most ``max_bytes`` of them (LRU).

    Used from the model thread; the figures (``hits``, ``reused_tokens``, ...) may be read
    from any thread.
    """

    def __init__(self, max_bytes: int) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            msg = f"prefix_cache_bytes must be a whole number of bytes >= 0, got {max_bytes!r}"
            raise ValueError(msg)
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[int, PrefixEntry] = collections.OrderedDict()
        self._keys = itertools.count()
        self._lock = threading.Lock()
        self.bytes = 0
        #: Lookups that found a common prefix, and those that did not.
        self.hits = 0
        self.misses = 0
        #: Prompt tokens taken from the cache instead of computed.
        self.reused_tokens = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return (
            f"PrefixCache({len(self)} entries, {self.bytes:,} of {self.max_bytes:,} bytes, "
            f"{self.hits} hits, {self.misses} misses)"
        )

    def longest(self, tokens: Sequence[int], *, leave: int = 1) -> tuple[int, PrefixEntry | None]:
        """The entry sharing the longest prefix with ``tokens``, and that prefix's length,
        at most ``len(tokens) - leave`` (a model needs at least one token to compute to give
        the next token's scores). ``(0, None)`` when no entry shares any."""
        limit = len(tokens) - leave
        best, found = 0, None
        if limit > 0 and self._entries:
            wanted = np.asarray(tokens, dtype=np.int64)
            with self._lock:
                for key, entry in reversed(self._entries.items()):
                    n = min(limit, len(entry.tokens))
                    if n <= best:
                        continue
                    same = _common_prefix(entry.tokens[:n], wanted[:n])
                    if same > best:
                        best, found = same, key
                if found is not None:
                    self._entries.move_to_end(found)
                    entry = self._entries[found]
        if found is None:
            self.misses += 1
            return 0, None
        self.hits += 1
        self.reused_tokens += best
        return best, entry

    def put(self, tokens: Sequence[int], kv: Any, nbytes: int) -> bool:
        """Keep ``kv``, the keys and values of ``tokens`` (``nbytes`` in size); False when it
        is larger than the whole cache or an entry already holds it."""
        if nbytes > self.max_bytes or not len(tokens):
            return False
        ids = np.asarray(tokens, dtype=np.int64)
        with self._lock:
            for key, entry in list(self._entries.items()):
                n = min(len(ids), len(entry.tokens))
                if _common_prefix(entry.tokens[:n], ids[:n]) < n:
                    continue
                if len(entry.tokens) >= len(ids):
                    self._entries.move_to_end(key)
                    return False  # held already
                del self._entries[key]  # the new entry extends it
                self.bytes -= entry.nbytes
            while self._entries and self.bytes + nbytes > self.max_bytes:
                _, oldest = self._entries.popitem(last=False)
                self.bytes -= oldest.nbytes
                self.evictions += 1
            self._entries[next(self._keys)] = PrefixEntry(ids, kv, nbytes)
            self.bytes += nbytes
        return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading ids two arrays of one length share."""
    differ = np.flatnonzero(a != b)
    return int(differ[0]) if differ.size else len(a)
