"""Tokens/s of the project's training path (tasks.train: Trainer, its arguments, collator and callbacks)
against a bare PyTorch loop (forward, backward, AdamW step, zero_grad) on the same model, batch and block.

The two alternate for several rounds in one process, so machine noise hits both alike; each round times
`--steps` steps after `--warmup` untimed ones. Prints tokens/s of both, the ratio and the project path's MFU.
Run: python bench/train_throughput.py [--layers 6 --width 256 --heads 8 --block 256 --batch 8 --precision fp32]
(--transformers-loss: the project path with transformers' loss and the unpadded vocabulary, to measure those two;
--loss-kernel cut_cross_entropy and --fp8-lm-head: the GPU levers of train.loss_kernel and train.fp8_lm_head)
GPT-2 124M as OpenAI shipped it: --layers 12 --width 768 --heads 12 --block 1024 --vocab 50257.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datasets
import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel, PrinterCallback, Trainer, TrainerCallback

from bench.measure import add_save_option, save
from tasks.plumbing.console import quiet_progress_bars
from tasks.plumbing.params import TrainParams
from tasks.tracking.loading import resolve_device
from tasks.train import _collate, resolve_precision, training_arguments
from tasks.training import throughput
from tasks.training.model import for_training


class StepClock(TrainerCallback):
    """Wall time from the end of the last warm-up step to the end of the last step: all per-step overhead in."""

    def __init__(self, warmup: int):
        self.warmup, self.started, self.ended = warmup, 0.0, 0.0

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            self.started = time.perf_counter()
        self.ended = time.perf_counter()


def make_model(args) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=args.vocab,
        n_layer=args.layers,
        n_head=args.heads,
        n_embd=args.width,
        n_positions=args.block,
        resid_pdrop=args.dropout,
        embd_pdrop=args.dropout,
        attn_pdrop=args.dropout,
        attn_implementation="sdpa",
    )
    return GPT2LMHeadModel(config)


def project_path(args, blocks, device: str, precision: str) -> float:
    """tokens/s through the Trainer exactly as the train stage configures it (no eval or checkpoint in range)."""
    params = TrainParams(
        max_steps=args.warmup + args.steps,
        batch_size=args.batch,
        learning_rate=1e-3,
        logging_steps=10,
        eval_steps=10**6,
        checkpoint_every=10**6,
        device=args.device,
        precision=args.precision,
        torch_compile=args.compile,
    )
    clock = StepClock(args.warmup)
    model = make_model(args)
    if not args.transformers_loss:
        for_training(model, device, args.loss_kernel, args.fp8_lm_head)  # as the stage trains it
    with tempfile.TemporaryDirectory() as scratch:
        trainer = Trainer(
            model=model,
            args=training_arguments(params, device, precision, Path(scratch)),
            data_collator=_collate,
            eval_dataset=blocks,
            train_dataset=blocks,
            callbacks=[clock],
        )
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    return args.steps * args.batch * args.block / (clock.ended - clock.started)


def bare_loop(args, blocks, device: str, precision: str) -> float:
    """tokens/s of the plainest correct loop over the same blocks."""
    model = make_model(args).to(device).train()
    if args.compile:
        model = torch.compile(model)  # what the Trainer does with torch_compile=True
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = blocks["input_ids"]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    started = 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            started = time.perf_counter()
        batch = ids[step * args.batch % len(ids) :][: args.batch].to(device).long()
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return args.steps * args.batch * args.block / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the model in both arms")
    parser.add_argument("--dropout", type=float, default=0.0, help="all three dropouts (GPT2Config's default: 0.1)")
    parser.add_argument(
        "--transformers-loss",
        action="store_true",
        help="the project path without its training loss (tasks/training/loss.py) and padded vocabulary: "
        "transformers' own",
    )
    kernels = typing.get_args(TrainParams.model_fields["loss_kernel"].annotation)  # the param's own values
    parser.add_argument(
        "--loss-kernel", default="chunked", choices=kernels, help="train.loss_kernel in the project path"
    )
    parser.add_argument("--fp8-lm-head", action="store_true", help="train.fp8_lm_head in the project path")
    add_save_option(parser)
    args = parser.parse_args()
    device = resolve_device(args.device)
    precision, why = resolve_precision(args.precision, device, args.width)
    print(f"precision {precision} ({why})")
    datasets.disable_progress_bars()
    quiet_progress_bars()  # the Trainer saves a checkpoint a round: no shard-writing bar between the figures
    rng = np.random.default_rng(0)
    count = (args.warmup + args.steps) * args.batch
    blocks = datasets.Dataset.from_dict({"input_ids": rng.integers(0, args.vocab, (count, args.block), dtype=np.int32)})
    blocks = blocks.with_format("torch")
    ours, bare = [], []
    for round_ in range(args.rounds):
        ours.append(project_path(args, blocks, device, precision))
        bare.append(bare_loop(args, blocks, device, precision))
        print(f"round {round_ + 1}: project {ours[-1]:,.0f} tokens/s, bare {bare[-1]:,.0f} tokens/s")
    model = make_model(args)
    flops = throughput.flops_per_token(model.config, throughput.counted_parameters(model), args.block)
    peak, source = throughput.peak_flops(device, precision)
    project, reference = statistics.median(ours), statistics.median(bare)
    print(
        f"GPT-2 {args.layers}x{args.width}, {model.num_parameters() / 1e6:.0f}M parameters, block {args.block}, "
        f"batch {args.batch}, {device} {precision}{' compiled' if args.compile else ''}: "
        f"project {project:,.0f} tokens/s, bare loop {reference:,.0f} tokens/s, ratio {project / reference:.3f}, "
        f"project MFU {project * flops / peak:.1%} (peak {peak / 1e12:.2f} TFLOP/s: {source})"
    )
    figures = {
        **{name: getattr(args, name) for name in ("layers", "width", "heads", "block", "batch", "vocab", "compile")},
        **{"dropout": args.dropout, "loss_kernel": args.loss_kernel, "fp8_lm_head": args.fp8_lm_head},
        **{"parameters": model.num_parameters(), "device": device, "precision": precision},
        **{"project_tokens_s": project, "bare_tokens_s": reference, "ratio": project / reference},
        **{"mfu": project * flops / peak, "peak_tflops": peak / 1e12, "peak_source": source},
    }
    if args.precision == "auto" and precision != "fp32":  # what auto's choice gives over fp32 on this machine
        fp32 = statistics.median(project_path(args, blocks, device, "fp32") for _ in range(args.rounds))
        print(f"auto ({precision}) against fp32 through the project path: {project / fp32:.2f}x ({fp32:,.0f} tokens/s)")
        figures["fp32_tokens_s"] = fp32
    save(args.save, figures)


if __name__ == "__main__":
    main()
