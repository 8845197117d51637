"""Tokens/s of the evaluate stage's scoring against a bare `torch.inference_mode()` forward loop.

Its peak memory at 1x and 10x the validation tokens.

A config-initialized GPT-2 is saved as a folder and random validation blocks are saved as the tokenize stage's
DatasetDict. Throughput: `tasks.evaluate.evaluate` (memory-mapped blocks, windows, per-token NLL summed with
bytes and characters) and the bare loop (all blocks in one tensor, forward, summed cross-entropy) alternate
for several rounds in one process; medians are shown. Memory: each size is evaluated in a child process whose
peak RSS is sampled.
Run: python bench/eval_throughput.py [--tokens 200000 --layers 4 --width 128 --heads 4 --block 128 --batch 32]
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

VOCAB = 4096


def make_model(args, folder: Path) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_layer=args.layers, n_head=args.heads, n_embd=args.width, n_positions=args.block
    )
    GPT2LMHeadModel(config).save_pretrained(str(folder))


def make_blocks(folder: Path, tokens: int, block: int) -> None:
    """The tokenize stage's layout: train and validation splits of input_ids, token_bytes and token_chars."""
    import datasets
    import numpy as np

    rng = np.random.default_rng(tokens)
    count = tokens // block

    def split(n: int) -> datasets.Dataset:
        ids = rng.integers(0, VOCAB, (n, block), dtype=np.int32)
        ones = np.ones((n, block), dtype=np.uint16)
        return datasets.Dataset.from_dict({"input_ids": ids, "token_bytes": ones * 3, "token_chars": ones})

    datasets.DatasetDict({"train": split(1), "validation": split(count)}).save_to_disk(str(folder))


def stage(model, folder: Path, batch: int) -> tuple[float, int]:
    from tasks.evaluate import evaluate

    started = time.perf_counter()
    tokens = evaluate(model, folder, batch_size=batch, device="cpu")["eval_tokens"]
    return time.perf_counter() - started, tokens


def bare(model, ids, batch: int) -> tuple[float, int]:
    import torch
    import torch.nn.functional as F

    started, nll = time.perf_counter(), 0.0
    with torch.inference_mode():
        for start in range(0, len(ids), batch):
            chunk = ids[start : start + batch]
            logits = model(input_ids=chunk).logits[:, :-1]
            nll += float(F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum"))
    return time.perf_counter() - started, ids[:, 1:].numel()


def child(model_dir: Path, folder: Path, batch: int) -> None:
    """Peak-memory run: load the model as the stage does and evaluate one size."""
    from tasks.evaluate import load_model

    seconds, tokens = stage(load_model(model_dir)[0], folder, batch)
    print(json.dumps({"seconds": seconds, "tokens": tokens}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200_000, help="validation tokens at 1x (10x for memory)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    add_save_option(parser)
    args = parser.parse_args()
    import datasets
    import torch

    from tasks.plumbing.console import quiet_progress_bars

    datasets.disable_progress_bars()
    quiet_progress_bars()
    print(f"machine: {machine()}, {torch.get_num_threads()} torch threads")
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as scratch:
        work = Path(scratch)
        make_model(args, work / "model")
        for scale in (1, 10):
            make_blocks(work / f"blocks-{scale}x", args.tokens * scale, args.block)
        from tasks.evaluate import load_model

        model = load_model(work / "model")[0].eval()
        ids = torch.tensor(datasets.load_from_disk(str(work / "blocks-1x"))["validation"]["input_ids"]).long()
        ours, reference = [], []
        for round_ in range(args.rounds):
            seconds, tokens = stage(model, work / "blocks-1x", args.batch)
            ours.append(tokens / seconds)
            seconds, tokens = bare(model, ids, args.batch)
            reference.append(tokens / seconds)
            print(f"round {round_ + 1}: stage {ours[-1]:,.0f} tokens/s, bare {reference[-1]:,.0f} tokens/s", flush=True)
        project, base = statistics.median(ours), statistics.median(reference)
        print(
            f"GPT-2 {args.layers}x{args.width}, block {args.block}, batch {args.batch}: evaluate {project:,.0f} "
            f"tokens/s, bare inference_mode loop {base:,.0f} tokens/s, ratio {project / base:.3f}"
        )
        peaks = {}
        for scale in (1, 10):
            run = run_measured(
                [__file__, "_child", str(work / "model"), str(work / f"blocks-{scale}x"), str(args.batch)]
            )
            peaks[scale] = run.peak_rss / MB
            inner = json.loads(run.output.strip().splitlines()[-1])
            print(
                f"{scale:>2}x ({inner['tokens']:,} tokens): evaluate peak RSS {peaks[scale]:,.0f} MB, "
                f"{inner['seconds']:.1f} s"
            )
        print(f"peak RSS 10x / 1x: {peaks[10] / peaks[1]:.3f}")
    shape = {"layers": args.layers, "width": args.width, "block": args.block, "batch": args.batch}
    rates = {"stage_tokens_s": project, "bare_tokens_s": base, "ratio": project / base}
    save(args.save, {**shape, **rates, "tokens": args.tokens, "peak_rss_mb": peaks})


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "_child":
        child(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
