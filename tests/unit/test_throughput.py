"""FLOPs per token and device peaks for MFU."""

from __future__ import annotations

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from tasks.throughput import counted_parameters, flops_per_token, measured_peak, table_peak


def test_gpt2_small_flops_per_token_as_nanogpt():
    config = GPT2Config()  # GPT-2 124M
    model = GPT2LMHeadModel(config)
    parameters = counted_parameters(model)
    assert parameters == 124_439_808 - 1024 * 768
    assert flops_per_token(config, parameters, 1024) == 6 * parameters + 12 * 12 * 12 * 64 * 1024


@pytest.mark.parametrize(
    ("name", "precision", "tf32", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", True, 989.0),
        ("NVIDIA H100 PCIe", "bf16", True, 756.0),
        ("NVIDIA H200", "fp32", True, 494.0),
        ("NVIDIA A100-SXM4-40GB", "fp32", False, 19.5),
        ("NVIDIA L40S", "bf16", True, 362.0),
        ("NVIDIA L4", "fp16", True, 121.0),
    ],
)
def test_table_peaks(name, precision, tf32, tflops):
    assert table_peak(name, precision, tf32) == tflops * 1e12


def test_unknown_devices_are_measured():
    assert table_peak("Some Future GPU", "bf16", True) is None
    assert 1e8 < measured_peak("cpu", "fp32") < 1e14
