"""Where ingest's records come from: data.sources resolved, and each source or piece read as raw records.

Sources are files (globs expanded, confined to the project) or `hf:` datasets. Formats: .txt (paragraphs), .jsonl,
.txt.gz, .jsonl.gz, .json, .csv, .parquet; large plain files are read in pieces (tasks/data/pieces.py). Every record
comes with where it is (file:line), and is read within the params' size limits.
"""

from __future__ import annotations

import codecs
import csv
import glob
import itertools
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from tasks.plumbing.errors import PipelineError, first_line
from tasks.plumbing.outputs import inside_project, project_root
from tasks.plumbing.params import DataParams
from tasks.plumbing.paths import CORPORA_DIR
from tasks.data.pieces import TEXT_SUFFIXES, Located, Piece, open_piece, source_format

# A longer paragraph of a .txt file is cut into records of this many characters (an extra end-of-text token
# every 64 Ki characters costs nothing; holding a 1 GB line without breaks in memory would).
MAX_RECORD_CHARS = 1 << 16


def record_text(record: Any, fields: list[str], where: str) -> str:
    """The text of one record: its field(s), a field holding a list of lines joined with newlines."""
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise PipelineError(f"{where}: expected a JSON object with field(s) {fields} (data.text_field)")
    parts = []
    for field in fields:
        value = _field(record, field, where)
        parts.append("\n".join(map(str, value)) if isinstance(value, list) else str(value))
    return "\n".join(parts)


def record_turns(record: Any, fields: list[str], where: str) -> list[str]:
    """The turns of one dialogue record (data.format: dialog): the record itself, or its field, is a list."""
    turns = (
        record if isinstance(record, list) else _field(record, fields[0], where) if isinstance(record, dict) else None
    )
    if not isinstance(turns, list) or not all(isinstance(turn, str) for turn in turns):
        raise PipelineError(
            f"{where}: a dialogue record must be a list of turns (strings), or an object whose field "
            f"{fields[0]!r} (data.text_field) is one"
        )
    return turns


def _field(record: dict, field: str, where: str) -> Any:
    if field not in record:
        have = ", ".join(sorted(map(str, record))) or "none"
        raise PipelineError(f"{where}: record has no field {field!r} (data.text_field); its fields are: {have}")
    return record[field]


def _read_txt(piece: Piece) -> Iterator[Located]:
    """Paragraphs (blank-line separated) of a text file, streamed.

    A paragraph, or a single line, longer than MAX_RECORD_CHARS becomes several records, so a file with no line
    breaks never has to fit in memory."""
    paragraph: list[str] = []
    size, number, path = 0, piece.line, piece.source
    with open_piece(piece, text=True) as handle:
        while chunk := handle.readline(MAX_RECORD_CHARS):
            if chunk.strip():
                paragraph.append(chunk)
                size += len(chunk)
            elif paragraph:
                yield f"{path}:{number}", "".join(paragraph)
                paragraph, size = [], 0
            if size >= MAX_RECORD_CHARS:
                yield f"{path}:{number}", "".join(paragraph)
                paragraph, size = [], 0
            number += chunk.endswith("\n")
    if paragraph:
        yield f"{path}:{number}", "".join(paragraph)


def _read_jsonl(piece: Piece, limits: DataParams) -> Iterator[Located]:
    """One record a line; a line is read up to data.max_record_bytes, so one huge line never fills memory."""
    cap, path = limits.max_record_bytes, piece.source
    with open_piece(piece, text=False) as handle:
        for number, line in enumerate(iter(lambda: handle.readline(cap + 1), b""), piece.line):
            if len(line) > cap and not line.endswith(b"\n"):
                raise PipelineError(
                    f"{path}:{number}: a record over {cap:,} bytes (data.max_record_bytes); split it into several "
                    "records or raise the limit"
                )
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line.decode("utf-8"))
            except json.JSONDecodeError as exc:
                raise PipelineError(f"{path}:{number}: not valid JSON ({exc.msg}); fix or remove the line") from None
            except RecursionError:
                raise PipelineError(f"{path}:{number}: {TOO_DEEP}") from None


