"""Throughput and peak memory of the tokenize stage as the corpus grows, against a bare `tokenizers` loop.

For each size a synthetic corpus (the bundled Shakespeare and Tang poems, shuffled and repeated) is written as
the ingest stage's JSONL. The same BPE tokenizer (4,096 tokens, trained once on the smallest corpus and saved
as a folder) then goes through
  - the stage: `tasks.tokenize.tokenize` with `tokenizer.kind: pretrained` pointing at that folder (read the
    JSONL, encode with offsets, count bytes and characters per token, cut blocks, write Arrow to disk), and
  - the bare reference: read the same JSONL, `Tokenizer.encode_batch` 1,000 records at a time, count tokens;
  - the hand-written script of bench/tokenize_whole.py (encode_batch, end-of-text ids, blocks, np.save).
Each runs in a child process whose whole process tree's RSS is sampled; the clock starts once the libraries
are imported (the process's wall time, imports included, is reported beside it). MB/s counts UTF-8 text bytes.
Run: python bench/tokenize_scaling.py [--sizes 10,100] [--large] [--memory-limit-mb N]   (--large adds 1,000 MB)
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import add_save_option, machine, run_measured, save
from tools.corpora import MB, write_corpus
from tools.project import ROOT

BLOCK = 128
BATCH = 1000


def stage(work: Path) -> None:
    import datasets  # noqa: F401  # libraries load before the clock starts, as tokenizers does for the bare loop
    from transformers import AutoTokenizer  # noqa: F401

    from tasks.plumbing.params import ModelParams, TokenizerParams
    from tasks.tokenize import tokenize

    started = time.perf_counter()
    stats = tokenize(
        TokenizerParams(kind="pretrained", block_size=BLOCK),
        ModelParams(init="pretrained", name_or_path=str(work / "tokenizer")),
        prepared_dir=work / "prepared",
        tokenizer_dir=work / "out/tokenizer",
        tokenized_dir=work / "out/tokenized",
    )
    print(
        json.dumps(
            {"seconds": time.perf_counter() - started, "tokens": stats["train_tokens"] + stats["validation_tokens"]}
        )
    )


def bare(work: Path) -> None:
    from tokenizers import Tokenizer

    started = time.perf_counter()
    tokenizer, tokens = Tokenizer.from_file(str(work / "tokenizer/tokenizer.json")), 0
    for split in ("train", "validation"):
        with (work / f"prepared/{split}/00000.jsonl").open(encoding="utf-8") as handle:
            batch = []
            for line in handle:
                batch.append(json.loads(line)["text"])
                if len(batch) == BATCH:
                    tokens += sum(len(e.ids) + 1 for e in tokenizer.encode_batch(batch, add_special_tokens=False))
                    batch = []
            tokens += sum(len(e.ids) + 1 for e in tokenizer.encode_batch(batch, add_special_tokens=False))
    print(json.dumps({"seconds": time.perf_counter() - started, "tokens": tokens}))


def script(work: Path) -> None:
    """bench/tokenize_whole.py's hand-written script, with the given tokenizer instead of training one."""
    from tokenizers import Tokenizer

    from bench.tokenize_whole import script_blocks

    started = time.perf_counter()
    tokenizer = Tokenizer.from_file(str(work / "tokenizer/tokenizer.json"))
    tokens = script_blocks(tokenizer, work / "prepared", work / "out/script", BLOCK)
    print(json.dumps({"seconds": time.perf_counter() - started, "tokens": tokens}))


def train_tokenizer(work: Path) -> None:
    from tasks.data.tokenizer import train_bpe
    from tasks.plumbing.params import TokenizerParams

    train_bpe([work / "prepared/train/00000.jsonl"], TokenizerParams(vocab_size=4096)).save_pretrained(
        str(work / "tokenizer")
    )


