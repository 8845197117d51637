"""Ingest on compressed corpora: peak memory as a .jsonl.gz grows, as one file and as many.

For each size, a corpus of unique records (tools/corpora.py, as bench/data_scaling.py writes it) is gzipped as one
.jsonl.gz file and as .jsonl.gz files of 64 MB of text each, under data/corpora/ of a copy of the project; each is
read by `python -m tasks.ingest` with data.workers 2 (its time, and its peak private memory over its process
tree), and by a bare reference: one Python process that decompresses the same files as a stream and parses each
line with json.loads, the least any reader of them does (its time and peak memory). Ingest's memory is flat in
the file's size when the larger corpus's peak is about the smaller's.
Run: python bench/ingest_compressed.py [--sizes-mb 300,3000]
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from bench.measure import add_save_option, machine, run_measured, save
from tools.corpora import MB, write_unique_corpus
from tools.project import copy_project, tool_env

CORPUS = Path("data/corpora/bench")
# The bare reference: decompress and parse every line, keeping nothing.
BARE = (
    "import gzip, json, sys\n"
    "for name in sys.argv[1:]:\n"
    "    with gzip.open(name, 'rb') as handle:\n"
    "        for line in handle:\n"
    "            json.loads(line)\n"
)


def gzipped(plain: list[Path], folder: Path, one_file: bool) -> list[Path]:
    """The plain JSONL files compressed (level 1, as a corpus dump would be): into one file, or one each."""
    folder.mkdir(parents=True)
    targets = [folder / "corpus.jsonl.gz"] if one_file else [folder / f"{p.name}.gz" for p in plain]
    for index, source in enumerate(plain):
        target = targets[0 if one_file else index]
        with source.open("rb") as reader, gzip.open(target, "ab", compresslevel=1) as writer:
            shutil.copyfileobj(reader, writer, 1 << 24)
    return targets


def measure(project: Path, size_mb: int) -> list[dict]:
    plain_folder = project.parent / "plain"
    text = write_unique_corpus(plain_folder, size_mb * MB, seed=size_mb)
    plain = sorted(plain_folder.glob("*.jsonl"))
    rows = []
    for layout in ("one file", "many files"):
        files = gzipped(plain, project / CORPUS, one_file=layout == "one file")
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["data"].update(sources=[f"{CORPUS}/*.jsonl.gz"], workers=2)
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        ingest = run_measured(["-m", "tasks.ingest"], cwd=project, env=tool_env())
        bare = run_measured(["-c", BARE, *map(str, files)], cwd=project, env=tool_env())
        row = {
            "size_mb": size_mb,
            "text_mb": text / MB,
            "layout": layout,
            "files": len(files),
            "input_mb": sum(f.stat().st_size for f in files) / MB,
            "ingest": {"seconds": ingest.seconds, "peak_private_mb": ingest.peak_private / MB},
            "bare": {"seconds": bare.seconds, "peak_private_mb": bare.peak_private / MB},
        }
        rows.append(row)
        print(f"{text / MB:,.0f} MB, {layout}: ingest {ingest.seconds:.1f} s, peak {ingest.peak_private / MB:,.0f} MB; "
              f"bare {bare.seconds:.1f} s, peak {bare.peak_private / MB:,.0f} MB", flush=True)  # fmt: skip
        for output in (CORPUS, Path("data/prepared")):
            shutil.rmtree(project / output, ignore_errors=True)
    shutil.rmtree(plain_folder)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", default="300,3000", help="corpus sizes in MB of text, comma-separated")
    add_save_option(parser)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-gz-") as scratch:
        project = copy_project(Path(scratch))
        for size in (int(size) for size in args.sizes_mb.split(",")):
            rows.extend(measure(project, size))
    save(args.save, rows)


if __name__ == "__main__":
    main()
