"""Exporting a transformers decoder once to an ONNX graph with a key/value cache.

The first use of a model by the onnx engine exports it (``torch.onnx.export(...,
dynamo=True)``; it needs torch, transformers and onnxscript, and takes a minute or two
for the embedded model) into the cache directory: ``decoder.onnx`` (+
``decoder.onnx.data``, the weights), the tokenizer, and ``decoder.json``, which
describes the graph (``DecoderLayout``, with the model's context length; exports made
before it was written there have none). The export is checked against torch before it
is kept.

One graph serves every step, the prompt (zero-length past) and each new token:

=====================================  ===========================================  ======
name                                   shape                                        dtype
=====================================  ===========================================  ======
input ``input_ids``                    batch, sequence                              int64
input ``attention_mask``               batch, past_sequence + sequence              int64
input ``position_ids``                 batch, sequence                              int64
input ``past.{layer}.key`` / value     batch, kv_heads, past_sequence, head_dim     float32
output ``logits``                      batch, 1, vocab_size (the last position)     float32
output ``present.{layer}.key`` / value batch, kv_heads, past_sequence + sequence,   float32
                                       head_dim
=====================================  ===========================================  ======
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nbllm.engines.local.base import context_length_of, end_of_text_ids, require
from nbllm.engines.local.models import (
    LocalModel,
    building,
    cache_entry,
    transformers_checkpoint,
)
from nbllm.engines.local.phases import PhaseCallback, PhaseReport, quiet_loading
from nbllm.errors import EngineUnavailable

__all__ = ["GRAPH_FILE", "LAYOUT_FILE", "DecoderLayout", "export_decoder"]

#: The graph's file name in the export folder (its weights are beside it, in ``.data``).
GRAPH_FILE = "decoder.onnx"
#: The file that describes the graph (``DecoderLayout``).
LAYOUT_FILE = "decoder.json"
#: Bumped when the graph's inputs or outputs change; an older export is then refused.
_FORMAT = 1
_CPU = "CPUExecutionProvider"
#: The export's progress, in steps: read the checkpoint, trace, write, check.
_EXPORT_STEPS = 4

_log = logging.getLogger("nbllm")

# Warnings the exporter emits on every export of a transformers decoder; none of them
# says anything about the graph it writes.
_EXPORT_WARNINGS = (
    (UserWarning, r"# The axis name: .* will not be used"),
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
)

# "torchvision is not installed" notes, and, at INFO level, a line per merged constant and
# hundreds of lines from onnxscript's optimizer (where the user's logging shows INFO).
_CHATTY_LOGGERS = ("torch.onnx._internal.exporter._registration", "onnx_ir", "onnxscript")


@dataclass(frozen=True, slots=True)
class DecoderLayout:
    """What the exported graph takes and gives (the contents of ``decoder.json``)."""

    layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    #: Tokens of prompt and answer the model holds; None where the export does not say.
    context_length: int | None = None

    @property
    def past_names(self) -> list[str]:
        return [f"past.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    @property
    def present_names(self) -> list[str]:
        return [f"present.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "position_ids", *self.past_names]

    @property
    def output_names(self) -> list[str]:
        return ["logits", *self.present_names]

    def to_json(self, **extra: Any) -> str:
        return json.dumps(
            {
                "format": _FORMAT,
                "graph": GRAPH_FILE,
                "dtype": "float32",
                "layers": self.layers,
                "kv_heads": self.kv_heads,
                "head_dim": self.head_dim,
                "vocab_size": self.vocab_size,
                "eos_token_ids": list(self.eos_token_ids),
                "context_length": self.context_length,
                "inputs": {
                    "input_ids": ["batch", "sequence"],
                    "attention_mask": ["batch", "past_sequence + sequence"],
                    "position_ids": ["batch", "sequence"],
                    "past.{layer}.key|value": ["batch", "kv_heads", "past_sequence", "head_dim"],
                },
                "outputs": {
                    "logits": ["batch", 1, "vocab_size"],
                    "present.{layer}.key|value": [
                        "batch",
                        "kv_heads",
                        "past_sequence + sequence",
                        "head_dim",
                    ],
                },
                **extra,
            },
            indent=2,
        )

    @classmethod
    def read(cls, folder: Path) -> DecoderLayout:
        try:
            data = json.loads((folder / LAYOUT_FILE).read_text())
            if data.get("format") != _FORMAT:
                msg = f"format {data.get('format')!r}, this version reads format {_FORMAT}"
                raise ValueError(msg)
            context = data.get("context_length")
            return cls(
                layers=int(data["layers"]),
                kv_heads=int(data["kv_heads"]),
                head_dim=int(data["head_dim"]),
                vocab_size=int(data["vocab_size"]),
                eos_token_ids=tuple(int(i) for i in data["eos_token_ids"]),
                context_length=None if context is None else int(context),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            msg = (
                f"the ONNX export in {folder} cannot be used ({type(exc).__name__}: {exc}); "
                f"delete that folder to export the model again"
            )
            raise EngineUnavailable(msg) from exc


def export_decoder(model: LocalModel, *, on_phase: PhaseCallback | None = None) -> Path:
    """The cache folder holding ``model``'s decoder graph, exported on first use.

    ``on_phase`` hears the conversion of a GGUF file ("converting"), then the export
    ("exporting", in steps: read, trace, save, check).
    """
    target = cache_entry(model, "onnx")
    with building(target) as scratch:
        if scratch is not None:
            _export(model, scratch, on_phase)
    return target


def _export(model: LocalModel, out: Path, on_phase: PhaseCallback | None) -> None:
    try:
        torch = require("torch", "local", "onnx")
        transformers = require("transformers", "local", "onnx")
        require("onnxscript", "onnx", "onnx")
    except EngineUnavailable as exc:
        msg = (
            f"the onnx engine exports {model.name} to ONNX on first use, which needs torch, "
            f"transformers and onnxscript (pip install 'nbllm[local,onnx]'); {exc}"
        )
        raise EngineUnavailable(msg) from exc
    checkpoint = transformers_checkpoint(model, on_phase=on_phase)
    _log.info(
        "exporting %s to ONNX once (a minute or two); later runs load it in seconds", model.name
    )
    report = PhaseReport(on_phase, "exporting", _EXPORT_STEPS)
    started = time.monotonic()
    try:
        report(0, "reading the checkpoint")
        with quiet_loading():
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(checkpoint))
            # Eager attention is plain matmul + softmax: every exporter and runtime handles it.
            hf_model = transformers.AutoModelForCausalLM.from_pretrained(
                str(checkpoint), dtype=torch.float32, attn_implementation="eager"
            ).eval()
        layout = _layout_of(hf_model, tokenizer)
        step = _decoder_step(torch, hf_model)
        example = _example_inputs(torch, layout, batch=2, sequence=5, past=3)
        report(1, "tracing the decoder")
        with torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(
                step,
                example,
                dynamo=True,
                verbose=False,
                input_names=layout.input_names,
                output_names=layout.output_names,
                dynamic_shapes=_dynamic_shapes(torch, layout),
            )
            report(2, "writing the graph")
            program.save(str(out / GRAPH_FILE), external_data=True)
        report(3, "checking the graph against torch")
        _check_export(torch, step, out / GRAPH_FILE, layout)
    except EngineUnavailable:
        raise
    except Exception as exc:
        reason = " ".join(str(exc).split())[:300]
        msg = f"exporting {model.name} to ONNX failed: {type(exc).__name__}: {reason}"
        raise EngineUnavailable(msg) from exc
    with quiet_loading():
        tokenizer.save_pretrained(str(out))
    export_s = round(time.monotonic() - started, 1)
    (out / LAYOUT_FILE).write_text(
        layout.to_json(
            model=model.identity,
            exported_with={"torch": torch.__version__, "transformers": transformers.__version__},
            export_s=export_s,
        )
    )
    report(_EXPORT_STEPS, "exported")
    _log.info("exported %s to ONNX in %.0f s, into %s", model.name, export_s, out.parent)


def _layout_of(hf_model: Any, tokenizer: Any) -> DecoderLayout:
    config = hf_model.config.get_text_config()
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return DecoderLayout(
        layers=int(config.num_hidden_layers),
        kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=int(head_dim),
        vocab_size=int(config.vocab_size),
        eos_token_ids=tuple(end_of_text_ids(hf_model, tokenizer)),
        context_length=context_length_of(hf_model.config, tokenizer),
    )


def _decoder_step(torch: Any, hf_model: Any) -> Any:
    """``hf_model`` as a module of flat tensors.

    (ids, mask, positions, *past) -> (logits of the last position, *present).
    """
    import inspect

    # transformers 5 renamed ``past_key_values`` to ``cache``.
    parameters = inspect.signature(type(hf_model).forward).parameters
    cache_argument = "cache" if "cache" in parameters else "past_key_values"

    class PastKeyValues:
        """The cache interface the attention layers call: append this step's keys/values."""

        def __init__(self, past: Sequence[Any]) -> None:
            self.past = list(past)
            self.present: list[Any] = list(past)

        def update(self, keys: Any, values: Any, layer_idx: int, *_: Any, **__: Any) -> Any:
            keys = torch.cat([self.past[2 * layer_idx], keys], dim=-2)
            values = torch.cat([self.past[2 * layer_idx + 1], values], dim=-2)
            self.present[2 * layer_idx], self.present[2 * layer_idx + 1] = keys, values
            return keys, values

    class DecoderStep(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hf_model = hf_model

        def forward(
            self, input_ids: Any, attention_mask: Any, position_ids: Any, *past: Any
        ) -> Any:
            # The causal + padding mask is built here, as a 4-D additive mask that
            # transformers takes as it is, so its own mask code (data-dependent shortcuts)
            # stays out of the graph.
            sequence, total = input_ids.shape[1], attention_mask.shape[1]
            query_at = torch.arange(sequence, device=input_ids.device) + (total - sequence)
            key_at = torch.arange(total, device=input_ids.device)
            allowed = (key_at[None, :] <= query_at[:, None])[None, None] & (
                attention_mask[:, None, None, :] > 0
            )
            mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(
                ~allowed, torch.finfo(torch.float32).min
            )
            cache = PastKeyValues(past)
            out = self.hf_model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=True,
                logits_to_keep=1,
                **{cache_argument: cache},
            )
            return (out.logits, *cache.present)

    return DecoderStep().eval()