def _read_json(path: Path, cap: int) -> Iterator[Located]:
    """A .json file's list of records item by item, as a stream (or the one record it holds): an item, or a file
    that is not a list, up to cap bytes (data.max_record_bytes)."""
    with path.open(encoding="utf-8") as handle:
        stream = _JsonStream(handle, path, cap)
        if stream.next_char() != "[":
            yield f"{path}: record 0", stream.whole()
            return
        stream.take()
        index = 0
        while stream.next_char() != "]":
            if index and stream.take() != ",":
                raise stream.error("expected ',' or ']' after a record")
            if not stream.next_char():
                raise stream.error("the file ends inside its list")
            yield f"{path}: record {index}", stream.value()
            index += 1
        stream.take()
        if stream.next_char():
            raise stream.error("extra data after the list")


class _JsonStream:
    """JSON text read a block at a time: the values of a list decoded one by one by the json module, the text
    before the current value dropped, so that memory holds about one value, not the file."""

    BLOCK = 1 << 20

    def __init__(self, handle: TextIO, path: Path, cap: int) -> None:
        self.handle, self.path, self.cap = handle, path, cap
        self.text, self.position, self.line, self.ended = "", 0, 1, False

    def next_char(self) -> str:
        """The next character that is not whitespace ("" at the end), not consumed."""
        while True:
            self.position = _JSON_SPACE.match(self.text, self.position).end()
            if self.position < len(self.text) or not self._more():
                return self.text[self.position : self.position + 1]

    def take(self) -> str:
        char = self.next_char()
        if not char:
            raise self.error("the file ends inside its list")
        self.position += 1
        return char

    def value(self) -> Any:
        """The JSON value at the next character that is not whitespace, decoded whole."""
        self.next_char()
        while True:
            try:
                value, end = _JSON.raw_decode(self.text, self.position)
            except json.JSONDecodeError as exc:
                # At the text's end the value may go on in the next block; before it, the JSON is bad.
                cut_short = exc.pos >= len(self.text) - 8 or exc.msg.startswith("Unterminated")
                if cut_short and self._more():
                    continue
                raise self.error(exc.msg, exc.pos) from None
            except RecursionError:
                deeper = _line_deeper_than(self.text[self.position :], JSON_DEPTH)
                raise PipelineError(f"{self.path}:{self._line() + deeper - 1}: {TOO_DEEP}") from None
            if end < len(self.text) or not self._more():  # a number at the block's end may go on
                if end - self.position > self.cap:
                    raise self._too_large()
                self.position = end
                return value

    def whole(self) -> Any:
        """The one value of a file that is not a list, and nothing after it."""
        while self._more():
            pass
        value = self.value()
        if self.next_char():
            raise self.error("extra data after the record")
        return value

    def _more(self) -> bool:
        """Read another block (as large as what is buffered, so a long value is decoded a few times, not many);
        False at the end. A value longer than cap is refused before it is read further."""
        if len(self.text) - self.position > self.cap:
            raise self._too_large()
        if self.ended:
            return False
        if self.position > self.BLOCK:
            self.line = self._line()
            self.text, self.position = self.text[self.position :], 0
        block = self.handle.read(max(self.BLOCK, len(self.text) - self.position))
        self.ended = not block
        self.text += block
        return bool(block)

    def _too_large(self) -> PipelineError:
        return PipelineError(
            f"{self.path}:{self._line()}: a record over {self.cap:,} bytes (data.max_record_bytes); split it into "
            "several records or raise the limit"
        )

    def _line(self, position: int | None = None) -> int:
        return self.line + self.text.count("\n", 0, self.position if position is None else position)

    def error(self, message: str, position: int | None = None) -> PipelineError:
        return PipelineError(f"{self.path}:{self._line(position)}: not valid JSON ({message})")


_JSON = json.JSONDecoder()
_JSON_SPACE = re.compile(r"[ \t\n\r]*")


JSON_DEPTH = 500  # nesting the error names; Python's JSON reader gives up somewhat deeper (its recursion limit)
TOO_DEEP = f"JSON nested more than {JSON_DEPTH} levels deep, too deep to read; flatten the record"


