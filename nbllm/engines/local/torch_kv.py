"""The torch side of a continuous batch (``nbllm.engines.local.kv_batch``): a transformers
causal model run on explicit keys and values, positions and mask."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from nbllm.engines.local.kv_batch import Layers

__all__ = ["TorchBackend"]


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


class TorchBackend:
    """``KVBackend`` for a transformers model on ``device``."""

    def __init__(self, model: Any, device: str) -> None:
        self.model = model
        self.device = device

    def forward(
        self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray, past: Layers | None
    ) -> tuple[Any, Layers]:
        import torch

        cache = _cache_of(past)
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.from_numpy(ids).to(self.device),
                position_ids=torch.from_numpy(positions).to(self.device),
                attention_mask=torch.from_numpy(mask).to(self.device),
                cache=cache,
                use_cache=True,
            )
        held: list[Any] = cache.layers
        return out.logits[:, -1], [(layer.keys, layer.values) for layer in held]

    def pad_left(self, array: Any, columns: int) -> Any:
        from torch.nn import functional

        return functional.pad(array, (0, 0, columns, 0)) if columns else array

    def cat_rows(self, arrays: Sequence[Any]) -> Any:
        import torch

        return torch.cat(list(arrays))

    def select(self, array: Any, rows: np.ndarray, start: int) -> Any:
        import torch

        return array[torch.from_numpy(rows).to(array.device), :, start:]

    def nbytes(self, array: Any) -> int:
        return int(array.numel() * array.element_size())

    def pick(self, scores: Any, temperature: float, top_p: float, generator: Any) -> int:
        """The best token when ``temperature`` is 0, else one drawn from the ``top_p``
        nucleus of the tempered distribution."""
        import torch

        if temperature <= 0:
            return int(torch.argmax(scores))
        probs = torch.softmax(scores.float().cpu() / temperature, dim=-1)
        if top_p < 1:
            ordered, order = torch.sort(probs, descending=True)
            # Keep the smallest set of tokens whose probabilities add up to top_p.
            outside = torch.cumsum(ordered, dim=-1) - ordered > top_p
            ordered[outside] = 0
            probs = torch.zeros_like(probs).scatter_(-1, order, ordered)
        return int(torch.multinomial(probs, 1, generator=generator))

    def generator(self, seed: int) -> Any:
        import torch

        made = torch.Generator(device="cpu")
        made.manual_seed(seed % (1 << 63))
        return made