def _example_inputs(
    torch: Any, layout: DecoderLayout, *, batch: int, sequence: int, past: int
) -> tuple[Any, ...]:
    # Sizes of 0 and 1 would be fixed into the graph by torch.export: the example avoids them.
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, layout.vocab_size, (batch, sequence), generator=generator)
    mask = torch.ones(batch, past + sequence, dtype=torch.int64)
    mask[0, :2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    kv = (batch, layout.kv_heads, past, layout.head_dim)
    return (
        ids,
        mask,
        positions,
        *(torch.randn(kv, generator=generator) for _ in layout.past_names),
    )


def _dynamic_shapes(torch: Any, layout: DecoderLayout) -> dict[str, Any]:
    batch = torch.export.Dim("batch")
    sequence = torch.export.Dim("sequence")
    past = torch.export.Dim("past_sequence")
    total = torch.export.Dim("total")  # past + sequence; torch.export infers the relation
    return {
        "input_ids": {0: batch, 1: sequence},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: sequence},
        "past": tuple({0: batch, 2: past} for _ in layout.past_names),
    }


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's known warnings and its chatty loggers."""
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for category, message in _EXPORT_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _check_export(torch: Any, step: Any, graph: Path, layout: DecoderLayout) -> None:
    """Run the graph on a padded prompt and one more token; it must agree with torch."""
    ort = require("onnxruntime", "onnx", "onnx")
    session = ort.InferenceSession(str(graph), providers=[_CPU])
    prompt = _example_inputs(torch, layout, batch=2, sequence=6, past=0)
    with torch.no_grad():
        expected = step(*prompt)
    feed = dict(zip(layout.input_names, (t.numpy() for t in prompt), strict=True))
    got = session.run(None, feed)
    token = expected[0][:, -1].argmax(-1, keepdim=True)
    mask = torch.cat([prompt[1], torch.ones_like(token)], dim=-1)
    positions = prompt[2][:, -1:] + 1
    with torch.no_grad():
        expected_next = step(token, mask, positions, *expected[1:])
    feed = {"input_ids": token.numpy(), "attention_mask": mask.numpy()}
    feed["position_ids"] = positions.numpy()
    feed.update(zip(layout.past_names, got[1:], strict=True))
    got_next = session.run(None, feed)
    for name, ours, theirs in (("prompt", got, expected), ("next token", got_next, expected_next)):
        if len(ours) != len(theirs):
            msg = f"the graph returns {len(ours)} outputs for {name}, torch {len(theirs)}"
            raise ValueError(msg)
        diff = max(float(np.abs(o - t.numpy()).max()) for o, t in zip(ours, theirs, strict=True))
        if diff > 1e-3:
            msg = f"the graph's outputs differ from torch's by up to {diff:.2g} ({name})"
            raise ValueError(msg)
