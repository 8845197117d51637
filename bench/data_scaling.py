"""Data preparation at scale: the ingest and tokenize stages on a corpus of many files, on 1 and 2 (or more) cores.

Each with data.workers set to the count (processes and the tokenizer's threads): their time, peak memory and disk,
whether the outputs are the same bytes for every worker count, and what DVC costs with those outputs in place
(`dvc status`, a no-op `dvc repro`).

The corpus is JSONL files of 64 MB, each record three of the bundled samples (Shakespeare's paragraphs, Tang
poems) drawn at random and joined, so that deduplication keeps every record, as it would a web corpus. The
stages run as `python -m tasks.<stage>` processes in a copy of the project with its params.yaml, except: the
sources are those files, data.workers is set per run, and tokenize uses a 4,096-token byte-level BPE trained
once on 10 MB of the same text (tokenizer.kind: pretrained), so the time is encoding and writing, as it is for a
corpus whose tokenizer is given (GPT-2's). Peak RSS is sampled over each stage's whole process tree.
`dvc commit` links the outputs into the cache (cache.type hardlink), so 10 GB of text needs about 50 GB of disk.
Run: python bench/data_scaling.py [--sizes-mb 1000] [--workers 1,2]   (--sizes-mb 10000 --workers 2 for 10 GB)
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from bench.measure import add_save_option, machine, run_measured, save
from tools.corpora import MB, write_corpus, write_unique_corpus
from tools.project import BIN, copy_project, tool_env

OUTPUTS = ("data/prepared", "data/tokenized")
CORPUS = Path("data/corpora/bench")  # under ingest's data deps, as a user's corpus is


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        with path.open("rb") as handle:
            while block := handle.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def disk_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / MB


def set_params(project: Path, workers: int, tokenizer: Path) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"].update(sources=[f"{CORPUS}/*.jsonl"], workers=workers)
    params["tokenizer"]["kind"] = "pretrained"
    params["model"].update(init="pretrained", name_or_path=str(tokenizer))
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def train_tokenizer(scratch: Path) -> Path:
    """A 4,096-token byte-level BPE trained on 10 MB of the samples, saved as a folder."""
    source = scratch / "tokenizer-source/train/00000.jsonl"
    write_corpus(source, 10 * MB)
    folder = scratch / "tokenizer"
    code = (
        "import sys; from pathlib import Path; from tasks.plumbing.params import TokenizerParams; "
        "from tasks.data.tokenizer import train_bpe; "
        "train_bpe([Path(sys.argv[1])], TokenizerParams(vocab_size=4096)).save_pretrained(sys.argv[2])"
    )
    run_measured(["-c", code, str(source), str(folder)], cwd=Path(__file__).resolve().parents[1])
    return folder


def timed(args: list[str], project: Path) -> float:
    started = time.perf_counter()
    subprocess.run(args, cwd=project, env=tool_env(), check=True, capture_output=True)
    return time.perf_counter() - started


def measure(project: Path, size_mb: int, counts: list[int], tokenizer: Path) -> dict:
    text = write_unique_corpus(project / CORPUS, size_mb * MB, seed=size_mb)
    row: dict = {"size_mb": size_mb, "text_mb": text / MB, "input_mb": disk_mb(project / CORPUS), "runs": {}}
    digests = set()
    for workers in counts:
        set_params(project, workers, tokenizer)
        run = row["runs"][workers] = {}
        for stage in ("ingest", "tokenize"):
            measured = run_measured(["-m", f"tasks.{stage}"], cwd=project, env=tool_env())
            run[stage] = {
                "seconds": measured.seconds,
                "peak_rss_mb": measured.peak_rss / MB,
                "peak_private_mb": measured.peak_private / MB,
            }
            print(f"{size_mb} MB, {workers} workers: {stage} {measured.seconds:.1f} s, "
                  f"peak RSS {measured.peak_rss / MB:,.0f} MB", flush=True)  # fmt: skip
        if len(counts) > 1:  # reading every output again only to compare them
            digests.add(tuple(folder_digest(project / output) for output in OUTPUTS))
    row["identical"] = len(digests) == 1 if len(counts) > 1 else None
    row["output_mb"] = {output: disk_mb(project / output) for output in OUTPUTS}
    dvc = str(BIN / "dvc")
    timed([dvc, "commit", "--force", "ingest", "tokenize"], project)  # the outputs as dvc.lock records them
    row["dvc_status_s"] = min(timed([dvc, "status", "tokenize"], project) for _ in range(3))
    row["dvc_repro_noop_s"] = min(timed([dvc, "repro", "tokenize"], project) for _ in range(3))
    print(
        f"{size_mb} MB: same outputs for every worker count: {row['identical']} (None: one count); dvc status "
        f"{row['dvc_status_s']:.1f} s, no-op dvc repro {row['dvc_repro_noop_s']:.1f} s",
        flush=True,
    )
    for output in (str(CORPUS), *OUTPUTS, ".dvc/cache"):
        shutil.rmtree(project / output, ignore_errors=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", default="1000", help="corpus sizes in MB of text, comma-separated")
    parser.add_argument("--workers", default="1,2", help="data.workers to compare, comma-separated")
    add_save_option(parser)
    args = parser.parse_args()
    counts = [int(count) for count in args.workers.split(",")]
    print(f"machine: {machine()}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as scratch:
        tokenizer = train_tokenizer(Path(scratch))
        project = copy_project(Path(scratch))
        # The outputs linked into the cache by `dvc commit`, not copied (DVC's advice for large data): the
        # outputs of 10 GB of text then fit on the disk once.
        subprocess.run([str(BIN / "dvc"), "config", "--local", "cache.type", "hardlink"], cwd=project, env=tool_env(),
                       check=True, capture_output=True)  # fmt: skip
        subprocess.run([str(BIN / "dvc"), "repro", "--dry", "ingest"], cwd=project, env=tool_env(), check=True,
                       capture_output=True)  # fmt: skip
        for size in (int(size) for size in args.sizes_mb.split(",")):
            rows.append(measure(project, size, counts, tokenizer))
    save(args.save, rows)


if __name__ == "__main__":
    main()
