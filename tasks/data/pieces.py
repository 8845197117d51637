"""Sources cut into pieces of about data.shard_mb, so that no file, however large or compressed, is held whole.

Every kind of source is read as a stream and cut at record boundaries into pieces of about shard_bytes of text
(uncompressed), and small pieces are packed together into units of that size; each unit becomes one shard per
split. The units depend only on the sources and shard_bytes, never on how many workers read them. How a piece
reaches its worker depends on what can be read from the middle of a file:
- a plain .txt or .jsonl file: a byte range, cut at a line end (a blank line for .txt), which the worker reads;
- a Parquet file: a run of its row groups, sized by their uncompressed bytes, which the worker reads;
- a .gz file: the decompressed text itself, cut from the stream at a line end (a gzip stream is only read from
  its start);
- a .json file's list, a .csv file and an `hf:` dataset: the records themselves, parsed from the stream.
The plan is a generator: the parent holds the pieces in flight, never the rest of a source. A piece counts lines
from the file's start, so that errors keep file:line.
"""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

TEXT_SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz", ".json", ".csv", ".parquet")
BYTE_RANGES = (".txt", ".jsonl")  # read from any record boundary: cut into byte ranges
Located = tuple[str, Any]  # (where a record is: file:line, the raw record)


@dataclass(frozen=True)
class Piece:
    """A part of a source: a byte range [start, end) whose first line is `line` (plain .txt, .jsonl), row groups
    [start, end) (Parquet), decompressed text `data` (a .gz file) or parsed `records`; all of it by default."""

    source: str
    start: int = 0
    end: int | None = None
    line: int = 1
    data: bytes | None = None
    records: tuple[Located, ...] | None = None


def source_format(name: str) -> str | None:
    """The format a file name says (.jsonl for x.jsonl.gz), or None when it is not one ingest reads."""
    lower = name.lower()
    return next((suffix for suffix in TEXT_SUFFIXES if lower.endswith(suffix)), None)


def plan(
    sources: list[str], shard_bytes: int, read_records: Callable[[str], Iterable[Located]], record_cap: int
) -> Iterator[list[Piece]]:
    """Units of work of about shard_bytes each: consecutive pieces of the sources, in order, made as they are asked
    for.

    read_records: a source's records as a stream (for .json, .csv and hf: sources); record_cap: the longest record
    (data.max_record_bytes), so that a .gz piece ends within shard_bytes plus one record."""
    current: list[Piece] = []
    size = 0
    for source in sources:
        for piece, length in _pieces(source, shard_bytes, read_records, record_cap):
            if current and size + length > shard_bytes:
                yield current
                current, size = [], 0
            current.append(piece)
            size += length
    if current:
        yield current


def _pieces(
    source: str, target: int, read_records: Callable[[str], Iterable[Located]], cap: int
) -> Iterator[tuple[Piece, int]]:
    kind = "hf:" if source.startswith("hf:") else source_format(source)
    if kind in BYTE_RANGES:
        yield from _byte_ranges(source, target, paragraphs=kind == ".txt")
    elif kind == ".parquet":
        yield from _row_groups(source, target)
    elif kind in (".txt.gz", ".jsonl.gz"):
        yield from _decompressed(source, target, paragraphs=kind == ".txt.gz", cap=cap)
    else:
        yield from _record_batches(source, target, read_records(source))


def _byte_ranges(source: str, target: int, paragraphs: bool) -> Iterator[tuple[Piece, int]]:
    size, start, line = os.path.getsize(source), 0, 1
    with open(source, "rb") as handle:
        while start < size:
            cut, lines = _boundary(handle, start, start + target, paragraphs)
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


def _decompressed(source: str, target: int, paragraphs: bool, cap: int) -> Iterator[tuple[Piece, int]]:
    """A .gz file's text in pieces of about target bytes, decompressed as a stream and cut after a line end (for
    .txt.gz a blank line, unless a paragraph runs on for cap bytes: its records are cut at MAX_RECORD_CHARS
    anyway). A piece holds at most target plus cap bytes: a line longer than cap is data.max_record_bytes's
    error, which the worker reports with its line."""
    line, carried = 1, b""
    with gzip.open(source, "rb") as handle:
        while block := carried + handle.read(target):
            parts, extra = [block], 0
            if not block.endswith(b"\n"):
                parts.append(handle.readline(cap + 1))
            while paragraphs and parts[-1].endswith(b"\n") and (more := handle.readline(cap + 1)):
                parts.append(more)
                extra += len(more)
                if not more.strip() or extra > cap:
                    break
            data = b"".join(parts)
            data, carried = _whole_characters(data)
            yield Piece(source, line=line, data=data), len(data)
            line += data.count(b"\n")


def _whole_characters(data: bytes) -> tuple[bytes, bytes]:
    """data cut before a UTF-8 character it ends inside (a line longer than cap stops anywhere), and the cut
    bytes, which begin the next piece."""
    if data.endswith(b"\n"):
        return data, b""
    start = len(data) - 1
    while start > len(data) - 4 and start > 0 and data[start] & 0xC0 == 0x80:  # continuation bytes
        start -= 1
    lead = data[start] if data else 0
    needs = 2 if lead & 0xE0 == 0xC0 else 3 if lead & 0xF0 == 0xE0 else 4 if lead & 0xF8 == 0xF0 else 1
    return (data[:start], data[start:]) if len(data) - start < needs else (data, b"")


def _row_groups(source: str, target: int) -> Iterator[tuple[Piece, int]]:
    """Runs of consecutive row groups of about target bytes uncompressed, from the file's footer alone."""
    import pyarrow.parquet as pq

    metadata = pq.ParquetFile(source).metadata
    start, size = 0, 0
    for group in range(metadata.num_row_groups):
        size += metadata.row_group(group).total_byte_size
        if size >= target or group == metadata.num_row_groups - 1:
            yield Piece(source, start, group + 1), size
            start, size = group + 1, 0
    if metadata.num_row_groups == 0:
        yield Piece(source, 0, 0), 0


def _record_batches(source: str, target: int, records: Iterable[Located]) -> Iterator[tuple[Piece, int]]:
    """Parsed records in batches of about target bytes of text."""
    batch: list[Located] = []
    size, pieces = 0, 0
    for located in records:
        batch.append(located)
        size += _text_bytes(located[1])
        if size >= target:
            yield Piece(source, records=tuple(batch)), size
            batch, size, pieces = [], 0, pieces + 1
    if batch or not pieces:  # a source without records still has its piece: ingest names it as empty
        yield Piece(source, records=tuple(batch)), size


def _text_bytes(value: Any) -> int:
    """About how many bytes of text a parsed record holds (its strings' UTF-8, other values as printed)."""
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, dict):
        return sum(map(_text_bytes, value.values()))
    if isinstance(value, list | tuple):
        return sum(map(_text_bytes, value))
    return len(str(value))


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
    """A .txt or .jsonl piece (plain, or a .gz file's decompressed text) as a stream."""
    if piece.data is not None:
        binary: io.IOBase = io.BytesIO(piece.data)
    elif piece.source.lower().endswith(".gz"):
        binary = gzip.open(piece.source, "rb")
    else:
        binary = io.BufferedReader(_Range(piece.source, piece.start, piece.end), 1 << 20)
    return io.TextIOWrapper(binary, encoding="utf-8") if text else binary
