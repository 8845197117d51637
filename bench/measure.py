"""What the benchmarks share: timing a child process with the peak RSS of its whole process tree, synthetic
corpora built from the bundled samples, and the machine line every docs/benchmarks.md row carries."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data/samples"
MB = 1_000_000


@dataclass
class Measured:
    seconds: float
    peak_rss: int  # bytes, the largest sum over the child and all its descendants seen while it ran
    output: str


def run_measured(args: list[str], cwd: Path | None = None, env: dict | None = None, poll: float = 0.05) -> Measured:
    """Run `python args...` and sample the RSS of its tree (map workers included) until it exits."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass  # a worker ended between listing and reading it
        time.sleep(poll)
    output = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child {' '.join(args)} failed ({proc.returncode}):\n{output[-3000:]}")
    return Measured(time.perf_counter() - started, peak, output)


def copy_project(parent: Path) -> Path:
    """The project's tracked and new files in a fresh git repository under parent, as a newcomer's clone has
    them (without dvc.lock: nothing has run there yet)."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    dest = parent / "project"
    for name in files:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    (dest / "dvc.lock").unlink(missing_ok=True)
    for args in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"],
    ):
        subprocess.run(args, cwd=dest, check=True)
    return dest


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


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    return (
        f"{psutil.cpu_count()} cores ({cpu}), {psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"python {platform.python_version()}, torch {torch.__version__}"
    )
