"""Stage `ingest`: read data.sources, normalize, drop short and duplicate records, split train/validation.

Writes data/prepared/{train,validation}/NNNNN.jsonl (shards, one {"text": ...} per record, in the sources' order)
and data/prepared/stats.json.
Run: python -m tasks.ingest
"""

from __future__ import annotations

import array
import functools
import hashlib
import io
import itertools
import json
import sys
import tempfile
import unicodedata
from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tasks.data.digests import DigestSet
from tasks.data.parallel import cluster, ordered_map, workers
from tasks.data.pieces import Located, Piece, plan
from tasks.data.sources import check_tracked, read_piece, record_text, record_turns, resolve_sources, utf8_errors
from tasks.plumbing.errors import PipelineError
from tasks.plumbing.outputs import atomic_output
from tasks.plumbing.params import DataParams, load_params
from tasks.plumbing.paths import DVC_YAML, PREPARED_DIR, SPLITS, data_deps
from tasks.plumbing.stage import run_cli


def normalize(text: str) -> str:
    """Unicode NFC, no trailing whitespace on any line, no empty lines."""
    lines = (line.rstrip() for line in unicodedata.normalize("NFC", text).splitlines())
    return "\n".join(line for line in lines if line)


def in_validation(text: str, fraction: float, seed: int) -> bool:
    """Deterministic split by a seeded hash of the text: independent of record order and of other records."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=seed.to_bytes(8, "little", signed=True))
    return int.from_bytes(digest.digest(), "little") / 2**64 < fraction


def ingest(params: DataParams, out_dir: Path = PREPARED_DIR) -> dict[str, Any]:
    """Read, normalize, deduplicate and split the sources into out_dir's shards. Returns the stats written.

    Each unit of the plan (tasks/data/pieces.py) is prepared on its own, by data.workers processes at once (or on a Ray
    cluster, data.executor), into one shard per split; duplicates across units are then removed in the units'
    order as this process writes the shards, so they are the same bytes whatever ran them and on how many cores.
    """
    fields = [params.text_field] if isinstance(params.text_field, str) else list(params.text_field)
    sources, held_out = split_sources(params)
    read_records = functools.partial(_parsed, fields=fields, params=params)
    units = plan(sources + held_out, params.shard_mb << 20, read_records, params.max_record_bytes)
    with atomic_output(out_dir) as tmp:
        for split in SPLITS:
            (tmp / split).mkdir(parents=True)
        prepare = functools.partial(_prepare_unit, fields=fields, params=params, held_out=frozenset(held_out))
        on_cluster = cluster(params.executor, params.ray_address)
        processes = workers(params.workers, local=on_cluster is None)
        first = list(itertools.islice(units, processes))  # no more processes than units (a small corpus has one)
        processes = min(processes, max(len(first), 1))
        # The digests' scratch folder is inside the new output: whatever stops the stage leaves nothing else.
        with tempfile.TemporaryDirectory(prefix=".digests-", dir=tmp) as scratch:
            merged = _Merge(Path(scratch))
            work = enumerate(itertools.chain(first, units))
            del first  # the chain holds them until they are handed out, not for the whole run
            with closing(ordered_map(prepare, work, processes, on_cluster=on_cluster)) as prepared:
                for unit in prepared:
                    merged.add(unit, tmp)
        stats = {**merged.stats, "dropped": merged.dropped}
        _check_kept(stats, merged.texts, sources + held_out)
        stats.update(sources=sources, validation_sources=held_out, shards=merged.units)
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return stats


def split_sources(params: DataParams) -> tuple[list[str], list[str]]:
    """data.sources and data.validation_sources resolved; a file both name is refused (its records would be on
    both sides)."""
    sources = resolve_sources(params.sources, params.allow_outside_project)
    if not params.validation_sources:
        return sources, []
    held_out = resolve_sources(params.validation_sources, params.allow_outside_project)
    both = sorted(set(sources) & set(held_out))
    if both:
        raise PipelineError(
            f"data.validation_sources: {both[0]} is also in data.sources; a file is trained on or held out, "
            "not both: name it in one of them"
        )
    return sources, held_out


def _parsed(source: str, fields: list[str], params: DataParams) -> Iterator[Located]:
    """A source's raw records as plan reads them (a .json list, a .csv file, an hf: dataset), its errors as the
    workers give them."""
    with utf8_errors(source):
        yield from read_piece(Piece(source), fields, params)


@dataclass
class Unit:
    """What preparing one unit left: its shards' bytes, its records' digests, splits, characters and bytes in
    order, and counts.

    Arrays, not lists of Python objects: a web corpus has millions of records, and every unit's figures pass
    through the parent (from another machine, on a cluster)."""

    index: int
    digests: bytearray = field(default_factory=bytearray)  # 16 bytes a record
    splits: bytearray = field(default_factory=bytearray)  # 1: validation
    chars: array.array = field(default_factory=lambda: array.array("q"))
    sizes: array.array = field(default_factory=lambda: array.array("q"))
    short: int = 0
    duplicate: int = 0
    texts: dict[str, int] = field(default_factory=dict)  # records with text, by source
    shards: dict[str, bytes] = field(default_factory=dict)  # each split's JSON lines


def _prepare_unit(
    indexed: tuple[int, list[Piece]], fields: list[str], params: DataParams, held_out: frozenset[str] = frozenset()
) -> Unit:
    """One unit's records normalized, deduplicated within it and split: a record of a held-out source is
    validation, any other train; without held-out sources a seeded hash of its text decides."""
    index, pieces = indexed
    unit = Unit(index)
    seen: set[bytes] = set()  # 16-byte digests: memory grows with unique records, not with their text
    shards = [io.BytesIO() for _ in SPLITS]
    for source, record in _normalized(pieces, fields, params, unit.texts):
        text = record["text"]
        if len(text) < params.min_chars:
            unit.short += 1
            continue
        encoded = text.encode("utf-8")
        digest = hashlib.blake2b(encoded, digest_size=16).digest()
        if digest in seen:
            unit.duplicate += 1
            continue
        seen.add(digest)
        held = source in held_out if held_out else in_validation(text, params.validation_fraction, params.seed)
        validation = int(held)
        shards[validation].write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
        unit.digests += digest
        unit.splits.append(validation)
        unit.chars.append(len(text))
        unit.sizes.append(len(encoded))
    unit.shards = {split: shard.getvalue() for split, shard in zip(SPLITS, shards, strict=True)}
    return unit


class _Merge:
    """The units merged one after another in their order.

    A record an earlier unit already holds is dropped (the first of equal texts is kept, as in one pass over all
    sources) as the unit's shards are written; the rest is counted."""

    def __init__(self, scratch: Path) -> None:
        self.stats: dict[str, Any] = {split: {"records": 0, "chars": 0, "bytes": 0} for split in SPLITS}
        self.dropped = {"short": 0, "duplicate": 0}
        self.texts: dict[str, int] = {}
        self.seen = DigestSet(scratch)
        self.units = 0

    def add(self, unit: Unit, out: Path) -> None:
        self.units += 1
        self.dropped["short"] += unit.short
        self.dropped["duplicate"] += unit.duplicate
        for source, count in unit.texts.items():
            self.texts[source] = self.texts.get(source, 0) + count
        repeated = self.seen.add_new(bytes(unit.digests))
        splits = np.frombuffer(unit.splits, dtype=np.uint8)
        chars, sizes = np.frombuffer(unit.chars, dtype=np.int64), np.frombuffer(unit.sizes, dtype=np.int64)
        for index, split in enumerate(SPLITS):
            kept = ~repeated & (splits == index)
            counts = self.stats[split]
            counts["records"] += int(kept.sum())
            counts["chars"] += int(chars[kept].sum())
            counts["bytes"] += int(sizes[kept].sum())
        self.dropped["duplicate"] += int(repeated.sum())
        _write_without(unit, set(np.flatnonzero(repeated).tolist()), out)


