"""Stage `ingest`: read data.sources, normalize, drop short and duplicate records, split train/validation.

Writes data/prepared/{train,validation}.jsonl (one {"text": ...} per record) and data/prepared/stats.json.
Run: python -m tasks.ingest
"""

from __future__ import annotations

import hashlib
import json
import sys
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tasks.errors import PipelineError
from tasks.outputs import atomic_output
from tasks.params import DataParams, load_params
from tasks.paths import PREPARED_DIR, SPLITS
from tasks.sources import first_invalid_utf8, read_source, record_text, record_turns, resolve_sources
from tasks.stage import run_cli


def normalize(text: str) -> str:
    """Unicode NFC, no trailing whitespace on any line, no empty lines."""
    lines = (line.rstrip() for line in unicodedata.normalize("NFC", text).splitlines())
    return "\n".join(line for line in lines if line)


def in_validation(text: str, fraction: float, seed: int) -> bool:
    """Deterministic split by a seeded hash of the text: independent of record order and of other records."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=seed.to_bytes(8, "little", signed=True))
    return int.from_bytes(digest.digest(), "little") / 2**64 < fraction


def ingest(params: DataParams, out_dir: Path = PREPARED_DIR) -> dict[str, Any]:
    """Read, normalize, deduplicate and split the sources into out_dir. Returns the stats written."""
    fields = [params.text_field] if isinstance(params.text_field, str) else list(params.text_field)
    sources = resolve_sources(params.sources, params.allow_outside_project)
    stats: dict[str, Any] = {split: {"records": 0, "chars": 0, "bytes": 0} for split in SPLITS}
    dropped = {"short": 0, "duplicate": 0}
    seen: set[bytes] = set()  # 16-byte digests: memory grows with unique records, not with their text
    empty: list[str] = []
    with atomic_output(out_dir) as tmp:
        tmp.mkdir(parents=True)
        handles = {split: (tmp / f"{split}.jsonl").open("w", encoding="utf-8") for split in SPLITS}
        try:
            for record in _normalized(sources, fields, params, empty):
                text = record["text"]
                if len(text) < params.min_chars:
                    dropped["short"] += 1
                    continue
                digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
                if digest in seen:
                    dropped["duplicate"] += 1
                    continue
                seen.add(digest)
                split = "validation" if in_validation(text, params.validation_fraction, params.seed) else "train"
                handles[split].write(json.dumps(record, ensure_ascii=False) + "\n")
                counts = stats[split]
                counts["records"] += 1
                counts["chars"] += len(text)
                counts["bytes"] += len(text.encode("utf-8"))
        finally:
            for handle in handles.values():
                handle.close()
        kept = stats["train"]["records"] + stats["validation"]["records"]
        if kept == 0 and empty:
            raise PipelineError(
                f"data.sources: no text in {', '.join(empty)} (empty, or only whitespace); add text or list other files"
            )
        for split in SPLITS:
            if stats[split]["records"] == 0:
                raise PipelineError(
                    f"data.sources: the {split} split is empty ({kept} records kept in all); "
                    "add text, lower data.min_chars or change data.validation_fraction"
                )
        stats.update(dropped=dropped, sources=sources)
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return stats


def _normalized(
    sources: list[str], fields: list[str], params: DataParams, empty: list[str]
) -> Iterable[dict[str, Any]]:
    """Prepared records: {"text"}, or for dialogues {"text", "turns"} with the turns also joined by newlines.
    Sources that hold no text at all are added to `empty` and named on stderr."""
    dialog = params.format == "dialog"
    for source in sources:
        count = 0
        try:
            for where, raw in read_source(source, fields, params):
                if dialog:
                    turns = [turn for turn in map(normalize, record_turns(raw, fields, where)) if turn]
                    record = {"text": "\n".join(turns), "turns": turns}
                else:
                    record = {"text": normalize(record_text(raw, fields, where))}
                count += bool(record["text"])
                yield record
        except UnicodeDecodeError:
            line, offset = first_invalid_utf8(Path(source))
            raise PipelineError(
                f"{source}:{line}: not valid UTF-8 (byte {offset} of the file); convert it to UTF-8 "
                "(e.g. iconv -f <encoding> -t UTF-8) or remove the file from data.sources"
            ) from None
        if count == 0:
            empty.append(source)
            print(f"warning: {source}: no text (empty, or only whitespace)", file=sys.stderr)


def main() -> None:
    params = load_params()
    stats = ingest(params.data)
    print(
        f"ingest: {stats['train']['records']} train / {stats['validation']['records']} validation records "
        f"from {len(stats['sources'])} source(s) -> {PREPARED_DIR}"
    )


if __name__ == "__main__":
    run_cli(main)
