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
    """A JSONL of {"text"} records (the ingest stage's format) of about `size` UTF-8 bytes of text, the samples
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
