"""The DeepSpeed engine: ``deepspeed.init_inference`` over the transformers model.

On a CUDA GPU DeepSpeed replaces supported layers with its fused inference kernels
(kernel injection). On a CPU it runs the model as it is (float32, no injection), which
is how the CPU tests run it. DeepSpeed's tensor parallelism needs one process per GPU
(its own launcher), so inside one Python process the model stays on one device.
"""

from __future__ import annotations

import logging
from typing import Any

from nbllm.engines.local.base import context_length_of, require
from nbllm.engines.local.phases import quiet_loading
from nbllm.engines.local.torch import TorchEngine, load_transformers
from nbllm.errors import EngineUnavailable

__all__ = ["DeepSpeedEngine"]


class DeepSpeedEngine(TorchEngine):
    """DeepSpeed inference with the dynamic batcher in front of its ``generate`` (no
    continuous batching or prefix cache: its injected kernels keep their own cache)."""

    name = "deepspeed"
    can_batch_continuously = False

    def _load(self) -> None:
        torch = require("torch", "local", self.name)
        with quiet_loading():  # importing DeepSpeed announces a CPU as a WARNING
            deepspeed = require("deepspeed", "deepspeed", self.name)
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.tokenizer, self.hf_model = load_transformers(self, self.checkpoint)
        self.context_length = context_length_of(self.hf_model.config, self.tokenizer)
        on_cuda = self.device == "cuda"
        try:
            self.ds_engine: Any = deepspeed.init_inference(
                self.hf_model,
                dtype=self.hf_model.dtype if on_cuda else torch.float32,
                replace_with_kernel_inject=on_cuda,
            )
        except Exception as exc:
            msg = f"deepspeed.init_inference failed for {self.model.name}: {exc!r}"
            raise EngineUnavailable(msg) from exc

    def _generator(self) -> Any:
        return self.ds_engine.module

    def _release(self) -> None:
        self.ds_engine = None
        super()._release()