def _line_deeper_than(text: str, depth: int) -> int:
    """The line of text where JSON nesting first goes deeper than depth (brackets in strings do not count)."""
    level, line, in_string, escaped = 0, 1, False, False
    for char in text:
        if in_string:
            in_string = escaped or char != '"'
            escaped = not escaped and char == "\\"
        elif char == '"':
            in_string = True
        elif char in "[{":
            level += 1
            if level > depth:
                return line
        elif char in "]}":
            level -= 1
        line += char == "\n"
    return line


def _read_csv(path: Path, columns: list[str]) -> Iterator[Located]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            _require_columns(path, columns, reader.fieldnames or [])
            for row in reader:
                yield f"{path}:{reader.line_num}", row
        except csv.Error as exc:  # a field over csv's limit (128 KiB), a NUL byte
            raise PipelineError(f"{path}:{reader.line_num + 1}: not readable as CSV ({exc}); fix the row") from None


def _read_parquet(piece: Piece, columns: list[str]) -> Iterator[Located]:
    """A Parquet file's records, a batch at a time: the piece's row groups, or all of them."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(piece.source)
    _require_columns(Path(piece.source), columns, parquet.schema_arrow.names)
    groups = range(piece.start, piece.end) if piece.end is not None else None
    for batch in parquet.iter_batches(columns=columns, batch_size=1024, row_groups=groups):
        for record in batch.to_pylist():
            yield piece.source, record


def _require_columns(path: Path, columns: list[str], have: list[str]) -> None:
    missing = [column for column in columns if column not in have]
    if missing:
        raise PipelineError(f"{path}: no column {missing[0]!r} (data.text_field); columns are: {', '.join(have)}")


def _read_hub(spec: str, limit: int | None) -> Iterator[Located]:
    """`hf:<dataset>[:<config>]`, the train split, streamed from the Hugging Face Hub.

    Its first `limit` records (data.hub_records), or all of them."""
    import datasets

    name, _, config = spec.removeprefix("hf:").partition(":")
    try:
        records = datasets.load_dataset(name, config or None, split="train", streaming=True)  # nosec B615
        yield from ((spec, record) for record in itertools.islice(records, limit))
    except Exception as exc:  # the hub client raises many types for "offline" and "no such dataset"
        raise PipelineError(
            f"data.sources: cannot load {spec} from the Hugging Face Hub ({type(exc).__name__}: "
            f"{first_line(exc, empty='no detail')}); where the hub is not reachable, "
            "save the dataset as .jsonl or .parquet and list that path instead"
        ) from None


OUTSIDE_SWITCH = "data.allow_outside_project"


def resolve_sources(sources: list[str], outside: bool = False) -> list[str]:
    """Expand globs into files (sorted, so the order is reproducible); hub specs pass through.

    Files must be inside the project after following symlinks, unless outside (data.allow_outside_project) says
    otherwise."""
    resolved: list[str] = []
    for index, source in enumerate(sources):
        key = f"data.sources[{index}]"
        if source.startswith("hf:"):
            local = hub_local_path(source)
            if local is not None and not outside:  # datasets reads a local folder as readily as a hub id
                inside_project(local, key, OUTSIDE_SWITCH, given=source)
            resolved.append(source)
            continue
        base = Path(source)
        while glob.has_magic(str(base)):
            base = base.parent
        if not outside:  # before a glob like /usr/share/**/*.txt walks anything
            inside_project(base, key, OUTSIDE_SWITCH, given=source)
        matches = sorted(glob.glob(source, recursive=True)) if glob.has_magic(source) else [source]
        files = [m for m in matches if Path(m).is_file()]
        if not files:
            what = "matches no files" if glob.has_magic(source) else "does not exist"
            raise PipelineError(f"{key}: {source!r} {what} (paths are relative to the project root)")
        for file in files:
            if source_format(file) is None:
                raise PipelineError(f"{key}: {file!r} has an unsupported type; use {', '.join(sorted(TEXT_SUFFIXES))}")
            if not outside:
                inside_project(file, key, OUTSIDE_SWITCH)
        resolved.extend(files)
    if outside:
        local = [hub_local_path(f) or f for f in resolved if not f.startswith("hf:") or hub_local_path(f)]
        beyond = [str(Path(f).resolve()) for f in local]
        beyond = [f for f in beyond if not Path(f).is_relative_to(project_root())]
        print(f"ingest: {OUTSIDE_SWITCH}: reading {len(beyond)} files outside the project: {beyond}")
    return resolved


def check_tracked(sources: list[str], data_deps: list[str]) -> None:
    """Every source is a file or folder that ingest's DVC deps hold (data_deps: dvc.yaml's), so that `dvc repro`
    reruns ingest when a corpus changes; a hub dataset, which DVC cannot see, gets a line saying how to reread it.

    Paths are compared as written, not resolved: a run workspace links the project's corpora into its own."""
    folders = [os.path.abspath(dep) for dep in data_deps]
    for source in sources:
        local = hub_local_path(source) if source.startswith("hf:") else Path(source)
        if local is None:
            print(f"ingest: {source} comes from the Hugging Face Hub, which dvc repro cannot watch; after it changes, "
                  "run: dvc repro --force --single-item ingest")  # fmt: skip
            continue
        path = os.path.abspath(local)
        if not any(path == folder or path.startswith(folder + os.sep) for folder in folders):
            raise PipelineError(
                f"data.sources: {source} is not in a folder that ingest's deps in dvc.yaml name "
                f"({', '.join(data_deps)}), so dvc repro would not see it change; move it under "
                f"{CORPORA_DIR}/, or add its folder to stages.ingest.deps in dvc.yaml"
            )


