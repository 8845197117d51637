"""Training throughput and model FLOPs utilization (MFU), as nanoGPT computes them.

FLOPs per token = 6N + 12·L·H·Q·T (N parameters without the position embeddings, L layers, H heads, Q head
size, T block size); of the 6N, the weights' gradients are 2N, taken only for the weights that train (with LoRA:
4N + 2 a trainable parameter). The peak comes from a table of GPUs; for a CPU it is an upper bound from its
threads, clock and vector units (a measured matmul would be slower whenever other work shares the cores, and MFU
would then read above 100%), or a matmul measured on it when that is faster; an unlisted GPU has a matmul measured
once.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch

# Dense peak TFLOP/s: (bf16/fp16 tensor cores, TF32 tensor cores, plain fp32). Longer names first: "H100 PCIe"
# must match before "H100", "L40S" before "L4".
PEAK_TFLOPS = (
    ("H200", (989.0, 494.0, 67.0)),
    ("H100 PCIe", (756.0, 378.0, 51.0)),
    ("H100 NVL", (835.0, 418.0, 60.0)),
    ("H100", (989.0, 494.0, 67.0)),
    ("A100", (312.0, 156.0, 19.5)),
    ("L40S", (362.0, 183.0, 91.6)),
    ("L4", (121.0, 60.0, 30.3)),
    ("A10", (125.0, 62.5, 31.2)),
    ("V100", (125.0, 15.7, 15.7)),
    ("T4", (65.0, 8.1, 8.1)),
)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def flops_per_token(config, parameters: int, block_size: int, trainable: int | None = None) -> float:
    """Training FLOPs per token: forward and backward through the weights and through attention.

    Forward and the gradients of the activations through every weight (4N), the gradients of the trainable weights
    (2 each; trainable None: all N train, 6N in all)."""
    head_size = config.n_embd // config.n_head
    trainable = parameters if trainable is None else trainable
    return 4 * parameters + 2 * trainable + 12 * config.n_layer * config.n_head * head_size * block_size


def counted_parameters(model, trainable: bool = False) -> int:
    """All parameters (or those that train) but the position embeddings (the token embeddings are the tied output
    layer's)."""
    position = model.transformer.wpe.weight
    skipped = position.numel() if position.requires_grad or not trainable else 0
    return model.num_parameters(only_trainable=trainable) - skipped


def table_peak(device_name: str, precision: str, tf32: bool) -> float | None:
    for name, (half, tensor_fp32, plain_fp32) in PEAK_TFLOPS:
        if name in device_name:
            if precision in ("bf16", "fp16"):
                return half * 1e12
            return (tensor_fp32 if tf32 else plain_fp32) * 1e12
    return None


@functools.cache
def measured_peak(device: str, precision: str) -> float:
    """FLOP/s of a square matmul on this device in this precision: the achievable peak where no table applies."""
    size = 4096 if device == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=DTYPES[precision])
    b = torch.randn(size, size, device=device, dtype=DTYPES[precision])
    a @ b  # warm-up: kernels chosen, memory allocated
    best = float("inf")
    for _ in range(5):  # the fastest of several: another process's burst slows some, not all
        started = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def use_tf32() -> None:
    """TF32 tensor cores for fp32 matmuls.

    Set through the per-backend setting of torch >= 2.9, the one the Trainer uses: once the legacy and the new API
    are mixed, torch refuses to read the legacy one."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    else:
        torch.set_float32_matmul_precision("high")


def tf32_enabled() -> bool:
    """Whether CUDA fp32 matmuls run on TF32, whichever API (ours, the Trainer's, a user's) turned it on."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        return torch.get_float32_matmul_precision() != "highest"
    setting = matmul.fp32_precision
    if setting == "none":  # not set for matmuls: the global setting applies
        setting = torch.backends.fp32_precision
    return setting == "tf32"


CPUFREQ_MAX = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")  # kHz; absent in most VMs


