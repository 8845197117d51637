"""LoRA (train.method: lora) against full fine-tuning: peak memory, time per step and the loss after the same steps.

A config-initialized GPT-2 of gpt2-medium's shape (24 layers, 1024 wide, 16 heads, vocabulary 50,257) trains on the
same blocks of the bundled Shakespeare (a byte-level BPE of up to that vocabulary trained on it) for the same steps
through the train stage's path (its model, loss, LoRA wrapping, Trainer arguments), once with every weight training
and once with the adapters alone, each in a child process of its own: its peak RSS (the kernel's VmHWM: sampling RSS
can miss a step's brief peak) is that method's. Time per step: the median over the steps after --warmup; the loss:
the validation loss after the last step, on blocks neither saw. The memory check's estimate
(tasks/training/memory.py) is shown beside each peak. The weights are random: LoRA is made for pretrained ones, and
its loss here shows how little adapters on a frozen random model learn.
Run: python bench/lora.py [--layers 24 --width 1024 --heads 16 --block 128 --batch 4 --steps 8 --warmup 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import add_save_option, machine, run_measured, save
from tools.corpora import MB

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 50_257  # GPT-2's
EVAL_BLOCKS = 16
METHODS = ("full", "lora")


def make_blocks(args, folder: Path) -> None:
    """The bundled Shakespeare as blocks of --block tokens: enough to train on, then EVAL_BLOCKS held out."""
    import datasets
    import numpy as np

    from tasks.data.tokenizer import train_bpe
    from tasks.plumbing.params import TokenizerParams

    datasets.disable_progress_bars()

    records = [text for text in (ROOT / "data/samples/tinyshakespeare.txt").read_text().split("\n\n") if text]
    shard = folder / "train.jsonl"
    shard.write_text("".join(json.dumps({"text": text}) + "\n" for text in records))
    tokenizer = train_bpe([shard], TokenizerParams(vocab_size=VOCAB))
    ids = np.concatenate([np.array(row, dtype=np.int32) for row in tokenizer(records)["input_ids"]])
    blocks = ids[: len(ids) // args.block * args.block].reshape(-1, args.block)
    train = (args.warmup + args.steps) * args.batch
    if len(blocks) < train + EVAL_BLOCKS:
        raise SystemExit(f"the corpus has {len(blocks)} blocks of {args.block}; fewer steps or a smaller batch")
    split = {"train": blocks[:train], "validation": blocks[-EVAL_BLOCKS:]}
    datasets.DatasetDict(
        {name: datasets.Dataset.from_dict({"input_ids": rows}) for name, rows in split.items()}
    ).save_to_disk(str(folder / "blocks"))
    print(f"tokenizer: {len(tokenizer):,} tokens learned; {len(blocks):,} blocks of {args.block}", flush=True)


def params_for(args, method: str):
    """The pipeline's params for this run: the memory check's input and the Trainer's settings."""
    from tasks.plumbing.params import Params

    return Params.model_validate({
        "tokenizer": {"vocab_size": VOCAB, "block_size": args.block},
        "model": {"config": {"n_layer": args.layers, "n_embd": args.width, "n_head": args.heads,
                             "n_positions": args.block}},
        "train": {"method": method, "max_steps": args.warmup + args.steps, "batch_size": args.batch,
                  "learning_rate": args.learning_rate, "lr_scheduler": "constant_with_warmup", "warmup_steps": 0,
                  "logging_steps": 1, "eval_steps": 10**6, "checkpoint_every": 10**6},
    })  # fmt: skip


