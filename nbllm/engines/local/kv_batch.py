"""A running batch of sequences over one key/value cache, rows joining and leaving between
any two tokens; and the prefill that computes a new row's prompt, reusing cached prefixes.

Each row's keys and values sit right-aligned in one ``[rows, heads, width, dim]`` array per
layer, with an attention mask that hides the columns left of a row's own start (the layout of
a left-padded batch in transformers' ``generate``), and its own position ids. A row joins with
its prompt's keys and values, padded on the left to the batch's width, or widening the batch
when it is longer; a finished row is taken out at once, and columns no row uses any more are
cut off the left. One step feeds every row its latest token and gives each row's scores for
the next one.

What arrays are and how the model runs is a ``KVBackend``'s: torch tensors and a transformers
model (``nbllm.engines.local.torch_kv``), or numpy arrays and an ONNX graph
(``nbllm.engines.local.onnx``). The mask and the positions are numpy here; a backend converts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from nbllm.engines.local.prefix_cache import PrefixCache

__all__ = ["Decoder", "KVBackend", "KVBatch", "Layers"]

#: One layer's (keys, values), each ``[rows, heads, tokens, dim]``, as the backend keeps them.
Layers = list[tuple[Any, Any]]


class KVBackend(Protocol):
    """How a model computes and how its arrays are cut and joined."""

    def forward(
        self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray, past: Layers | None
    ) -> tuple[Any, Layers]:
        """Run ``ids`` (``[rows, n]``) after ``past``: each row's scores for the token after
        its last id (``[rows, vocab]``), and the keys and values of past and ids together."""

    def pad_left(self, array: Any, columns: int) -> Any:
        """``array`` (``[rows, heads, tokens, dim]``) with ``columns`` zero tokens in front."""

    def cat_rows(self, arrays: Sequence[Any]) -> Any:
        """Arrays stacked along their first axis."""

    def select(self, array: Any, rows: np.ndarray, start: int) -> Any:
        """``array[rows, :, start:]``: a new array (indexing by an array of rows copies),
        which shares no memory with ``array``."""

    def nbytes(self, array: Any) -> int: ...

    def pick(self, scores: Any, temperature: float, top_p: float, generator: Any) -> int:
        """The next token from one row's scores: the best when ``temperature`` is 0."""

    def generator(self, seed: int) -> Any:
        """A random source for one row's sampling."""


def kv_nbytes(backend: KVBackend, layers: Layers) -> int:
    return sum(backend.nbytes(k) + backend.nbytes(v) for k, v in layers)


class Decoder:
    """Prefill and sampling for one model; ``prefix`` (or None) keeps recent prompts' keys
    and values for the next prompts that start the same way."""

    def __init__(self, backend: KVBackend, prefix: PrefixCache | None) -> None:
        self.backend = backend
        self.prefix = prefix

    def prefill(self, tokens: Sequence[int]) -> tuple[Layers, Any, int]:
        """The keys and values of ``tokens``, the scores of the token after them, and how
        many of them came from the prefix cache."""
        reused, entry = self.prefix.longest(tokens) if self.prefix is not None else (0, None)
        past = None
        if entry is not None:
            past = [(k[..., :reused, :], v[..., :reused, :]) for k, v in entry.kv]
        scores, layers = self.backend.forward(
            np.array([list(tokens[reused:])], dtype=np.int64),
            np.arange(reused, len(tokens), dtype=np.int64)[None],
            np.ones((1, len(tokens)), dtype=np.int64),
            past,
        )
        if self.prefix is not None:
            self.prefix.put(tokens, layers, kv_nbytes(self.backend, layers))
        return layers, scores[0], reused

    def keep(self, tokens: Sequence[int], layers: Layers) -> None:
        """Offer a finished row's keys and values (of ``tokens``) to the prefix cache."""
        if self.prefix is not None:
            self.prefix.put(tokens, layers, kv_nbytes(self.backend, layers))

    def pick(self, scores: Any, temperature: float, top_p: float, generator: Any) -> int:
        return self.backend.pick(scores, temperature, top_p, generator)

    def generator(self, seed: int) -> Any:
        return self.backend.generator(seed)


class KVBatch:
    """The rows decoding together (see the module's docstring)."""

    def __init__(self, backend: KVBackend) -> None:
        self.backend = backend
        self.layers: Layers = []
        self.mask = np.zeros((0, 0), dtype=np.int64)  # [rows, width] of 0 / 1
        self.lengths: list[int] = []  # tokens each row holds (its next position)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def join(self, layers: Layers, length: int) -> None:
        """Add a row whose keys and values (``[1, heads, length, dim]``) are ``layers``."""
        b = self.backend
        if not self.lengths:
            self.layers = list(layers)
            self.mask = np.ones((1, length), dtype=np.int64)
            self.lengths = [length]
            return
        width = self.width
        if length > width:  # widen every row on the left
            grow = length - width
            self.layers = [(b.pad_left(k, grow), b.pad_left(v, grow)) for k, v in self.layers]
            self.mask = np.pad(self.mask, ((0, 0), (grow, 0)))
            width = length
        pad = width - length
        self.layers = [
            (b.cat_rows([k, b.pad_left(rk, pad)]), b.cat_rows([v, b.pad_left(rv, pad)]))
            for (k, v), (rk, rv) in zip(self.layers, layers, strict=True)
        ]
        row = np.concatenate([np.zeros(pad, dtype=np.int64), np.ones(length, dtype=np.int64)])
        self.mask = np.concatenate([self.mask, row[None]])
        self.lengths.append(length)

    def step(self, tokens: Sequence[int]) -> Any:
        """Feed each row its token; the scores of each row's next token, ``[rows, vocab]``."""
        rows = len(self.lengths)
        mask = np.concatenate([self.mask, np.ones((rows, 1), dtype=np.int64)], axis=1)
        scores, self.layers = self.backend.forward(
            np.array(tokens, dtype=np.int64)[:, None],
            np.array(self.lengths, dtype=np.int64)[:, None],
            mask,
            self.layers,
        )
        self.mask = mask
        self.lengths = [n + 1 for n in self.lengths]
        return scores

    def row(self, index: int) -> Layers:
        """A copy of row ``index``'s keys and values, ``[1, heads, its tokens, dim]``
        (``select`` copies already)."""
        b = self.backend
        start = self.width - self.lengths[index]
        at = np.array([index])
        return [(b.select(k, at, start), b.select(v, at, start)) for k, v in self.layers]

    def keep(self, indices: Sequence[int]) -> None:
        """Keep only the rows ``indices`` (in that order); drop the columns none of them uses."""
        if not indices:
            self.layers, self.lengths = [], []
            self.mask = np.zeros((0, 0), dtype=np.int64)
            return
        if list(indices) == list(range(len(self.lengths))):
            return
        lengths = [self.lengths[i] for i in indices]
        cut = self.width - max(lengths)
        at = np.array(list(indices))
        b = self.backend
        self.layers = [(b.select(k, at, cut), b.select(v, at, cut)) for k, v in self.layers]
        self.mask = self.mask[at, cut:]
        self.lengths = lengths