def cpu_facts(cpuinfo: str | None = None, cpufreq: Path = CPUFREQ_MAX) -> tuple[set[str], float | None]:
    """(the CPU's feature flags, its highest clock in Hz) from /proc/cpuinfo (and cpufreq when present)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
    except OSError:
        return set(), None
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), []))
    try:
        return flags, int(cpufreq.read_text()) * 1e3
    except (OSError, ValueError):
        mhz = [float(line.split(":", 1)[1]) for line in cpuinfo.splitlines() if line.startswith("cpu MHz")]
        return flags, max(mhz) * 1e6 if mhz else None


def cpu_peak(precision: str, threads: int, flags: set[str], clock: float) -> tuple[float, str]:
    """An upper bound on the FLOP/s of `threads` cores.

    Two FMA units (2 FLOPs each) over the widest vector's fp32 lanes a cycle, doubled by native bf16 dot products
    (AVX512_BF16), 1024 bf16 FLOPs a cycle with AMX. No CPU computes faster, so the MFU it gives never reads above
    100%."""
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    per_cycle, unit = 4 * lanes, f"{lanes} fp32 lanes x 2 FMA units"
    if precision == "bf16" and "amx_bf16" in flags:
        per_cycle, unit = 1024, "AMX bf16 tiles"
    elif precision == "bf16" and "avx512_bf16" in flags:
        per_cycle, unit = 2 * per_cycle, "AVX512_BF16 x 2 FMA units"
    peak = threads * clock * per_cycle
    return peak, f"CPU upper bound: {threads} threads x {clock / 1e9:.2f} GHz x {per_cycle} FLOP/cycle ({unit})"


def peak_flops(device: str, precision: str) -> tuple[float, str]:
    """The peak FLOP/s of one device and where it comes from.

    The table for a known GPU, the upper bound for a CPU, else a measurement (the faster of fp32 and the training
    precision: a device without native bf16 emulates it, and its real peak is still its fp32 rate)."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
        peak = table_peak(name, precision, tf32_enabled())
        if peak:
            return peak, f"{name} {precision} dense peak (datasheet)"
    flags, clock = cpu_facts() if device == "cpu" else (set(), None)
    measured = max(measured_peak(device, "fp32"), measured_peak(device, precision))
    if device == "cpu" and flags and clock:
        # The higher of the two: contention only lowers the measurement, and a turbo clock above the one the
        # kernel reports (a VM shows the nominal one) only lowers the bound; both would have to be low at once.
        bound, derivation = cpu_peak(precision, torch.get_num_threads(), flags, clock)
        if bound >= measured:
            return bound, derivation
        return measured, f"measured CPU matmul, {measured / 1e12:.3f} TFLOP/s (above the {derivation})"
    return measured, f"measured {device} matmul, {measured / 1e12:.3f} TFLOP/s"


class Meter:
    """Tokens/s and MFU over the time spent inside training steps (evaluation and checkpoints excluded)."""

    def __init__(self, model, tokens_per_step: int, block_size: int, world_size: int, device: str, precision: str):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token(
            model.config, counted_parameters(model), block_size, counted_parameters(model, trainable=True)
        )
        peak, self.peak_source = peak_flops(device, precision)
        self.peak = peak * world_size
        self.busy = self.total_busy = 0.0
        self.steps = self.total_steps = 0
        self._began = 0.0

    def step_began(self) -> None:
        self._began = time.perf_counter()

    def step_ended(self) -> None:
        self.busy += time.perf_counter() - self._began
        self.steps += 1

    def interval(self) -> dict[str, float]:
        """Throughput since the previous call; the interval's counts move into the totals."""
        if not self.steps or self.busy <= 0:
            return {}
        rate = self.steps * self.tokens_per_step / self.busy
        self.total_busy += self.busy
        self.total_steps += self.steps
        self.busy, self.steps = 0.0, 0
        return {"train/tokens_per_second": rate, "train/mfu": rate * self.flops_per_token / self.peak}

    def mean_tokens_per_second(self) -> float:
        self.interval()
        return self.total_steps * self.tokens_per_step / self.total_busy if self.total_busy else 0.0

    def mean_mfu(self) -> float:
        return self.mean_tokens_per_second() * self.flops_per_token / self.peak
