"""Training memory, estimated from the params before a model is built.

A model that cannot fit the machine (or the GPU) is refused with the estimate and how to shrink it, instead of
hanging in allocation.

The estimate is deliberately plain: fp32 weights, gradients and AdamW's two moments (16 bytes a parameter),
activations at the micro-batch (about 34 bytes per token, layer and width in 16-bit with fused attention, as in
Korthikanti et al., "Reducing Activation Recomputation"; twice that in fp32; a layer's input only with gradient
checkpointing) and the logits with their gradient. It refuses only a model that exceeds the whole memory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from tasks.plumbing.errors import PipelineError
from tasks.plumbing.params import GPT2_DEFAULT_POSITIONS, Params

# GPT2Config's defaults, for the keys model.config leaves out (GPT-2 124M).
GPT2_DEFAULTS = {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": GPT2_DEFAULT_POSITIONS}
GPT2_VOCAB = 50_257
STATE_BYTES = 16  # per parameter: fp32 weight, gradient, AdamW's exp_avg and exp_avg_sq
ACTIVATION_BYTES = 34  # per token, layer and unit of width, 16-bit
GB = 1e9


@dataclass(frozen=True)
class Estimate:
    parameters: int
    state: int  # bytes: weights, gradients, optimizer state
    activations: int  # bytes: the layers' activations and the logits at one micro-batch

    @property
    def total(self) -> int:
        return self.state + self.activations


def shape(params: Params) -> dict[str, int] | None:
    """The model shape the training will build, or None where only loading the model would tell.

    n_layer, n_embd, n_positions, n_inner and vocab_size the training will build, or None where only loading the
    model would tell (a hub id)."""
    if params.model.init == "scratch":
        config = {**GPT2_DEFAULTS, **params.model.gpt2_config()}
        vocab = params.tokenizer.vocab_size if params.tokenizer.kind != "pretrained" else GPT2_VOCAB
    else:
        saved = Path(params.model.name_or_path) / "config.json"
        if not saved.is_file():
            return None
        config = {**GPT2_DEFAULTS, **json.loads(saved.read_text(encoding="utf-8")), **params.model.gpt2_config()}
        vocab = config.get("vocab_size", GPT2_VOCAB)
    width = config["n_embd"]
    return {
        "n_layer": config["n_layer"],
        "n_embd": width,
        "n_positions": config["n_positions"],
        "n_inner": config.get("n_inner") or 4 * width,
        "vocab_size": vocab,
    }


def estimate(params: Params, dims: dict[str, int], fp32: bool) -> Estimate:
    """The bytes one training process needs for a model of dims at train.batch_size x tokenizer.block_size."""
    layers, width, inner, vocab = dims["n_layer"], dims["n_embd"], dims["n_inner"], dims["vocab_size"]
    per_layer = 4 * width * width + 2 * width * inner + 9 * width + inner  # attention, MLP, biases, two norms
    count = layers * per_layer + (vocab + dims["n_positions"]) * width + 2 * width
    tokens = params.train.batch_size * params.tokenizer.block_size
    scale = 2 if fp32 else 1
    if params.train.gradient_checkpointing:
        layer_bytes = tokens * width * (2 * layers + ACTIVATION_BYTES)  # each layer's input, one layer in full
    else:
        layer_bytes = tokens * width * ACTIVATION_BYTES * layers
    logits = tokens * vocab * 4 * 2  # fp32 logits and their gradient
    return Estimate(count, count * STATE_BYTES, layer_bytes * scale + logits)


def machine_bytes(device: str) -> int:
    """The memory training can use: the first GPU's, or this machine's physical memory."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_properties(0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(params: Params, device: str, available: int | None = None, fp32: bool = True) -> Estimate | None:
    """Refuse a training that needs more memory than there is.

    Refuse (exit 2, before any work) a training that needs more memory than `available` (default: the device's),
    naming the estimate and what shrinks it; train.check_memory: false skips the check."""
    dims = shape(params)
    if dims is None or not params.train.check_memory:
        return None
    needed = estimate(params, dims, fp32)
    available = machine_bytes(device) if available is None else available
    if needed.total > available:
        where = "the GPU" if device == "cuda" else "this machine"
        raise PipelineError(
            f"model.config: training needs about {needed.total / GB:.1f} GB ({needed.parameters / 1e9:.2f} B "
            f"parameters: {needed.state / GB:.1f} GB of weights, gradients and AdamW state; "
            f"{needed.activations / GB:.1f} GB of activations at train.batch_size {params.train.batch_size} x "
            f"tokenizer.block_size {params.tokenizer.block_size}), more than the {available / GB:.1f} GB {where} "
            "has; lower model.config.n_layer or n_embd, or train.batch_size (raise train.grad_accum to keep the "
            "batch), or set train.gradient_checkpointing: true; train.check_memory: false trains anyway"
        )
    return needed