def child(args, method: str, work: Path) -> None:
    """One method's training in this process; prints its figures as one JSON line."""
    import datasets
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PrinterCallback, Trainer, TrainerCallback

    from tasks.plumbing.console import quiet_progress_bars
    from tasks.tracking.loading import resolve_device
    from tasks.train import _collate, resolve_precision, training_arguments
    from tasks.training import lora
    from tasks.training.model import config_overrides, for_training

    def resident(field: str) -> int:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.began)

    datasets.disable_progress_bars()
    quiet_progress_bars()
    params = params_for(args, method)
    device = resolve_device("auto")
    precision, _ = resolve_precision("auto", device, args.width)
    with open("/proc/self/clear_refs", "w") as clear:  # the peak from here on: the training's, not the imports'
        clear.write("5")
    before = resident("VmRSS")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, attn_implementation="sdpa", **config_overrides(params.model))
    model = GPT2LMHeadModel(config)
    parameters = model.num_parameters()
    for_training(model, device)
    if method == "lora":
        model = lora.wrap(model, params.train.lora)
    blocks = datasets.load_from_disk(str(work / "blocks")).with_format("torch")
    times = StepTimes()
    trainer = Trainer(
        model=model,
        args=training_arguments(params.train, device, precision, work / f"checkpoints-{method}"),
        data_collator=_collate,
        train_dataset=blocks["train"],
        eval_dataset=blocks["validation"],
        callbacks=[times],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(json.dumps({
        "device": device,
        "precision": precision,
        "parameters": parameters,
        "trainable_parameters": lora.trainable_parameters(model) if method == "lora" else parameters,
        "peak_rss_mb": resident("VmHWM") / 1e6,  # exact, where sampling RSS can miss a step's brief peak
        "training_mb": (resident("VmHWM") - before) / 1e6,
        "step_s": statistics.median(times.seconds[args.warmup :]),
        "first_loss": losses[0],
        "eval_loss": trainer.evaluate()["eval_loss"],
    }))  # fmt: skip


def options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="timed steps, after --warmup untimed ones")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="both methods', constant")
    add_save_option(parser)
    return parser


SHAPE = ("layers", "width", "heads", "block", "batch", "steps", "warmup", "learning_rate")


def main() -> None:
    args = options().parse_args()
    from tasks.training.memory import estimate, shape

    print(f"machine: {machine()}", flush=True)
    settings = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in SHAPE]  # the child's, less --save
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as scratch:
        work = Path(scratch)
        make_blocks(args, work)
        for method in METHODS:
            run = run_measured([__file__, "_child", method, str(work), *settings], cwd=ROOT)  # its output, its failure
            figures = json.loads([line for line in run.output.splitlines() if line.startswith("{")][-1])
            params = params_for(args, method)
            expected = estimate(params, shape(params), figures["precision"], figures["device"])
            runs[method] = {**figures, "estimate_mb": expected.total / MB}
            print(
                f"{method}: {figures['trainable_parameters']:,} of {figures['parameters']:,} parameters train; peak "
                f"RSS {figures['peak_rss_mb']:,.0f} MB, of it {figures['training_mb']:,.0f} MB above the process "
                f"before the model (the memory check estimates {expected.total / MB:,.0f} MB), "
                f"{figures['step_s']:.2f} s a step, loss {figures['first_loss']:.3f} at step 1, validation loss "
                f"{figures['eval_loss']:.3f} after {args.warmup + args.steps} steps ({figures['device']} "
                f"{figures['precision']})",
                flush=True,
            )
    full, adapted = runs["full"], runs["lora"]
    ratios = {
        "memory_ratio": adapted["peak_rss_mb"] / full["peak_rss_mb"],
        "time_ratio": adapted["step_s"] / full["step_s"],
    }
    print(
        f"LoRA against full fine-tuning: peak memory {ratios['memory_ratio']:.3f} x, "
        f"time per step {ratios['time_ratio']:.3f} x"
    )
    adapters = params_for(args, "lora").train.lora.model_dump()
    save(args.save, {**{name: getattr(args, name) for name in SHAPE}, "vocab": VOCAB, "lora": adapters, "methods": runs,
                     **ratios})  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "_child":
        child(options().parse_args(sys.argv[4:]), sys.argv[2], Path(sys.argv[3]))
    else:
        main()
