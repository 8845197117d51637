"""The training loss of a causal LM computed from the hidden states, a chunk of tokens at a time.

transformers' loss takes the logits of the whole batch (batch x block x vocabulary; 16 x 1024 x 50257 for GPT-2
124M, 1.6 GB in bf16) and upcasts all of them to fp32 (3.3 GB more) before the cross-entropy; backward keeps them
too. Here the output projection, the fp32 log-softmax and its gradient are done for one chunk of tokens at a
time, and the gradients of the hidden states and of the projection's weight are computed in the same pass:
the full logits never exist. The vocabulary may be padded (rows past `vocab_size` in the weight, for matmul
shapes the GPU likes): padded columns are masked to -inf, so the loss is the unpadded model's exactly.
On a GPU the same loss can come from cut-cross-entropy's fused kernel (train.loss_kernel), or from an FP8
output projection's whole logits (train.fp8_lm_head).
"""

from __future__ import annotations

import math
import sys
import types
from typing import Any

import torch

from tasks.plumbing.errors import PipelineError

IGNORE_INDEX = -100  # labels that take no part in the loss (transformers' convention)
CHUNK_LOGITS = 1 << 25  # logits in one chunk: 128 MiB in fp32, whatever the vocabulary


def chunk_tokens(vocab_rows: int) -> int:
    """Tokens per chunk: as many as keep one chunk's fp32 logits within CHUNK_LOGITS, a multiple of 128."""
    return max(128, CHUNK_LOGITS // vocab_rows // 128 * 128)


def _compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype the projection runs in: autocast's when it is on (what lm_head would have used), else dtype."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over valid targets of -log softmax(hidden @ weight.T)[target] / divisor, chunk by chunk."""

    @staticmethod
    def forward(
        ctx, hidden, weight, targets, vocab_size: int, divisor, chunk: int, wants_grad: bool, weight_grad: bool
    ):
        device_type = hidden.device.type
        compute = _compute_dtype(device_type, hidden.dtype)
        with torch.autocast(device_type, enabled=False), torch.no_grad():
            w = weight.to(compute)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_hidden = torch.empty_like(hidden) if wants_grad else None
            # a frozen weight (LoRA's, which leaves the embeddings as they are) needs no gradient
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if weight_grad else None
            for start in range(0, hidden.shape[0], chunk):
                h, t = hidden[start : start + chunk].to(compute), targets[start : start + chunk]
                logits = (h @ w.T).float()
                if vocab_size < logits.shape[1]:
                    logits[:, vocab_size:] = -math.inf
                valid = t != IGNORE_INDEX
                safe = torch.where(valid, t, 0)
                lse = torch.logsumexp(logits, dim=1)
                total += ((lse - logits.gather(1, safe[:, None]).squeeze(1)) * valid).sum()
                if wants_grad:  # d loss / d logits = softmax - one_hot(target), for valid rows only
                    grad = torch.exp(logits.sub_(lse[:, None]))
                    grad[torch.arange(len(t), device=t.device), safe] -= 1.0
                    grad.mul_((valid / divisor)[:, None])
                    grad = grad.to(compute)
                    grad_hidden[start : start + chunk] = (grad @ w).to(hidden.dtype)
                    if weight_grad:
                        grad_weight += (grad.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / divisor

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_weight = None if grad_weight is None else (grad_weight * grad_output).to(ctx.weight_dtype)
        return grad_hidden * grad_output, grad_weight, None, None, None, None, None, None


def causal_targets(labels: torch.Tensor, num_items_in_batch, device) -> tuple[torch.Tensor, Any]:
    """transformers' causal-LM targets (labels shifted by one, IGNORE_INDEX past the end), flat, and the divisor:
    the count of valid targets, or num_items_in_batch when the Trainer accumulates gradients."""
    targets = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1)
    divisor = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE_INDEX).sum().clamp(min=1)
    if torch.is_tensor(divisor):
        divisor = divisor.to(device, torch.float32)
    return targets, divisor


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_size: int, num_items_in_batch=None
) -> torch.Tensor:
    """transformers' causal-LM loss, computed chunk by chunk from the last hidden states.

    transformers' causal-LM loss (labels shifted by one inside, IGNORE_INDEX skipped; the mean over the valid
    targets, or their sum over num_items_in_batch when the Trainer accumulates gradients) from the last hidden
    states (batch, block, width) and the output projection's weight (vocabulary rows, width)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    targets, divisor = causal_targets(labels, num_items_in_batch, flat.device)
    # Inside the Function grad mode is off: whether backward will come is decided here.
    wants_grad = torch.is_grad_enabled() and (flat.requires_grad or weight.requires_grad)
    weight_grad = torch.is_grad_enabled() and weight.requires_grad
    chunk = chunk_tokens(weight.shape[0])
    return _LinearCrossEntropy.apply(flat, weight, targets, vocab_size, divisor, chunk, wants_grad, weight_grad)


def fused_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_size: int, num_items_in_batch=None
) -> torch.Tensor:
    """The same loss by cut-cross-entropy's fused kernel (CUDA): the logits live in the GPU's on-chip memory only.

    The kernel takes the projection in the compute dtype (autocast's) and the unpadded rows of the weight."""
    from cut_cross_entropy import linear_cross_entropy as cut

    flat = hidden.reshape(-1, hidden.shape[-1])
    targets, divisor = causal_targets(labels, num_items_in_batch, flat.device)
    compute = _compute_dtype(flat.device.type, flat.dtype)
    summed = cut(flat.to(compute), weight[:vocab_size].to(compute), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return summed.float() / divisor


def logits_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, num_items_in_batch=None):
    """The same loss from logits the output projection computed whole (an FP8 lm_head computes them itself): the
    padded columns left out, the softmax in fp32."""
    flat = logits.reshape(-1, logits.shape[-1])[:, :vocab_size].float()
    targets, divisor = causal_targets(labels, num_items_in_batch, flat.device)
    return torch.nn.functional.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="sum") / divisor


