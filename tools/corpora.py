"""Synthetic corpora of any size from the bundled samples, for the tests and the benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tools.project import ROOT

SAMPLES = ROOT / "data/samples"
MB = 1_000_000


def sample_records() -> list[str]:
    """The bundled corpora as records: Shakespeare's paragraphs and the Tang poems (title and lines)."""
    english = (SAMPLES / "tinyshakespeare.txt").read_text(encoding="utf-8").split("\n\n")
    poems = json.loads((SAMPLES / "tang300.json").read_text(encoding="utf-8"))
    chinese = ["\n".join([poem["title"], *poem["paragraphs"]]) for poem in poems]
    return [text.strip() for text in english + chinese if text.strip()]


def write_corpus(path: Path, size: int, seed: int = 0) -> int:
    """A JSONL of about `size` bytes of text from the samples; returns the bytes written.

    A JSONL of {"text"} records (the ingest stage's format) of about `size` UTF-8 bytes of text, the samples
    shuffled and repeated; returns the exact text bytes written."""
    records, rng, written = sample_records(), np.random.default_rng(seed), 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        while written < size:
            for index in rng.permutation(len(records)):
                text = records[index]
                handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                written += len(text.encode("utf-8"))
                if written >= size:
                    break
    return written


def write_unique_corpus(folder: Path, size: int, file_size: int = 64 * MB, seed: int = 0) -> int:
    """JSONL files of about `size` bytes of text, no two records alike; returns the bytes written.

    JSONL files of about file_size bytes each under folder, about `size` UTF-8 bytes of text in all, every record
    three samples joined (drawn at random, so no two records are alike and deduplication keeps them all, as it would
    a web corpus); returns the exact text bytes written."""
    records, rng, written, part = sample_records(), np.random.default_rng(seed), 0, 0
    folder.mkdir(parents=True, exist_ok=True)
    while written < size:
        with (folder / f"part-{part:05d}.jsonl").open("w", encoding="utf-8") as handle:
            in_file = 0
            while in_file < file_size and written < size:
                picks = rng.integers(0, len(records), (256, 3))
                lines = ["\n\n".join(records[i] for i in pick) for pick in picks]
                handle.writelines(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in lines)
                count = sum(len(text.encode("utf-8")) for text in lines)
                written, in_file = written + count, in_file + count
        part += 1
    return written


def held_out_tail(source: Path, folder: Path, fraction: float = 0.1) -> tuple[Path, Path]:
    """`source` cut in two at the paragraph break nearest (1 - fraction) of its characters: folder/train.txt and
    folder/validation.txt, for data.sources and data.validation_sources (nanoGPT holds out Shakespeare's last 10%
    this way). Returns the two paths; files already holding those texts are left as they are."""
    text = source.read_text(encoding="utf-8")
    cut = text.rfind("\n\n", 0, round(len(text) * (1 - fraction))) + 2
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.txt", folder / "validation.txt"
    for path, part in zip(paths, (text[:cut], text[cut:]), strict=True):
        if not path.is_file() or path.read_text(encoding="utf-8") != part:
            path.write_text(part, encoding="utf-8")
    return paths


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Corpora for the benchmarks and the recipe search.")
    parser.add_argument(
        "corpus",
        choices=["shakespeare-tail"],
        help="shakespeare-tail: the bundled Shakespeare's "
        "first 90%% (train.txt) and last 10%% (validation.txt) in data/corpora/tinyshakespeare/",
    )
    parser.parse_args()
    for written in held_out_tail(SAMPLES / "tinyshakespeare.txt", ROOT / "data/corpora/tinyshakespeare"):
        print(f"{written.relative_to(ROOT)}: {written.stat().st_size:,} bytes")