def _write_without(unit: Unit, repeated: set[int], out: Path) -> None:
    """Write a unit's shards without the records at the given positions (counted across both splits)."""
    for split_index, split in enumerate(SPLITS):
        data = unit.shards.pop(split)
        if repeated:
            positions = [p for p, s in enumerate(unit.splits) if s == split_index]
            lines = data.split(b"\n")[:-1]  # JSON escapes a newline inside a text: one record a line
            data = b"".join(line + b"\n" for line, p in zip(lines, positions, strict=True) if p not in repeated)
        (out / split / f"{unit.index:05d}.jsonl").write_bytes(data)


def _check_kept(stats: dict[str, Any], texts: dict[str, int], sources: list[str]) -> None:
    """Sources without any text are named on stderr; no text at all, or an empty split, stops the stage."""
    empty = [source for source in sources if not texts.get(source)]
    for source in empty:
        print(f"warning: {source}: no text (empty, or only whitespace)", file=sys.stderr)
    kept = stats["train"]["records"] + stats["validation"]["records"]
    if kept == 0 and empty:
        raise PipelineError(
            f"data.sources: no text in {', '.join(empty)} (empty, or only whitespace); add text or list other files"
        )
    for split in SPLITS:
        if stats[split]["records"] == 0:
            raise PipelineError(
                f"data.sources: the {split} split is empty ({kept} records kept in all); "
                "add text, lower data.min_chars or change data.validation_fraction (or data.validation_sources)"
            )


def _normalized(
    pieces: list[Piece], fields: list[str], params: DataParams, texts: dict[str, int]
) -> Iterable[tuple[str, dict]]:
    """Prepared records: {"text"}, or for dialogues {"text", "turns"} with the turns also joined by newlines.
    Counts the records with text of each source into `texts`."""
    dialog = params.format == "dialog"
    for piece in pieces:
        count = 0
        with utf8_errors(piece.source):
            for where, raw in read_piece(piece, fields, params):
                if dialog:
                    turns = [turn for turn in map(normalize, record_turns(raw, fields, where)) if turn]
                    record = {"text": "\n".join(turns), "turns": turns}
                else:
                    record = {"text": normalize(record_text(raw, fields, where))}
                count += bool(record["text"])
                yield piece.source, record
        texts[piece.source] = texts.get(piece.source, 0) + count


def main() -> None:
    params = load_params()
    if DVC_YAML.is_file():  # run as a stage of this project (dvc repro, the flow), not on a folder of its own
        sources, held_out = split_sources(params.data)
        check_tracked(sources + held_out, data_deps("ingest"))
    stats = ingest(params.data)
    print(
        f"ingest: {stats['train']['records']} train / {stats['validation']['records']} validation records "
        f"from {len(stats['sources'])} source(s) -> {PREPARED_DIR}"
    )


if __name__ == "__main__":
    run_cli(main)
