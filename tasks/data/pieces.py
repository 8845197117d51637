"""Sources cut into pieces, so that one large file is read by several workers.

A plain .txt or .jsonl file is cut at a record boundary (a blank line, a line end) into pieces of about
data.shard_mb, and small files are packed together into units of that size; each unit becomes one shard per split.
The units depend only on the files and data.shard_mb, never on how many workers read them. A piece is read as a
stream of its own, counting lines from the file's start so that errors keep file:line.
"""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass

TEXT_SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz", ".json", ".csv", ".parquet")
SPLITTABLE = (".txt", ".jsonl")  # read from any record boundary, so cut into pieces


@dataclass(frozen=True)
class Piece:
    """A source, or the byte range [start, end) of a plain .txt or .jsonl file whose first line is `line`."""

    source: str
    start: int = 0
    end: int | None = None
    line: int = 1


def source_format(name: str) -> str | None:
    """The format a file name says (.jsonl for x.jsonl.gz), or None when it is not one ingest reads."""
    lower = name.lower()
    return next((suffix for suffix in TEXT_SUFFIXES if lower.endswith(suffix)), None)


def plan(sources: list[str], shard_bytes: int) -> list[list[Piece]]:
    """Units of work of about shard_bytes each: consecutive pieces of the sources, in order.

    Each unit becomes one shard per split, so the shards depend on the files and shard_bytes, never on how many
    workers read them."""
    units: list[list[Piece]] = []
    current: list[Piece] = []
    size = 0
    for source in sources:
        for piece, length in _pieces(source, shard_bytes):
            if current and size + length > shard_bytes:
                units.append(current)
                current, size = [], 0
            current.append(piece)
            size += length
    return [*units, current] if current else units


def _pieces(source: str, target: int) -> Iterator[tuple[Piece, int]]:
    if source.startswith("hf:") or source_format(source) not in SPLITTABLE:
        yield Piece(source), 0 if source.startswith("hf:") else os.path.getsize(source)
        return
    size, start, line = os.path.getsize(source), 0, 1
    with open(source, "rb") as handle:
        while start < size:
            cut, lines = _boundary(handle, start, start + target, paragraphs=source_format(source) == ".txt")
            yield Piece(source, start, cut, line), cut - start
            start, line = cut, line + lines


def _boundary(handle: io.BufferedReader, start: int, target: int, paragraphs: bool) -> tuple[int, int]:
    """(where the piece from start ends, the line ends in it).

    After the line at target ends, or for paragraphs after the next whitespace-only line; the end of the file if
    there is none."""
    handle.seek(start)
    lines = 0
    while handle.tell() < target and (block := handle.read(min(1 << 24, target - handle.tell()))):
        lines += block.count(b"\n")
    lines += _finish_line(handle)
    while paragraphs and (line := handle.readline(1 << 20)):
        lines += line.endswith(b"\n")
        if not line.strip() and line.endswith(b"\n"):
            break
        if not line.endswith(b"\n"):
            lines += _finish_line(handle)
    return handle.tell(), lines


def _finish_line(handle: io.BufferedReader) -> int:
    """Read to the end of the current line, a megabyte at a time (a line may be any length); 1 if it ended."""
    while chunk := handle.readline(1 << 20):
        if chunk.endswith(b"\n"):
            return 1
    return 0


class _Range(io.RawIOBase):
    """The bytes [start, end) of a file, as a stream of their own."""

    def __init__(self, path: str, start: int, end: int | None):
        self._file = open(path, "rb")  # noqa: SIM115 (closed with this stream)
        self._file.seek(start)
        self._left = (end if end is not None else os.path.getsize(path)) - start

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer)[: max(self._left, 0)]
        count = self._file.readinto(view)
        self._left -= count
        return count

    def close(self) -> None:
        self._file.close()
        super().close()


def open_piece(piece: Piece, text: bool) -> io.IOBase:
    if piece.source.lower().endswith(".gz"):
        return gzip.open(piece.source, "rt" if text else "rb", encoding="utf-8" if text else None)
    binary = io.BufferedReader(_Range(piece.source, piece.start, piece.end), 1 << 20)
    return io.TextIOWrapper(binary, encoding="utf-8") if text else binary
