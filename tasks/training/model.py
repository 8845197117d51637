"""The GPT-2 the train stage builds.

Config-initialized or pretrained, sized to the tokenizer, framed as tokenize framed the records, and padded for
training."""

from __future__ import annotations

import math
from typing import Any

from tasks.data.framing import FRAMINGS, Framing
from tasks.plumbing.errors import PipelineError
from tasks.plumbing.params import ModelParams
from tasks.tracking.loading import load_pretrained
from tasks.training import loss

# While training, the embedding rows are padded to a multiple of 128 (50304 for GPT-2's 50257): matmul shapes
# the GPU's tensor cores take whole, as nanoGPT and llm.c pad. The saved model has the tokenizer's size again,
# so generation can never sample a padding id.
VOCAB_MULTIPLE = 128


def padded_vocab(size: int) -> int:
    return math.ceil(size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def config_overrides(model_params: ModelParams) -> dict[str, Any]:
    """model.config as this init takes it, with `dropout` spread over GPT-2's three dropout rates."""
    overrides = model_params.gpt2_config()
    if "dropout" in overrides:
        rate = overrides.pop("dropout")
        for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            overrides.setdefault(key, rate)
    return overrides


def build_model(model_params: ModelParams, tokenizer, block_size: int, framing_name: str = "eos"):
    """A GPT2LMHeadModel matching the tokenizer.

    Config-initialized, or pretrained with embeddings resized; it stops generating at the tokenizer's eos_token (the
    framing's end marker) and frames prompts as tokenize framed records."""
    from transformers import GPT2Config, GPT2LMHeadModel

    eos = tokenizer.eos_token_id
    if model_params.init == "scratch":
        config = GPT2Config(
            vocab_size=len(tokenizer),
            bos_token_id=eos,
            eos_token_id=eos,
            attn_implementation="sdpa",
            **config_overrides(model_params),
        )
        model = GPT2LMHeadModel(config)
    else:
        model, _ = load_pretrained(
            model_params.name_or_path, attn_implementation="sdpa", **config_overrides(model_params)
        )
        if model.config.n_positions < block_size:
            raise PipelineError(
                f"tokenizer.block_size: {block_size} exceeds the n_positions "
                f"({model.config.n_positions}) of {model_params.name_or_path!r}; lower block_size"
            )
        if model.config.vocab_size != len(tokenizer):  # a model saved padded by an earlier version: trimmed
            print(
                f"train: resizing token embeddings from {model.config.vocab_size} to {len(tokenizer)} "
                "to match the tokenizer"
            )
            model.resize_token_embeddings(len(tokenizer))
    frame(model, tokenizer, FRAMINGS[framing_name])
    return model


def for_training(model, device: str = "cpu", loss_kernel: str = "chunked", fp8_lm_head: bool = False) -> None:
    """The model as it trains.

    Vocabulary rows padded to VOCAB_MULTIPLE (the padding columns masked out of the loss) and the loss computed
    from the hidden states (tasks/training/loss.py: chunk by chunk, or by cut-cross-entropy's kernel on CUDA); with
    fp8_lm_head the output projection runs in FP8 (torchao) and the loss takes its logits. _save trims the padding
    off again (to the tokenizer's size)."""
    size = model.config.vocab_size
    model.resize_token_embeddings(padded_vocab(size), mean_resizing=False)  # padding rows: never looked up
    kernel = loss.resolve_kernel(loss_kernel, device)
    if fp8_lm_head:
        fp8_head(model, device)
    loss.use_training_loss(model, size, kernel, through_head=fp8_lm_head)


FP8_CAPABILITY = (8, 9)  # the first GPUs with FP8 tensor cores: Ada (8.9), then Hopper (9.0: H100, H200)


def fp8_head(model, device: str, emulate: bool = False) -> None:
    """The output projection (the largest matmul of a GPT-2 124M: 768 x 50,304) in FP8 by torchao's float8 training.

    Refused where it cannot run: no GPU with FP8, torchao missing, a width FP8 matmuls cannot take. emulate: torchao's
    emulation of the FP8 matmuls, which runs anywhere (slowly): how the tests run this on the CPU."""
    import torch

    if not emulate and (device != "cuda" or torch.cuda.get_device_capability() < FP8_CAPABILITY):
        has = (
            "no CUDA GPU"
            if device != "cuda"
            else f"{torch.cuda.get_device_name()} {torch.cuda.get_device_capability()}"
        )
        raise PipelineError(
            "train.fp8_lm_head: FP8 needs a GPU of compute capability 8.9 or later (Ada, Hopper: H100, H200); "
            f"this run has {has}; set it to false"
        )
    if model.config.n_embd % 16:
        raise PipelineError(f"train.fp8_lm_head: n_embd {model.config.n_embd} is not a multiple of 16, as FP8 needs")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise PipelineError(
            "train.fp8_lm_head: torchao is not installed: pip install 'gpt2-pipeline[kernels]', or set it to false"
        ) from None
    # The module is swapped, its weight kept: still the embedding's, as GPT-2 ties them.
    convert_to_float8_training(
        model, module_filter_fn=lambda module, name: name == "lm_head", config=Float8LinearConfig(emulate=emulate)
    )


def frame(model, tokenizer, framing: Framing) -> None:
    """The framing in the model's config.

    The start marker as the prompt prefix (transformers' text-generation pipeline reads it too), the end marker as
    the stop token (a uer checkpoint's config names GPT-2's 50256, outside its vocabulary), and the framing's name
    for the model card."""
    eos = tokenizer.eos_token_id
    model.config.eos_token_id = model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos
    model.config.prefix = getattr(tokenizer, framing.start) if framing.start else None
    if framing.start:
        model.config.bos_token_id = model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.config.framing = framing.name