def resolve_kernel(kernel: str, device: str) -> str:
    """The loss kernel this run uses (train.loss_kernel): cut-cross-entropy's on CUDA when installed, else the
    chunked loss."""
    if kernel == "chunked":
        return kernel
    if device != "cuda":  # its kernel is Triton's, for the GPU; the chunked loss is the same loss
        print(
            f"note: train.loss_kernel: {kernel} runs on CUDA; on the {device} the chunked loss is used", file=sys.stderr
        )
        return "chunked"
    try:
        import cut_cross_entropy  # noqa: F401
    except ImportError:
        raise PipelineError(
            f"train.loss_kernel: {kernel} is not installed: pip install 'gpt2-pipeline[kernels]', or set it to chunked"
        ) from None
    return kernel


def use_training_loss(model, vocab_size: int, kernel: str = "chunked", through_head: bool = False) -> None:
    """Make a GPT2LMHeadModel compute its training loss from the hidden states, by `kernel` (train.loss_kernel).

    Only the first vocab_size columns count. through_head: from the logits of the model's lm_head module whole (an
    FP8 module, whose weight alone is not what it computes with). Forward without labels (generation, the evaluate
    stage) is the model's own."""
    from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

    own = model.forward
    from_weight = fused_cross_entropy if kernel == "cut_cross_entropy" else linear_cross_entropy

    def forward(self, input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None, **kwargs: Any):
        if labels is None:
            return own(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = self.transformer(input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        if through_head:
            loss = logits_cross_entropy(self.lm_head(hidden), labels, vocab_size, num_items_in_batch)
        else:
            loss = from_weight(hidden, self.lm_head.weight, labels, vocab_size, num_items_in_batch)
        return CausalLMOutputWithCrossAttentions(loss=loss)

    model.forward = types.MethodType(forward, model)
