"""Stage `tokenize`: train (or load) the tokenizer, then cut both splits into block_size blocks.

Writes models/tokenizer/ (loadable by AutoTokenizer.from_pretrained) and data/tokenized/ (a DatasetDict with
`train` and `validation`, columns `input_ids`, `token_bytes` and `token_chars`, in the layout of datasets'
save_to_disk: datasets.load_from_disk reads it). The blocks are written once, batch by batch, straight into the
new output folder: no Arrow cache, no copy.
Run: python -m tasks.tokenize
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np

from tasks.data.blocks import TokenSizes, encode_and_group
from tasks.data.parallel import cluster, ordered_map, workers
from tasks.data.tokenizer import build_tokenizer
from tasks.plumbing.errors import PipelineError
from tasks.plumbing.outputs import atomic_outputs, hash_file, read_json, write_json
from tasks.plumbing.params import ModelParams, TokenizerParams, load_params
from tasks.plumbing.paths import (
    DATA_STATS,
    FRAMING_FIGURE,
    INGEST_STATS,
    PREPARED_DIR,
    SOURCES_FIGURE,
    SPLITS,
    TOKENIZED_DIR,
    TOKENIZER_DIR,
    in_number_order,
    prepared_shards,
)
from tasks.plumbing.stage import run_cli

# Tokens an Arrow file of blocks holds at most (llm.c's shard size): a corpus of billions of tokens is many files
# of bounded size, which DVC hashes, and a remote sends, one by one.
SHARD_TOKENS = 100_000_000
MANIFEST = "manifest.json"  # in data/tokenized: each split's files, with their blocks and tokens
RECORD_BATCH = 1000  # records encoded at a time; each batch's last block_size-1 tokens at most are dropped
SCAN_BYTES = 16 << 20  # read at a time to find the batches' line ends


def blocks_fingerprint(shards: list[Path], tokenizer, block_size: int) -> str:
    """The fingerprint saved with a split's blocks, from what makes them: its text, the tokenizer, block_size.

    Left to itself, datasets derives it from the data files' modification times, new whenever ingest reruns
    or the project is cloned: the saved folder's hash in dvc.lock would change and rerun training on
    identical blocks.
    """
    digest = hashlib.sha256()
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(f"block_size={block_size}".encode())
    for shard in shards:
        hash_file(digest, shard)
    return digest.hexdigest()[:16]


Span = tuple[str, int, int]  # a prepared shard's bytes [start, end)


def batch_spans(shards: list[Path], size: int) -> Iterator[list[Span]]:
    """Where a prepared split's batches of `size` records lie: the byte ranges of its shards each one covers.

    Batches run across shards (so the blocks do not depend on where the shards end); only line ends are looked
    for here, each batch is read and parsed where it is encoded (read_batch)."""
    spans: list[Span] = []
    count = 0
    for shard in shards:
        start = offset = 0
        with shard.open("rb") as handle:
            while chunk := handle.read(SCAN_BYTES):
                ends = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == ord("\n")) + offset + 1
                while len(ends) >= size - count:
                    ends, end = ends[size - count :], int(ends[size - count - 1])
                    yield [*spans, (str(shard), start, end)]
                    spans, count, start = [], 0, end
                count += len(ends)
                offset += len(chunk)
        if offset > start:
            spans.append((str(shard), start, offset))
    if spans:
        yield spans


def read_batch(spans: list[Span]) -> dict[str, list]:
    """A batch's records as columns: {"text": [...]} (and "turns" for dialogues)."""
    records = []
    for path, start, end in spans:
        with open(path, "rb") as handle:
            handle.seek(start)
            records.extend(json.loads(line) for line in handle.read(end - start).split(b"\n") if line)
    return {key: [record[key] for record in records] for key in records[0]}


def _blocks_table(blocks: dict[str, np.ndarray]):
    """encode_and_group's arrays as an Arrow table of list<int32>/list<uint16> columns, without a copy per row."""
    import pyarrow as pa

    rows, width = blocks["input_ids"].shape
    offsets = pa.array(np.arange(0, (rows + 1) * width, width, dtype=np.int32))
    columns = {name: pa.ListArray.from_arrays(offsets, pa.array(array.ravel())) for name, array in blocks.items()}
    return pa.table(columns)


