"""The training-memory check: a model that cannot fit is refused up front, with the estimate and the way out."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tasks.plumbing.errors import PipelineError
from tasks.plumbing.params import load_params, parse_params
from tasks.train import check_memory, native_bf16
from tasks.training.memory import check_fits, estimate, shape
from tests.helpers import ROOT, default_params, merge

GB = 10**9
GIB = 2**30


def params_with(**sections):
    return parse_params(merge(default_params(), sections))


def test_a_9_7_billion_parameter_model_is_refused_on_a_23_gb_machine_with_the_estimate():
    huge = params_with(model={"config": {"n_layer": 48, "n_embd": 4096, "n_head": 32, "n_positions": 128}})
    with pytest.raises(PipelineError) as refused:
        check_fits(huge, "cpu", available=23 * GB)
    message = str(refused.value)
    needed = estimate(huge, shape(huge)).total
    assert message.startswith(f"model.config: training needs about {needed / GB:.1f} GB (9.68 B parameters")
    assert "more than the 23.0 GB this machine has" in message and "train.check_memory: false" in message
    assert check_fits(params_with(**{**huge.model_dump(), "train": {"check_memory": False}}), "cpu", 23 * GB) is None


def test_the_default_model_fits_and_gpt2_124m_counts_its_real_parameters():
    assert check_fits(params_with(), "cpu", available=1 * GB).total < 1 * GB
    gpt2 = params_with(tokenizer={"vocab_size": 50_257, "block_size": 1024}, model={"config": {
        "n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024}})  # fmt: skip
    assert estimate(gpt2, shape(gpt2), "bf16").parameters == 124_439_808  # GPT2LMHeadModel's, tied head
    with pytest.raises(PipelineError, match=r"more than the 80\.0 GB the GPU has"):
        check_fits(params_with(**{**gpt2.model_dump(), "train": {"batch_size": 4096}}), "cuda", 80 * GB)


def test_gradient_checkpointing_shrinks_the_activations():
    wide = params_with(train={"batch_size": 512})
    plain = estimate(wide, shape(wide), "fp32")
    saved = estimate(params_with(train={"batch_size": 512, "gradient_checkpointing": True}), shape(wide), "fp32")
    assert saved.activations < plain.activations and saved.state == plain.state


def test_the_shipped_124m_recipe_fits_a_24_gib_gpu_with_the_chunked_loss_and_not_with_whole_logits():
    recipe = load_params(ROOT / "params/gpt2-124m-openwebtext.yaml")
    chunked = check_fits(recipe, "cuda", 24 * GIB, "bf16")
    whole = recipe.model_copy(update={"train": recipe.train.model_copy(update={"fp8_lm_head": True})})
    logits = recipe.train.batch_size * recipe.tokenizer.block_size * 50_257 * 4 * 2  # fp32, and their gradient
    assert estimate(whole, shape(whole), "bf16", "cuda").total - chunked.total == pytest.approx(logits, rel=0.1)
    with pytest.raises(PipelineError, match=r"GB for the loss .* more than the 25\.8 GB the GPU has"):
        check_fits(whole, "cuda", 24 * GIB, "bf16")


def test_fp32_on_a_gpu_counts_activations_at_4_bytes():
    recipe = load_params(ROOT / "params/gpt2-124m-openwebtext.yaml")
    check_memory(recipe, "cuda", 24 * GIB)  # train.precision: bf16
    fp32 = recipe.model_copy(update={"train": recipe.train.model_copy(update={"precision": "fp32"})})
    with pytest.raises(PipelineError, match=r"GB of activations in fp32"):
        check_memory(fp32, "cuda", 24 * GIB)
    wide, narrow = (estimate(recipe, shape(recipe), precision, "cuda") for precision in ("fp32", "bf16"))
    assert 1.8 < wide.activations / narrow.activations < 2  # the residual stream is fp32 in both


# A few steps of a small GPT-2 as the train stage builds it (the chunked loss, AdamW, autocast for bf16) in a process
# of its own, so that its peak resident memory is the training's. What is measured is that peak less the resident
# memory before the model existed (the peak is reset there: Linux carries a process's ru_maxrss over exec from the
# process that forked it, a test worker of any size, and importing can peak higher than training) and less the library
# code torch pages in as it runs its kernels (file-backed, not training memory). glibc keeps freed blocks in its heap
# and raises its mmap threshold as large blocks are freed; a fixed threshold returns each freed tensor's pages at
# once, so resident memory follows the tensors alive.
MEASURE = """
import json, sys
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from tasks.plumbing.params import parse_params
from tasks.training import lora
from tasks.training.model import config_overrides, for_training

def resident(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))

params, precision = parse_params(json.loads(sys.argv[1])), sys.argv[2]
torch.manual_seed(0)
with open("/proc/self/clear_refs", "w") as clear:  # the peak so far (the imports') is not the training's
    clear.write("5")
before, code = resident("VmRSS"), resident("RssFile")
vocab = params.tokenizer.vocab_size
model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, attn_implementation="sdpa", **config_overrides(params.model)))
for_training(model, "cpu", "chunked")
if params.train.method == "lora":
    model = lora.wrap(model, params.train.lora)
optimizer = torch.optim.AdamW([parameter for parameter in model.parameters() if parameter.requires_grad])
ids = torch.randint(0, vocab, (params.train.batch_size, params.tokenizer.block_size))
for _ in range(3):
    with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
peak = resident("VmHWM")
print(json.dumps({"peak": peak - before - (resident("RssFile") - code)}))
"""


SHAPES = {
    # 130 MB of activations in fp32, 75 MB in bf16; a small vocabulary's loss
    "full": {
        "model": {"config": {"n_layer": 2, "n_embd": 256, "n_head": 4, "n_positions": 256}},
        "tokenizer": {"vocab_size": 512, "block_size": 256},
        "train": {"batch_size": 8},
    },
    # 13 M parameters: 200 MB of weights, gradients and AdamW state in full training, 50 MB frozen with LoRA; the
    # adapters' dropout keeps 60 MB of fp32 masks
    "lora": {
        "model": {"config": {"n_layer": 4, "n_embd": 512, "n_head": 8, "n_positions": 128}},
        "tokenizer": {"vocab_size": 512, "block_size": 128},
        "train": {"batch_size": 8, "method": "lora"},
    },
}


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc and /proc: how the peak is measured")
@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_estimate_is_within_15_percent_of_the_peak_memory_training_takes_on_the_cpu(precision, method):
    if precision == "bf16" and native_bf16() is None:
        pytest.skip("this CPU emulates bf16 (minutes, not seconds)")
    raw = merge(default_params(), SHAPES[method])
    small = parse_params(raw)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    args = [sys.executable, "-c", MEASURE, json.dumps(raw), precision]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.splitlines()[-1])["peak"]
    assert estimate(small, shape(small), precision, "cpu").total == pytest.approx(measured, rel=0.15)