def hub_local_path(source: str) -> Path | None:
    """The local folder or file an `hf:` source names, or None for a hub id (`owner/name`).

    One that is absolute, starts with `.` or `~`, climbs with `..`, or exists here."""
    name = source.removeprefix("hf:").partition(":")[0]
    path = Path(name).expanduser()
    if name.startswith(("/", ".", "~")) or ".." in path.parts or path.exists():
        return path
    return None


def read_source(source: str, fields: list[str], limits: DataParams) -> Iterator[Located]:
    """The raw records of one resolved source, each with where it is, read within the params' size limits."""
    return read_piece(Piece(source), fields, limits)


def read_piece(piece: Piece, fields: list[str], limits: DataParams) -> Iterator[Located]:
    """The raw records of one piece of a source (all of it unless cut by plan)."""
    if piece.records is not None:
        return iter(piece.records)
    if piece.source.startswith("hf:"):
        return _read_hub(piece.source, limits.hub_records)
    path = Path(piece.source)
    readers = {
        ".txt": lambda: _read_txt(piece),
        ".jsonl": lambda: _read_jsonl(piece, limits),
        ".json": lambda: _read_json(path, limits.max_record_bytes),
        ".csv": lambda: _read_csv(path, fields),
        ".parquet": lambda: _read_parquet(piece, fields),
    }
    return readers[source_format(piece.source).removesuffix(".gz")]()


@contextmanager
def utf8_errors(source: str) -> Iterator[None]:
    """A source's bytes that are not UTF-8 as one error naming where (for a plain file, its line and byte)."""
    try:
        yield
    except UnicodeDecodeError:
        # A compressed file's bytes on disk say nothing of where in its text the bad bytes are.
        where = f"{source}: not valid UTF-8 once decompressed"
        if not source.lower().endswith(".gz"):
            line, offset = first_invalid_utf8(Path(source))
            where = f"{source}:{line}: not valid UTF-8 (byte {offset} of the file)"
        raise PipelineError(
            f"{where}; convert it to UTF-8 (e.g. iconv -f <encoding> -t UTF-8) or remove the file from data.sources"
        ) from None


def first_invalid_utf8(path: Path) -> tuple[int, int]:
    """(line, byte offset) of the first byte sequence in path that is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                bad = offset + max(exc.start - len(decoder.getstate()[0]), 0)
                return line + block[: bad - offset].count(b"\n"), bad
            offset += len(block)
            line += block.count(b"\n")
    return line, offset