def write_split(
    shards: list[Path],
    folder: Path,
    encode,
    fingerprint: str,
    per_file: int,
    processes: int = 1,
    on_cluster: str | None = None,
) -> list[int]:
    """Encode a split and write its blocks once, at most per_file blocks an Arrow file; returns each file's blocks.

    The files go straight into `folder` in the layout of datasets' save_to_disk (data-NNNNN-of-MMMMM.arrow,
    state.json, dataset_info.json), which load_from_disk reads as one memory-mapped dataset. Each batch's blocks
    depend on that batch alone, so `processes` (or a Ray cluster's, on_cluster) read and encode batches at once and
    the blocks are written in the batches' order: the same bytes however many encode them."""
    from datasets.arrow_writer import ArrowWriter

    folder.mkdir(parents=True)
    if processes > 1:  # set before the fork: each encoder one thread, and tokenizers' fork warning not printed
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    counts: list[int] = []
    writer = None
    try:
        batches = batch_spans(shards, RECORD_BATCH)
        with closing(ordered_map(encode, batches, processes, on_cluster=on_cluster)) as encoded:
            for blocks in encoded:
                table, start = _blocks_table(blocks), 0
                if table.num_rows == 0 and writer is not None:
                    writer.write_table(table)  # as one file always had it: a batch too short for a block
                while start < table.num_rows:
                    if writer is None:
                        writer = ArrowWriter(features=block_features(), path=str(folder / f"part-{len(counts):05d}"))
                        counts.append(0)
                    take = min(per_file - counts[-1], table.num_rows - start)
                    writer.write_table(table if take == table.num_rows else table.slice(start, take))
                    counts[-1], start = counts[-1] + take, start + take
                    if counts[-1] == per_file:  # full: the next block starts the next file
                        writer.finalize()
                        writer = None
        if not counts:  # no blocks at all: one empty file, as datasets writes an empty dataset
            writer = ArrowWriter(features=block_features(), path=str(folder / "part-00000"))
            counts.append(0)
    finally:
        if writer is not None:
            writer.finalize()
    _name_files(folder, len(counts), fingerprint)
    return counts


def _name_files(folder: Path, count: int, fingerprint: str) -> None:
    """The Arrow files under datasets' names (data-00000-of-00002.arrow, ...) with state.json and dataset_info.json."""
    from dataclasses import asdict

    import datasets

    names = [f"data-{index:05d}-of-{count:05d}.arrow" for index in range(count)]
    for index, name in enumerate(names):
        (folder / f"part-{index:05d}").rename(folder / name)
    dataset = datasets.Dataset.from_file(str(folder / names[0]))  # memory-mapped: read for its state, not copied
    state = {key: dataset.__dict__[key] for key in ("_format_columns", "_format_kwargs", "_format_type")}
    state |= {"_fingerprint": fingerprint, "_output_all_columns": False, "_split": folder.name}
    state["_data_files"] = [{"filename": name} for name in names]
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
    info = asdict(dataset.info)
    (folder / "dataset_info.json").write_text(
        json.dumps({k: info[k] for k in sorted(info)}, indent=2), encoding="utf-8"
    )


def block_features():
    """The blocks' columns as datasets types them (list<int32>, list<uint16>)."""
    import datasets

    return datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "token_bytes": datasets.Sequence(datasets.Value("uint16")),
            "token_chars": datasets.Sequence(datasets.Value("uint16")),
        }
    )


