"""The PyTorch engine: a transformers model, batched continuously, with a prefix cache.

By default (``continuous=True``) requests join a running batch between any two tokens and
leave it when they end (``nbllm.engines.local.continuous``), and each prompt reuses the keys
and values of the longest prefix it shares with recent prompts and answers
(``nbllm.engines.local.prefix_cache``; ``prefix_cache=False`` turns that off). The answer's
``cached_tokens`` says how many prompt tokens were reused.

With ``continuous=False`` (and under DeepSpeed, which wraps ``generate``) requests go through
the dynamic batcher to transformers' ``generate``, one fixed batch at a time. A stopping
criterion watches each step of ``generate``: it counts the tokens added and stops the rows
whose requests were cancelled, so a batch whose every request was given up ends at its next
token. A row stopped that way still takes part, as padding, in the steps left of a batch that
others keep going: transformers cannot take a row out of a running batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nbllm.engines.local.base import Generation, LocalEngine, context_length_of, require
from nbllm.engines.local.batched import BatchedEngine, BatchWatch, pad_left
from nbllm.engines.local.models import transformers_checkpoint
from nbllm.engines.local.phases import quiet_loading
from nbllm.engines.local.torch_kv import TorchBackend
from nbllm.errors import EngineUnavailable

__all__ = ["TorchEngine"]


def load_transformers(
    engine: LocalEngine, checkpoint: Path, *, dtype: Any = None
) -> tuple[Any, Any]:
    """Tokenizer and model of ``engine.model`` from ``checkpoint``, on ``engine.device``."""
    torch = require("torch", "local", engine.name)
    transformers = require("transformers", "local", engine.name)
    if dtype is None:
        dtype = torch.float32 if engine.device == "cpu" else torch.float16
        if engine.device == "cuda" and torch.cuda.is_bf16_supported():
            dtype = torch.bfloat16
    try:
        with quiet_loading():
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(checkpoint))
            model = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=dtype)
        model.to(engine.device)
    except Exception as exc:
        msg = f"{engine.name} cannot load {engine.model.name}: {type(exc).__name__}: {exc}"
        raise EngineUnavailable(msg) from exc
    model.eval()
    return tokenizer, model


class TorchEngine(BatchedEngine):
    """A transformers model on CPU, CUDA or MPS, batched continuously (see the module)."""

    name = "torch"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.continuous and self.can_batch_continuously:
            self._batch_continuously(TorchBackend(self.hf_model, self.device))
        else:
            self.continuous = False

    def _prepare(self) -> None:
        require("torch", "local", self.name)
        require("transformers", "local", self.name)
        self.checkpoint = transformers_checkpoint(self.model, on_phase=self.on_phase)

    def _load(self) -> None:
        self.tokenizer, self.hf_model = load_transformers(self, self.checkpoint)
        self.context_length = context_length_of(self.hf_model.config, self.tokenizer)

    def _generator(self) -> Any:
        """What ``generate`` is called on (DeepSpeed wraps the model)."""
        return self.hf_model

    def _generate(
        self, prompts: Sequence[list[int]], generation: Generation, watch: BatchWatch
    ) -> list[list[int]]:
        import torch
        import transformers

        ids, mask = pad_left(prompts, self.pad_token_id)
        device = self.device
        options: dict[str, Any] = {
            "max_new_tokens": generation.max_new_tokens,
            "do_sample": not generation.greedy,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_ids,
            "stopping_criteria": transformers.StoppingCriteriaList(
                [_step_watch(watch, self.eos_token_ids, len(prompts), device)]
            ),
        }
        if generation.greedy:
            # The model's own sampling defaults would only draw a warning in greedy mode.
            options.update(temperature=None, top_p=None, top_k=None)
        else:
            options.update(temperature=generation.temperature, top_p=generation.top_p)
            if generation.seed is not None:
                torch.manual_seed(generation.seed)
        with torch.inference_mode():
            out = self._generator().generate(
                input_ids=torch.tensor(ids, device=device),
                attention_mask=torch.tensor(mask, device=device),
                **options,
            )
        width = len(ids[0])
        return [self.strip_eos(row[width:].tolist()) for row in out]

    def _release(self) -> None:
        self.hf_model = None
        if isinstance(self.backend, TorchBackend):
            self.backend.model = None  # nothing holds the model any more
        if self.prefix is not None:
            self.prefix.clear()


def _step_watch(watch: BatchWatch, eos_ids: Sequence[int], rows: int, device: str) -> Any:
    """A stopping criterion for ``generate`` that reports each step to ``watch`` and stops
    the rows it drops (the whole batch, once every row is finished or dropped)."""
    import torch
    import transformers

    eos = torch.tensor(list(eos_ids), device=device)
    keep_all = torch.zeros(rows, dtype=torch.bool, device=device)

    class StepWatch(transformers.StoppingCriteria):
        finished = keep_all

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            ended = torch.isin(input_ids[:, -1], eos)
            # A row's end-of-text token is not part of its answer; finished rows add padding.
            watch.generated(int((~self.finished & ~ended).sum()))
            self.finished = self.finished | ended
            dropped = watch.dropped()
            if not any(dropped):
                return keep_all
            stop = torch.tensor(dropped, device=input_ids.device)
            self.finished = self.finished | stop
            return stop

    return StepWatch()
