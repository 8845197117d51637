"""Training memory, estimated from the params before a model is built.

A model that cannot fit the machine (or the GPU) is refused with the estimate and how to shrink it, instead of
hanging in allocation.

The estimate counts fp32 weights, gradients and AdamW's two moments (16 bytes a parameter; with train.method lora
only the adapters train, and a frozen parameter is its fp32 weight alone, 4 bytes), what autograd keeps of
each layer at the micro-batch (counted tensor by tensor from transformers' GPT-2, at the byte size of the precision
the run computes in: 4 in fp32, 2 under bf16 or fp16 autocast; a layer's input only with gradient checkpointing), and
what the loss path creates: the whole fp32 logits and their gradient when an FP8 head computes them whole, one
chunk's worth with the chunked loss, none with cut-cross-entropy's kernel (only its own buffers). Dropout's masks
are left out (the recipes pretrain without dropout), but for LoRA's, on the adapters' inputs; torch.compile only
lowers the count. It refuses only a model that exceeds the whole memory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from tasks.plumbing.errors import PipelineError
from tasks.plumbing.params import GPT2_DEFAULT_POSITIONS, Params
from tasks.training.loss import chunk_tokens
from tasks.training.model import padded_vocab

# GPT2Config's defaults, for the keys model.config leaves out (GPT-2 124M).
GPT2_DEFAULTS = {
    "n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": GPT2_DEFAULT_POSITIONS, "activation_function": "gelu_new"
}  # fmt: skip
GPT2_VOCAB = 50_257
STATE_BYTES = 16  # per parameter: fp32 weight, gradient, AdamW's exp_avg and exp_avg_sq
WEIGHT_BYTES = 4  # per frozen parameter (LoRA's): the fp32 weight alone
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}  # what an activation takes: autocast computes in 16 bits
# What autograd keeps of one GPT2Block (sdpa attention) per token, in tensors of the width, as
# torch.autograd.graph.saved_tensors_hooks counts them: the two layer norms' inputs, from the residual stream, which
# stays fp32 under autocast; in the compute dtype the layer norms' outputs (the projections' inputs), and attention's
# q, k, v (the qkv projection's output), its contiguous copies of k and v, its output and the copy c_proj takes.
RESIDUAL_SAVED = 2
COMPUTE_SAVED = 2 + 7
# Tensors of the MLP's width it keeps: the up-projection's output and the activation's (the down-projection's
# input), and the intermediates of an activation transformers composes of several ops (one op keeps none).
MLP_SAVED = 2
ACTIVATION_SAVED = {"gelu_new": 3, "gelu_accurate": 3, "gelu_fast": 6, "quick_gelu": 1}
GB = 1e9


@dataclass(frozen=True)
class Estimate:
    parameters: int
    state: int  # bytes: weights, gradients, optimizer state
    activations: int  # bytes: what autograd keeps of the layers at one micro-batch
    loss: int  # bytes: the logits and buffers the loss path creates

    @property
    def total(self) -> int:
        return self.state + self.activations + self.loss


def shape(params: Params) -> dict[str, int] | None:
    """The model shape the training will build, or None where only loading the model would tell.

    n_layer, n_embd, n_positions, n_inner, vocab_size and mlp_saved (the MLP's tensors autograd keeps) the training
    will build, or None where only loading the model would tell (a hub id)."""
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
        "mlp_saved": MLP_SAVED + ACTIVATION_SAVED.get(config["activation_function"], 0),
    }


def loss_bytes(params: Params, dims: dict[str, int], tokens: int, compute: int, device: str) -> int:
    """The bytes the loss path (tasks/training/loss.py) creates at `tokens` tokens, computing in `compute` bytes."""
    width, vocab, rows = dims["n_embd"], dims["vocab_size"], padded_vocab(dims["vocab_size"])
    if params.train.fp8_lm_head:  # the head's whole logits, in fp32, and their gradient
        return tokens * vocab * 4 * 2
    if params.train.loss_kernel == "cut_cross_entropy" and device == "cuda":  # elsewhere resolve_kernel chunks
        # the logits stay on chip: the hidden states and the weight in the compute dtype, their gradients, and a
        # log-sum-exp a token
        return (tokens + vocab) * width * compute * 2 + tokens * 4
    cast = compute if compute < 4 else 0  # 16-bit copies beside the fp32 ones
    chunk = min(tokens, chunk_tokens(rows))
    # one chunk's fp32 logits and their gradient; the hidden states' gradient (fp32), the weight's gradient and one
    # chunk's share of it in fp32 (none for LoRA's frozen embeddings, only the weight's cast)
    weight = rows * width * (8 + 2 * cast) if params.train.method == "full" else rows * width * cast
    return chunk * rows * (8 + cast) + tokens * width * 4 + weight


def adapted_layers(params: Params, dims: dict[str, int]) -> list[tuple[int, int]]:
    """(inputs, outputs) of each layer of a block that train.lora adapts (c_proj: attention's output and the MLP's)."""
    width, inner = dims["n_embd"], dims["n_inner"]
    layers = {"c_attn": [(width, 3 * width)], "c_proj": [(width, width), (inner, width)], "c_fc": [(width, inner)]}
    return [shape for name in params.train.lora.target_modules for shape in layers[name]]


def lora_parameters(params: Params, dims: dict[str, int]) -> int:
    """The adapters' parameters: rank x (inputs + outputs) of each adapted layer, in every block."""
    return dims["n_layer"] * params.train.lora.rank * sum(sum(shape) for shape in adapted_layers(params, dims))


def estimate(params: Params, dims: dict[str, int], precision: str = "fp32", device: str = "cpu") -> Estimate:
    """The bytes one training process needs for a model of dims at train.batch_size x tokenizer.block_size.

    precision: the one the run computes in (fp32, bf16 or fp16), on `device`."""
    layers, width, inner, vocab = dims["n_layer"], dims["n_embd"], dims["n_inner"], dims["vocab_size"]
    per_layer = 4 * width * width + 2 * width * inner + 9 * width + inner  # attention, MLP, biases, two norms
    count = layers * per_layer + (vocab + dims["n_positions"]) * width + 2 * width
    tokens = params.train.batch_size * params.tokenizer.block_size
    compute = PRECISION_BYTES[precision]
    layer = RESIDUAL_SAVED * width * 4 + (COMPUTE_SAVED * width + dims["mlp_saved"] * inner) * compute
    trainable = count
    if params.train.method == "lora":
        # A frozen layer keeps no input for its weight's gradient, but its adapter keeps it instead (counted above);
        # beside it each adapter's rank-wide middle and, with dropout, the masks of its fp32 input: a byte an input
        # on CUDA, whose fused dropout keeps booleans, 4 on the CPU, whose dropout multiplies by an fp32 mask.
        adapted = adapted_layers(params, dims)
        mask = (1 if device == "cuda" else 4) if params.train.lora.dropout else 0
        layer += len(adapted) * params.train.lora.rank * compute + sum(inputs for inputs, _ in adapted) * mask
        trainable = lora_parameters(params, dims)
        count += trainable
    # with checkpointing each layer's input (the fp32 residual stream) and one layer in full
    kept = layers * width * 4 + layer if params.train.gradient_checkpointing else layers * layer
    weights_cast = count * compute if compute < 4 else 0  # autocast's 16-bit copies of the weights, kept for backward
    activations = tokens * (kept + width * 4) + weights_cast  # and the final layer norm's input
    state = count * WEIGHT_BYTES + trainable * (STATE_BYTES - WEIGHT_BYTES)
    return Estimate(count, state, activations, loss_bytes(params, dims, tokens, compute, device))


def machine_bytes(device: str) -> int:
    """The memory training can use: the first GPU's, or this machine's physical memory."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_properties(0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(params: Params, device: str, available: int | None = None, precision: str = "fp32") -> Estimate | None:
    """Refuse a training that needs more memory than there is.

    Refuse (exit 2, before any work) a training that needs more memory than `available` (default: the device's) in
    `precision` (the one the run computes in), naming the estimate and what shrinks it; train.check_memory: false
    skips the check."""
    dims = shape(params)
    if dims is None or not params.train.check_memory:
        return None
    needed = estimate(params, dims, precision, device)
    available = machine_bytes(device) if available is None else available
    if needed.total > available:
        where = "the GPU" if device == "cuda" else "this machine"
        raise PipelineError(
            f"model.config: training needs about {needed.total / GB:.1f} GB ({needed.parameters / 1e9:.2f} B "
            f"parameters: {needed.state / GB:.1f} GB of weights, gradients and AdamW state; "
            f"{needed.activations / GB:.1f} GB of activations in {precision} and {needed.loss / GB:.1f} GB for the "
            f"loss at train.batch_size {params.train.batch_size} x tokenizer.block_size "
            f"{params.tokenizer.block_size}), more than the {available / GB:.1f} GB {where} "
            "has; lower model.config.n_layer or n_embd, or train.batch_size (raise train.grad_accum to keep the "
            "batch), or set train.gradient_checkpointing: true"
            + (" or train.method: lora (adapters on frozen weights)" if params.train.method == "full" else "")
            + "; train.check_memory: false trains anyway"
        )
    return needed
