"""train.method: lora below the stage: peft missing, what a checkpoint holds, and what LoRA counts (FLOPs, memory)."""

from __future__ import annotations

import sys

import pytest
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

from tasks.plumbing.errors import PipelineError
from tasks.plumbing.params import LoraParams, parse_params
from tasks.training import lora
from tasks.training.memory import GB, check_fits, estimate, lora_parameters, shape
from tasks.training.model import for_training
from tasks.training.throughput import counted_parameters, flops_per_token
from tests.helpers import default_params, merge

CONFIG = dict(n_layer=2, n_head=2, n_embd=64, n_positions=64)
# rank 8 x (inputs + outputs) of c_attn (64 + 192), both c_proj (64 + 64, 256 + 64) and c_fc (64 + 256), 2 blocks
ADAPTERS = 2 * 8 * 1024


def test_without_peft_lora_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    with pytest.raises(PipelineError) as refused:
        lora.wrap(GPT2LMHeadModel(GPT2Config(vocab_size=128, **CONFIG)), LoraParams())
    assert str(refused.value) == (
        "train.method: lora needs peft: pip install 'gpt2-pipeline[lora]', or set train.method: full"
    )


def test_an_adapter_save_holds_the_adapters_alone_for_a_pretrained_model_with_a_padded_vocabulary(tmp_path):
    """The Trainer's checkpoints and the run's artifact: peft's "auto" would add the embeddings (padded for training,
    so no longer the base model's size) to every one."""
    GPT2LMHeadModel(GPT2Config(vocab_size=500, **CONFIG)).save_pretrained(tmp_path / "base")
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    for_training(model)  # 500 rows padded to 512
    wrapped = lora.wrap(model, LoraParams())
    wrapped.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter/adapter_model.safetensors")
    assert saved and all(".lora_A." in key or ".lora_B." in key for key in saved)
    assert sum(tensor.numel() for tensor in saved.values()) == lora.trainable_parameters(wrapped) == ADAPTERS


def test_lora_flops_take_weight_gradients_of_the_adapters_only():
    config = GPT2Config(vocab_size=512, **CONFIG)
    model = GPT2LMHeadModel(config)
    base = counted_parameters(model)
    assert counted_parameters(model, trainable=True) == base  # full training: 6N
    wrapped = lora.wrap(model, LoraParams())
    assert counted_parameters(wrapped, trainable=True) == ADAPTERS
    assert counted_parameters(wrapped) == base + ADAPTERS
    attention = 12 * 2 * 2 * 32 * 64
    assert flops_per_token(config, counted_parameters(wrapped), 64, ADAPTERS) == 4 * base + 6 * ADAPTERS + attention


def test_lora_counts_frozen_weights_at_4_bytes_and_fits_where_full_training_does_not():
    """A 1.3 B-parameter GPT-2 (gpt2-xl's shape): 21 GB of weights, gradients and AdamW state in full; with LoRA 5 GB
    of fp32 weights and the adapters' 16 bytes each."""
    xl = {"model": {"config": {"n_layer": 48, "n_embd": 1600, "n_head": 25, "n_positions": 128}},
          "tokenizer": {"vocab_size": 50_257, "block_size": 128}, "train": {"batch_size": 4}}  # fmt: skip
    full = parse_params(merge(default_params(), xl))
    adapted = parse_params(merge(default_params(), merge(xl, {"train": {"method": "lora"}})))
    dims = shape(full)
    adapters = lora_parameters(adapted, dims)
    assert adapters == 48 * 8 * (1600 * 4 + 1600 * 2 + (6400 + 1600) + (1600 + 6400))
    plain = estimate(full, dims, "bf16")
    tuned = estimate(adapted, dims, "bf16")
    assert tuned.parameters == plain.parameters + adapters
    assert tuned.state == plain.parameters * 4 + adapters * 16
    assert tuned.loss < plain.loss  # no fp32 gradient of the frozen embeddings
    with pytest.raises(PipelineError, match=r"more than the 16\.0 GB this machine has; .* or train\.method: lora"):
        check_fits(full, "cpu", 16 * GB, "bf16")
    assert check_fits(adapted, "cpu", 16 * GB, "bf16").total < 16 * GB
