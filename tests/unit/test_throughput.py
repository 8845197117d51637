"""FLOPs per token and device peaks for MFU."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from tasks.training.throughput import (
    counted_parameters,
    cpu_facts,
    cpu_peak,
    flops_per_token,
    measured_peak,
    peak_flops,
    table_peak,
    tf32_enabled,
    use_tf32,
)


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


@pytest.fixture
def matmul_precision():
    """Put torch's process-wide precision settings back as they were."""
    saved = torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    yield
    torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved


def test_tf32_is_read_after_both_apis_set_it(matmul_precision):
    # A legacy call (a user's, an older library's), then the per-backend setting: from here on
    # torch.get_float32_matmul_precision() raises (the train stage's MFU crashed so on an H200, torch 2.11).
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    with pytest.raises(RuntimeError, match="mix of the legacy and new APIs"):
        torch.get_float32_matmul_precision()
    assert tf32_enabled() is True
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    assert tf32_enabled() is False
    use_tf32()
    assert tf32_enabled() is True
    torch.backends.cuda.matmul.fp32_precision = "none"  # inherits the global setting the Trainer sets
    torch.backends.fp32_precision = "tf32"
    assert tf32_enabled() is True


@pytest.mark.parametrize(
    ("precision", "flags", "per_cycle"),
    [
        ("fp32", {"avx512f", "avx2"}, 64),  # 16 fp32 lanes x 2 FMA units x 2 FLOPs
        ("fp32", {"avx2", "fma"}, 32),
        ("fp32", set(), 16),
        ("bf16", {"avx512f", "avx512_bf16"}, 128),
        ("bf16", {"avx512f", "avx512_bf16", "amx_bf16"}, 1024),
        ("bf16", {"avx2"}, 32),  # no native bf16: emulated, no faster than fp32
        ("fp32", {"avx512f", "amx_bf16"}, 64),  # AMX does not compute fp32
    ],
)
def test_the_cpu_peak_is_cores_clock_and_vector_units(precision, flags, per_cycle):
    peak, derivation = cpu_peak(precision, 2, flags, 2.5e9)
    assert peak == 2 * 2.5e9 * per_cycle
    assert derivation.startswith(f"CPU upper bound: 2 threads x 2.50 GHz x {per_cycle} FLOP/cycle")


def test_the_cpu_s_clock_and_flags_come_from_cpuinfo(tmp_path):
    cpuinfo = "processor\t: 0\ncpu MHz\t\t: 2100.000\nflags\t\t: fpu avx2 avx512f\n\ncpu MHz : 2400.5\n"
    assert cpu_facts(cpuinfo, tmp_path / "none") == ({"fpu", "avx2", "avx512f"}, 2400.5e6)  # the highest
    (tmp_path / "max").write_text("3500000\n")  # cpufreq's maximum, in kHz, where the kernel has one
    assert cpu_facts(cpuinfo, tmp_path / "max")[1] == 3.5e9


def test_the_peak_here_is_never_below_what_a_matmul_reaches():
    """So MFU on this machine cannot read above 100%: the peak is at least the fastest matmul measured."""
    peak, derivation = peak_flops("cpu", "fp32")
    assert peak >= measured_peak("cpu", "fp32") and derivation
