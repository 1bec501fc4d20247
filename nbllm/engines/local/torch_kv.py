"""A running batch of sequences for a transformers causal model: one key/value cache, rows
that join and leave between any two tokens.

Each row's keys and values sit right-aligned in one ``[rows, heads, width, dim]`` tensor per
layer, with an attention mask that hides the columns left of a row's own start (the layout
transformers' ``generate`` uses for a left-padded batch), and its own position ids. A row
joins with the keys and values of its prompt (computed alone, by ``TorchDecoder.prefill``,
reusing the longest cached prefix), padded on the left to the batch's width, or widening the
batch when it is longer; a finished row is taken out at once, and columns no row uses any
more are cut off the left. One step feeds every row its latest token and gives the scores of
each row's next one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nbllm.engines.local.prefix_cache import PrefixCache

__all__ = ["KVBatch", "TorchDecoder"]

#: One layer's (keys, values), each ``[rows, heads, tokens, dim]``.
Layers = list[tuple[Any, Any]]


def kv_nbytes(layers: Layers) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)


def _cache_of(layers: Layers | None) -> Any:
    """A transformers ``DynamicCache`` holding ``layers`` as they are (no copy)."""
    from transformers import DynamicCache

    if not layers:
        return DynamicCache()
    cache = DynamicCache(ddp_cache_data=[(k[..., :0, :], v[..., :0, :]) for k, v in layers])
    held: list[Any] = cache.layers
    for layer, (k, v) in zip(held, layers, strict=True):
        layer.keys, layer.values = k, v
    return cache


def _layers_of(cache: Any) -> Layers:
    return [(layer.keys, layer.values) for layer in cache.layers]


class TorchDecoder:
    """Prefill and sampling for one loaded model; ``prefix`` (or None) keeps recent prompts'
    keys and values for the next prompts that start the same way."""

    def __init__(self, model: Any, device: str, prefix: PrefixCache | None) -> None:
        self.model = model
        self.device = device
        self.prefix = prefix

    def prefill(self, tokens: Sequence[int]) -> tuple[Layers, Any, int]:
        """The keys and values of ``tokens``, the scores of the token after them, and how
        many of them came from the prefix cache."""
        import torch

        reused, entry = self.prefix.longest(tokens) if self.prefix is not None else (0, None)
        past = None
        if entry is not None:
            past = [(k[..., :reused, :], v[..., :reused, :]) for k, v in entry.kv]
        cache = _cache_of(past)
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.tensor([list(tokens[reused:])], device=self.device),
                position_ids=torch.arange(reused, len(tokens), device=self.device)[None],
                attention_mask=torch.ones(1, len(tokens), dtype=torch.long, device=self.device),
                cache=cache,
                use_cache=True,
            )
        layers = _layers_of(cache)
        if self.prefix is not None:
            self.prefix.put(tokens, layers, kv_nbytes(layers))
        return layers, out.logits[0, -1], reused

    def keep(self, tokens: Sequence[int], layers: Layers) -> None:
        """Offer a finished row's keys and values (of ``tokens``) to the prefix cache."""
        if self.prefix is not None:
            self.prefix.put(tokens, layers, kv_nbytes(layers))

    @staticmethod
    def pick(scores: Any, temperature: float, top_p: float, generator: Any) -> int:
        """The next token from one row's scores: the best one when ``temperature`` is 0,
        else drawn from the ``top_p`` nucleus of the tempered distribution."""
        import torch

        if temperature <= 0:
            return int(torch.argmax(scores))
        probs = torch.softmax(scores.float() / temperature, dim=-1)
        if top_p < 1:
            ordered, order = torch.sort(probs, descending=True)
            # Keep the smallest set of tokens whose probabilities add up to top_p.
            outside = torch.cumsum(ordered, dim=-1) - ordered > top_p
            ordered[outside] = 0
            probs = torch.zeros_like(probs).scatter_(-1, order, ordered)
        return int(torch.multinomial(probs, 1, generator=generator))


class KVBatch:
    """The rows decoding together (see the module's docstring)."""

    def __init__(self, model: Any, device: str) -> None:
        self.model = model
        self.device = device
        self.layers: Layers = []
        self.mask: Any = None  # [rows, width] of 0 / 1
        self.lengths: list[int] = []  # tokens each row holds (its next position)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    def join(self, layers: Layers, length: int) -> None:
        """Add a row whose keys and values (``[1, heads, length, dim]``) are ``layers``."""
        import torch
        from torch.nn import functional

        ones = torch.ones(1, length, dtype=torch.long, device=self.device)
        if not self.lengths:
            self.layers, self.mask, self.lengths = list(layers), ones, [length]
            return
        width = self.width
        if length > width:  # widen every row on the left
            grow = length - width
            self.layers = [
                (functional.pad(k, (0, 0, grow, 0)), functional.pad(v, (0, 0, grow, 0)))
                for k, v in self.layers
            ]
            self.mask = functional.pad(self.mask, (grow, 0))
            width = length
        pad = width - length
        self.layers = [
            (
                torch.cat([k, functional.pad(rk, (0, 0, pad, 0))]),
                torch.cat([v, functional.pad(rv, (0, 0, pad, 0))]),
            )
            for (k, v), (rk, rv) in zip(self.layers, layers, strict=True)
        ]
        self.mask = torch.cat([self.mask, functional.pad(ones, (pad, 0))])
        self.lengths.append(length)

    def step(self, tokens: Sequence[int]) -> Any:
        """Feed each row its token; the scores of each row's next token, ``[rows, vocab]``."""
        import torch

        rows = len(self.lengths)
        mask = torch.cat(
            [self.mask, torch.ones(rows, 1, dtype=torch.long, device=self.device)], dim=1
        )
        cache = _cache_of(self.layers)
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.tensor(tokens, device=self.device)[:, None],
                position_ids=torch.tensor(self.lengths, device=self.device)[:, None],
                attention_mask=mask,
                cache=cache,
                use_cache=True,
            )
        self.layers = _layers_of(cache)
        self.mask = mask
        self.lengths = [n + 1 for n in self.lengths]
        return out.logits[:, -1]

    def row(self, index: int) -> Layers:
        """A copy of row ``index``'s keys and values, ``[1, heads, its tokens, dim]``."""
        start = self.width - self.lengths[index]
        return [
            (k[index : index + 1, :, start:].clone(), v[index : index + 1, :, start:].clone())
            for k, v in self.layers
        ]

    def keep(self, indices: Sequence[int]) -> None:
        """Keep only the rows ``indices`` (in that order); drop the columns none of them uses."""
        import torch

        if not indices:
            self.layers, self.mask, self.lengths = [], None, []
            return
        if list(indices) == list(range(len(self.lengths))):
            return
        lengths = [self.lengths[i] for i in indices]
        cut = self.width - max(lengths)
        at = torch.tensor(list(indices), device=self.device)
        self.layers = [(k[at, :, cut:], v[at, :, cut:]) for k, v in self.layers]
        self.mask = self.mask[at, cut:]
        self.lengths = lengths
