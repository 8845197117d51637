"""train.precision: auto picks bf16 on the CPU only where it computes bf16 natively and the model is wide enough."""

from __future__ import annotations

import pytest

from tasks import train
from tasks.plumbing.errors import PipelineError
from tasks.train import CPU_BF16_MIN_WIDTH, native_bf16, resolve_precision
from tasks.training import throughput


@pytest.mark.parametrize(
    ("native", "width", "chosen", "why"),
    [
        (None, 768, "fp32", "auto: the CPU has no native bf16 (neither amx_bf16 nor avx512_bf16)"),
        ("amx_bf16", 768, "bf16", "auto: the CPU has native bf16 (amx_bf16) and n_embd 768 is at least 256"),
        ("avx512_bf16", CPU_BF16_MIN_WIDTH, "bf16", "auto: the CPU has native bf16 (avx512_bf16) and n_embd 256"),
        ("amx_bf16", CPU_BF16_MIN_WIDTH - 1, "fp32", "but at n_embd 255 (under 256) bf16 autocast costs more"),
    ],
)
def test_auto_on_the_cpu_says_what_it_chose_and_why(native, width, chosen, why):
    precision, reason = resolve_precision("auto", "cpu", width, native=lambda: native)
    assert precision == chosen and why in reason


def test_a_precision_set_in_params_is_kept_and_fp16_needs_a_gpu():
    def never() -> str:
        raise AssertionError("a set precision must not look at the CPU")

    assert resolve_precision("bf16", "cpu", 64, native=never) == ("bf16", "train.precision is bf16")
    assert resolve_precision("fp32", "cpu", 4096, native=never) == ("fp32", "train.precision is fp32")
    with pytest.raises(PipelineError, match="fp16 needs a GPU"):
        resolve_precision("fp16", "cpu", 768, native=never)


@pytest.mark.parametrize(
    ("flags", "torch_says", "found"),
    [
        ({"avx512f", "amx_bf16", "avx512_bf16"}, False, "amx_bf16"),
        ({"avx512f", "avx512_bf16"}, False, "avx512_bf16"),
        ({"avx2"}, False, None),
        (set(), True, "amx_bf16"),  # no /proc/cpuinfo (another OS): torch's own check
    ],
)
def test_native_bf16_is_read_from_the_cpu_flags_or_torch(monkeypatch, flags, torch_says, found):
    monkeypatch.setattr(throughput, "cpu_facts", lambda: (flags, 2.1e9))
    monkeypatch.setattr(train.torch.cpu, "_is_amx_tile_supported", lambda: torch_says, raising=False)
    monkeypatch.setattr(train.torch.cpu, "_is_avx512_bf16_supported", lambda: torch_says, raising=False)
    assert native_bf16() == found