def tokenize(
    tokenizer_params: TokenizerParams,
    model_params: ModelParams,
    prepared_dir: Path = PREPARED_DIR,
    tokenizer_dir: Path = TOKENIZER_DIR,
    tokenized_dir: Path = TOKENIZED_DIR,
    dialog: bool = False,
    processes: int = 1,
    on_cluster: str | None = None,
) -> dict[str, Any]:
    """Build the tokenizer and the block datasets (read back with datasets.load_from_disk).

    Returns blocks and tokens per split."""
    shards = {split: prepared_shards(split, prepared_dir) for split in SPLITS}
    for split in SPLITS:
        if not shards[split]:
            raise PipelineError(f"{prepared_dir / split}: no shards; run the ingest stage first (dvc repro)")
    tokenizer, chosen = build_tokenizer(tokenizer_params, model_params, shards["train"], dialog)
    start_id = tokenizer.convert_tokens_to_ids(getattr(tokenizer, chosen.start)) if chosen.start else None
    block_size = tokenizer_params.block_size
    sizes = TokenSizes(tokenizer.backend_tokenizer)

    def encode(spans: list[Span]) -> dict[str, np.ndarray]:
        return encode_and_group(read_batch(spans), tokenizer, block_size, sizes, start_id)

    stats: dict[str, Any] = {"vocab_size": len(tokenizer), "block_size": block_size}
    manifest: dict[str, list[dict[str, Any]]] = {}
    # Both outputs are written in place of a scratch copy and swapped in together: a stop in between never pairs
    # the new blocks with the old tokenizer, and a failure leaves the previous outputs as they were.
    with atomic_outputs(tokenized_dir, tokenizer_dir) as (blocks_tmp, tokenizer_tmp):
        for split in SPLITS:
            fingerprint = blocks_fingerprint(shards[split], tokenizer, block_size)
            per_file = max(1, SHARD_TOKENS // block_size)
            folder = blocks_tmp / split
            files = write_split(shards[split], folder, encode, fingerprint, per_file, processes, on_cluster)
            names = [path.name for path in in_number_order((blocks_tmp / split).glob("*.arrow"))]
            manifest[split] = [
                {"file": f"{split}/{name}", "blocks": count, "tokens": count * block_size}
                for name, count in zip(names, files, strict=True)
            ]
            blocks = sum(files)
            if blocks == 0:
                raise PipelineError(
                    f"{prepared_dir / split}: fewer tokens than one block (tokenizer.block_size={block_size}); "
                    "add text or lower block_size"
                )
            stats[f"{split}_blocks"], stats[f"{split}_tokens"] = blocks, blocks * block_size
        (blocks_tmp / "dataset_dict.json").write_text(json.dumps({"splits": list(SPLITS)}), encoding="utf-8")
        shape = {"block_size": block_size, "shard_tokens": SHARD_TOKENS}
        write_json(blocks_tmp / MANIFEST, {**shape, "splits": manifest})
        ingested = read_json(prepared_dir / INGEST_STATS.name, "ingest")
        figures = data_figures(ingested, stats)
        figures[SOURCES_FIGURE] = ingested.get("sources", [])  # what the run's dataset inputs name as their source
        figures[FRAMING_FIGURE] = chosen.name  # for train (the model's prompt prefix), the run and the card
        stats["framing"] = f"{chosen.name} ({chosen.shown})"
        (blocks_tmp / DATA_STATS.name).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
        tokenizer.save_pretrained(str(tokenizer_tmp))
    return stats


def data_figures(ingest_stats: dict[str, Any], tokenize_stats: dict[str, Any]) -> dict[str, float]:
    """The ingest and tokenize figures as MLflow metrics.

    The ingest and tokenize figures as MLflow metrics (ingest/train_records, tokenize/vocab_size, ...), kept with
    the blocks in data/tokenized/stats.json: the training run logs them, wherever and whenever it runs."""
    figures = {
        f"ingest/{split}_{key}": ingest_stats[split][key] for split in SPLITS for key in ("records", "chars", "bytes")
    }
    figures.update({f"tokenize/{key}": value for key, value in tokenize_stats.items()})
    return figures


def main() -> None:
    params = load_params()
    data = params.data
    on_cluster = cluster(data.executor, data.ray_address)
    dialog, processes = data.format == "dialog", workers(data.workers, local=on_cluster is None)
    # data.workers is a budget of cores: the tokenizers library's own threads (BPE training, encoding in this
    # process) keep to it too, so that 1 means one core, as it does for ingest. Threads never change the outputs.
    os.environ["RAYON_NUM_THREADS"] = str(processes)
    stats = tokenize(params.tokenizer, params.model, dialog=dialog, processes=processes, on_cluster=on_cluster)
    print(
        f"tokenize: vocabulary {stats['vocab_size']}, {stats['train_blocks']} train / "
        f"{stats['validation_blocks']} validation blocks of {stats['block_size']}, framing {stats['framing']} "
        f"-> {TOKENIZED_DIR}"
    )


if __name__ == "__main__":
    run_cli(main)
