"""The training-memory check: a model that cannot fit is refused up front, with the estimate and the way out."""

from __future__ import annotations

import pytest

from tasks.plumbing.errors import PipelineError
from tasks.plumbing.params import parse_params
from tasks.training.memory import check_fits, estimate, shape
from tests.helpers import default_params, merge

GB = 10**9


def params_with(**sections):
    return parse_params(merge(default_params(), sections))


def test_a_9_7_billion_parameter_model_is_refused_on_a_23_gb_machine_with_the_estimate():
    huge = params_with(model={"config": {"n_layer": 48, "n_embd": 4096, "n_head": 32, "n_positions": 128}})
    with pytest.raises(PipelineError) as refused:
        check_fits(huge, "cpu", available=23 * GB)
    message = str(refused.value)
    assert message.startswith("model.config: training needs about 1") and "9.68 B parameters" in message
    assert "more than the 23.0 GB this machine has" in message and "train.check_memory: false" in message
    assert check_fits(params_with(**{**huge.model_dump(), "train": {"check_memory": False}}), "cpu", 23 * GB) is None


def test_the_default_model_fits_and_gpt2_124m_counts_its_real_parameters():
    assert check_fits(params_with(), "cpu", available=1 * GB).total < 1 * GB
    gpt2 = params_with(tokenizer={"vocab_size": 50_257, "block_size": 1024}, model={"config": {
        "n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024}})  # fmt: skip
    assert estimate(gpt2, shape(gpt2), fp32=False).parameters == 124_439_808  # GPT2LMHeadModel's, tied head
    with pytest.raises(PipelineError, match=r"more than the 80\.0 GB the GPU has"):
        check_fits(params_with(**{**gpt2.model_dump(), "train": {"batch_size": 4096}}), "cuda", 80 * GB)


def test_gradient_checkpointing_shrinks_the_activations():
    wide = params_with(train={"batch_size": 512})
    plain = estimate(wide, shape(wide), fp32=True)
    saved = estimate(params_with(train={"batch_size": 512, "gradient_checkpointing": True}), shape(wide), fp32=True)
    assert saved.activations < plain.activations and saved.state == plain.state
