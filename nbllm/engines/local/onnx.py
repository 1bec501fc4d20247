"""The ONNX Runtime engine: a decoder graph with a key/value cache, run step by step.

The graph is exported once per model (``nbllm.engines.local.onnx_export``: the first use
needs torch, transformers and onnxscript, and takes a minute or two for the embedded
model) into the cache directory. Later loads read only that folder and need onnxruntime,
numpy and transformers' tokenizer, not torch.

On the CPU (the provider the session really got) requests are batched continuously and
reuse the keys and values of recent prompts, as in the torch engine
(``nbllm.engines.local.continuous``): the graph runs on each new prompt alone, after its
longest cached prefix, then once per token for every row together (``OnnxBackend``).

On CUDA, and with ``continuous=False``, each batch runs the graph once on the left-padded
prompts and once per new token, keeping the keys/values where the execution provider put
them. A row whose request was cancelled is treated as finished from the next token on, and
the batch ends once every row is finished or dropped; until then a dropped row is still
computed, as padding, with the rest.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from nbllm.engines.local.base import Generation, context_length_of, require
from nbllm.engines.local.batched import BatchedEngine, BatchWatch, pad_left
from nbllm.engines.local.kv_batch import Layers
from nbllm.engines.local.models import LocalModel, cache_entry
from nbllm.engines.local.onnx_export import GRAPH_FILE, LAYOUT_FILE, DecoderLayout, export_decoder
from nbllm.engines.local.phases import quiet_loading
from nbllm.errors import EngineUnavailable

__all__ = ["OnnxBackend", "OnnxEngine"]

_CPU = "CPUExecutionProvider"
_CUDA = "CUDAExecutionProvider"


class OnnxEngine(BatchedEngine):
    """ONNX Runtime on CPU or CUDA: batched continuously on the CPU, by the dynamic batcher
    on CUDA (see the module).

    ``describe()`` names the execution provider the session really runs on: with
    ``device="cuda"`` that may be the CPU when onnxruntime's CUDA libraries cannot load.
    """

    name = "onnx"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.continuous and self.provider == _CPU:
            self._batch_continuously(OnnxBackend(self))
        else:
            self.continuous = False

    def _prepare(self) -> None:
        require("onnxruntime", "onnx", "onnx")
        self.folder = export_decoder(self.model, on_phase=self.on_phase)

    def _load(self) -> None:
        ort = require("onnxruntime", "onnx", "onnx")
        folder = self.folder
        self.layout = DecoderLayout.read(folder)
        transformers = require("transformers", "local", self.name)
        try:
            with quiet_loading():
                self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        except Exception as exc:
            msg = f"onnx cannot load the tokenizer in {folder}: {type(exc).__name__}: {exc}"
            raise EngineUnavailable(msg) from exc
        wanted = [_CUDA, _CPU] if self.device == "cuda" else [_CPU]
        try:
            self.session = ort.InferenceSession(str(folder / GRAPH_FILE), providers=wanted)
        except Exception as exc:
            msg = f"onnxruntime cannot load {folder / GRAPH_FILE}: {type(exc).__name__}: {exc}"
            raise EngineUnavailable(msg) from exc
        self.context_length = self.layout.context_length or context_length_of(
            _checkpoint_config(self.model), self.tokenizer
        )
        # onnxruntime-gpu lists CUDA as available even where its libraries cannot load, and
        # then quietly runs on the CPU: what counts is what the session got.
        self.provider: str = self.session.get_providers()[0]
        self._output_device = "cuda" if self.provider == _CUDA else "cpu"
        names = [i.name for i in self.session.get_inputs()]
        if names != self.layout.input_names:
            msg = (
                f"the graph in {folder} does not take the inputs {LAYOUT_FILE} lists; "
                f"delete {folder}"
            )
            raise EngineUnavailable(msg)

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self.layout.eos_token_ids)

    def describe(self) -> str:
        text = f"{self.name} {self.model.name} on {self.provider}"
        if self.device == "cuda" and self.provider != _CUDA:
            text += " (CUDA was asked for but onnxruntime could not use it)"
        return text

    def _generate(
        self, prompts: Sequence[list[int]], generation: Generation, watch: BatchWatch
    ) -> list[list[int]]:
        ids, mask = pad_left(prompts, self.pad_token_id)
        input_ids = np.array(ids, dtype=np.int64)
        attention = np.array(mask, dtype=np.int64)
        # As transformers' generate does: left padding shifts no real token's position.
        positions = np.clip(attention.cumsum(-1) - 1, 0, None)
        layout = self.layout
        rows = len(prompts)
        past: list[Any] = [
            np.zeros((rows, layout.kv_heads, 0, layout.head_dim), dtype=np.float32)
        ] * len(layout.past_names)
        eos = np.array(self.eos_token_ids, dtype=np.int64)
        rng = np.random.default_rng(generation.seed)
        finished = np.zeros(rows, dtype=bool)
        new_tokens: list[np.ndarray] = []
        while True:
            logits, past = self._step(input_ids, attention, positions, past)
            token = _next_tokens(logits, generation, rng)
            token = np.where(finished, self.pad_token_id, token)
            new_tokens.append(token)
            ended = np.isin(token, eos)
            # A row's end-of-text token is not part of its answer; finished rows add padding.
            watch.generated(int((~finished & ~ended).sum()))
            finished |= ended | np.array(watch.dropped(), dtype=bool)
            if finished.all() or len(new_tokens) >= generation.max_new_tokens:
                break
            input_ids = token[:, None]
            attention = np.concatenate([attention, np.ones((rows, 1), dtype=np.int64)], axis=1)
            positions = positions[:, -1:] + 1
        out = np.stack(new_tokens, axis=1)
        return [self.strip_eos(row.tolist()) for row in out]

    def _step(
        self, input_ids: np.ndarray, attention: np.ndarray, positions: np.ndarray, past: list[Any]
    ) -> tuple[np.ndarray, list[Any]]:
        """One run of the graph; the keys/values stay where the provider put them."""
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", attention)
        binding.bind_cpu_input("position_ids", positions)
        for name, value in zip(self.layout.past_names, past, strict=True):
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.layout.present_names:
            binding.bind_output(name, self._output_device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy()[:, -1, :], list(outputs[1:])

    def _release(self) -> None:
        self.session = None
        if self.prefix is not None:
            self.prefix.clear()


class OnnxBackend:
    """``KVBackend`` for the decoder graph, keys and values as numpy arrays on the CPU."""

    def __init__(self, engine: OnnxEngine) -> None:
        self.engine = engine
        self.layout = engine.layout

    def forward(
        self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray, past: Layers | None
    ) -> tuple[Any, Layers]:
        layout = self.layout
        if past is None:
            empty = np.zeros((len(ids), layout.kv_heads, 0, layout.head_dim), dtype=np.float32)
            flat: list[Any] = [empty] * len(layout.past_names)
        else:
            flat = [array for pair in past for array in pair]
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        feed.update(zip(layout.past_names, (np.ascontiguousarray(a) for a in flat), strict=True))
        outputs = self.engine.session.run(None, feed)
        present = outputs[1:]
        return outputs[0][:, -1, :], list(zip(present[0::2], present[1::2], strict=True))

    def pad_left(self, array: Any, columns: int) -> Any:
        return np.pad(array, ((0, 0), (0, 0), (columns, 0), (0, 0))) if columns else array

    def cat_rows(self, arrays: Any) -> Any:
        return np.concatenate(list(arrays))

    def select(self, array: Any, rows: np.ndarray, start: int) -> Any:
        return array[rows, :, start:]

    def nbytes(self, array: Any) -> int:
        return int(array.nbytes)

    def pick(self, scores: Any, temperature: float, top_p: float, generator: Any) -> int:
        generation = Generation(temperature=temperature, top_p=top_p)
        return int(_next_tokens(np.asarray(scores)[None], generation, generator)[0])

    def generator(self, seed: int) -> Any:
        return np.random.default_rng(seed)


def _checkpoint_config(model: LocalModel) -> dict[str, Any] | None:
    """The ``config.json`` of ``model``'s transformers checkpoint, where it is at hand.

    For an export made before ``decoder.json`` held the context length: a GGUF file's
    conversion is read if it is still in the cache, never made for this.
    """
    folder = cache_entry(model, "transformers") if model.is_gguf else model.path
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _next_tokens(
    logits: np.ndarray, generation: Generation, rng: np.random.Generator
) -> np.ndarray:
    """One token per row: the most likely, or a temperature + top-p (nucleus) sample."""
    if generation.greedy:
        return logits.argmax(axis=-1).astype(np.int64)
    scaled = logits.astype(np.float64) / generation.temperature
    scaled -= scaled.max(axis=-1, keepdims=True)
    probs = np.exp(scaled)
    probs /= probs.sum(axis=-1, keepdims=True)
    order = np.argsort(-probs, axis=-1)
    ranked = np.take_along_axis(probs, order, axis=-1)
    # Keep the most likely tokens until they cover top_p (always at least the first).
    keep = np.cumsum(ranked, axis=-1) - ranked < generation.top_p
    ranked = np.where(keep, ranked, 0.0)
    ranked /= ranked.sum(axis=-1, keepdims=True)
    draws = rng.random((len(ranked), 1))
    picked = (np.cumsum(ranked, axis=-1) < draws).sum(axis=-1)
    picked = np.minimum(picked, keep.sum(axis=-1) - 1)
    return np.take_along_axis(order, picked[:, None], axis=-1)[:, 0].astype(np.int64)