def measure(work: Path, size_mb: int, tokenizer: Path, memory_limit: int = 0) -> dict:
    prepared = work / "prepared"
    text_bytes = write_corpus(prepared / "train/00000.jsonl", size_mb * MB * 99 // 100, seed=size_mb)
    text_bytes += write_corpus(prepared / "validation/00000.jsonl", size_mb * MB // 100, seed=size_mb + 1)
    stats = {split: {"records": 1, "chars": 1, "bytes": 1} for split in ("train", "validation")}
    (prepared / "stats.json").write_text(json.dumps(stats))  # ingest's figures: only copied beside the blocks
    shutil.copytree(tokenizer, work / "tokenizer")
    row = {"size_mb": size_mb, "text_mb": text_bytes / MB}
    for name in ("bare", "script", "stage"):  # bare first: it warms the page cache for all alike
        run = run_measured([__file__, f"_{name}", str(work)], cwd=ROOT, memory_limit=memory_limit)
        inner = json.loads(run.output.strip().splitlines()[-1])
        row[name] = {
            "seconds": inner["seconds"],
            "process_seconds": run.seconds,  # with the interpreter's start and the imports
            "mb_per_s": text_bytes / MB / inner["seconds"],
            "tokens": inner["tokens"],
            "peak_rss_mb": run.peak_rss / MB,
            "peak_private_mb": run.peak_private / MB,
        }
        shutil.rmtree(work / "out", ignore_errors=True)
    row["ratio"] = row["stage"]["mb_per_s"] / row["bare"]["mb_per_s"]
    row["ratio_script"] = row["stage"]["mb_per_s"] / row["script"]["mb_per_s"]
    shutil.rmtree(prepared)
    shutil.rmtree(work / "tokenizer")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100", help="corpus sizes in MB, comma-separated")
    parser.add_argument("--large", action="store_true", help="add the 1,000 MB corpus (minutes, ~3 GB of disk)")
    parser.add_argument("--memory-limit-mb", type=int, default=0, help="run each child in a memory cgroup this big")
    add_save_option(parser)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")] + ([1000] if args.large else [])
    print(f"machine: {machine()}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-tokenize-") as scratch:
        tokenizer_work = Path(scratch) / "tokenizer-source"
        write_corpus(tokenizer_work / "prepared/train/00000.jsonl", 10 * MB)
        run_measured([__file__, "_train", str(tokenizer_work)], cwd=ROOT)
        for size in sizes:
            row = measure(Path(scratch) / f"{size}mb", size, tokenizer_work / "tokenizer", args.memory_limit_mb * 2**20)
            rows.append(row)
            print(
                f"{size:>5} MB: stage {row['stage']['mb_per_s']:.2f} MB/s ({row['stage']['seconds']:.1f} s; process "
                f"{row['stage']['process_seconds']:.1f} s; peak RSS "
                f"{row['stage']['peak_rss_mb']:,.0f} MB, of it private {row['stage']['peak_private_mb']:,.0f} MB), "
                f"bare encode_batch {row['bare']['mb_per_s']:.2f} MB/s "
                f"({row['bare']['seconds']:.1f} s, {row['bare']['peak_rss_mb']:,.0f} MB), ratio {row['ratio']:.3f}; "
                f"hand-written script {row['script']['mb_per_s']:.2f} MB/s ({row['script']['seconds']:.1f} s), "
                f"ratio {row['ratio_script']:.3f}; "
                f"tokens {row['stage']['tokens']:,} / {row['bare']['tokens']:,}",
                flush=True,
            )
    for small, large in itertools.pairwise(rows):  # linear: the same seconds per MB at every size
        grew, text = large["stage"]["seconds"] / small["stage"]["seconds"], large["text_mb"] / small["text_mb"]
        print(f"{small['size_mb']} -> {large['size_mb']} MB: stage seconds x{grew:.2f} for text x{text:.2f}")
    save(args.save, rows)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in ("_stage", "_bare", "_script", "_train"):
        {"_stage": stage, "_bare": bare, "_script": script, "_train": train_tokenizer}[sys.argv[1]](Path(sys.argv[2]))
    else:
        main()
