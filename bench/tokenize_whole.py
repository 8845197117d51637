"""The whole tokenize stage as a user waits for it, against a hand-written script.

The stage is `dvc repro --single-item --force tokenize` (DVC's start, the stage's interpreter and imports, training
the byte-level BPE on the train split, encoding both splits, writing the blocks and the tokenizer, DVC hashing
and caching them) and, with --stage-alone, `python -m tasks.tokenize`; the script does the same work with
`tokenizers` and numpy.

The corpus (the bundled Shakespeare and Tang poems, shuffled and repeated; 99% train, 1% validation) is written
as the ingest stage's output in a copy of the project, with the project's params.yaml (vocab_size 4,096,
block_size 128). The script trains the same BPE (the same trainer settings), encodes both splits with
`encode_batch` 1,000 records at a time, ends each record with the end-of-text id, cuts 128-token blocks and
saves them with `np.save`, and saves `tokenizer.json`. Both run as whole processes, alternating, `--rounds`
times; medians are shown.
Run: python bench/tokenize_whole.py [--mb 50] [--rounds 3] [--stage-alone]
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import add_save_option, machine, run_measured, save
from tools.corpora import MB, write_corpus
from tools.project import copy_project, tool_env


def prepared_texts(prepared: Path, split: str):
    with (prepared / split / "00000.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            yield json.loads(line)["text"]


def script_blocks(tokenizer, prepared: Path, out: Path, block: int) -> int:
    """The hand-written encoding.

    Both splits with `encode_batch`, 1,000 records at a time, each record ended with the end-of-text id, cut into
    blocks and saved with np.save; returns the tokens."""
    import numpy as np

    eos, tokens = tokenizer.token_to_id("<|endoftext|>"), 0
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation"):
        parts: list[np.ndarray] = []  # one int32 array a batch: a Python list of every id would not fit at 1 GB
        batch: list[str] = []
        for text in itertools.chain(prepared_texts(prepared, split), [None]):  # None: the end, flush
            if text is not None:
                batch.append(text)
            if len(batch) == 1000 or (text is None and batch):
                ids: list[int] = []
                for encoding in tokenizer.encode_batch(batch, add_special_tokens=False):
                    ids.extend(encoding.ids)
                    ids.append(eos)
                parts.append(np.array(ids, dtype=np.int32))
                batch = []
        stream = np.concatenate(parts)
        np.save(out / f"{split}.npy", stream[: len(stream) // block * block].reshape(-1, block))
        tokens += len(stream)
    return tokens


def script(project: Path) -> None:
    """The hand-written reference: what a user would write to do the tokenize stage's work."""
    import yaml
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    params = yaml.safe_load((project / "params.yaml").read_text())["tokenizer"]
    prepared, out = project / "data/prepared", project / "script-out"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=params["vocab_size"],
        min_frequency=params["min_frequency"],
        special_tokens=["<|endoftext|>", "[SEP]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(prepared_texts(prepared, "train"), trainer=trainer)
    script_blocks(bpe, prepared, out, params["block_size"])
    bpe.save(str(out / "tokenizer.json"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=50, help="corpus size in MB of text")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stage-alone", action="store_true", help="also time `python -m tasks.tokenize` alone")
    add_save_option(parser)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="bench-tokenize-whole-") as scratch:
        project = copy_project(Path(scratch))
        prepared = project / "data/prepared"
        text = write_corpus(prepared / "train/00000.jsonl", args.mb * MB * 99 // 100)
        text += write_corpus(prepared / "validation/00000.jsonl", args.mb * MB // 100, seed=1)
        stats = {split: {"records": 1, "chars": 1, "bytes": 1} for split in ("train", "validation")}
        (prepared / "stats.json").write_text(json.dumps(stats))  # only read into the figures kept with the blocks
        arms = {
            "script": [__file__, "_script", str(project)],
            "dvc repro": ["-m", "dvc", "repro", "--single-item", "--force", "tokenize"],
        }
        if args.stage_alone:
            arms["stage"] = ["-m", "tasks.tokenize"]
        times: dict[str, list[float]] = {name: [] for name in arms}
        for round_ in range(args.rounds):
            for name, command in arms.items():
                run = run_measured(command, cwd=project, env=tool_env())
                if "Traceback" in run.output or "error:" in run.output.lower():
                    raise SystemExit(f"{name} failed:\n{run.output[-3000:]}")
                times[name].append(run.seconds)
                shutil.rmtree(project / "script-out", ignore_errors=True)
            print(f"round {round_ + 1}: " + ", ".join(f"{name} {spent[-1]:.1f} s" for name, spent in times.items()))
        medians = {name: statistics.median(spent) for name, spent in times.items()}
        print(
            f"{text / MB:.1f} MB of text, medians of {args.rounds} (whole processes): hand-written script "
            f"{medians['script']:.1f} s; `dvc repro` of the stage {medians['dvc repro']:.1f} s "
            f"({medians['script'] / medians['dvc repro']:.2f} x the script's speed)"
            + (
                f"; the stage alone {medians['stage']:.1f} s ({medians['script'] / medians['stage']:.2f} x)"
                if args.stage_alone
                else ""
            )
        )
        save(args.save, {"text_mb": text / MB, "rounds": args.rounds, "median_s": medians})


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_script":
        script(Path(sys.argv[2]))
    else:
        main()
