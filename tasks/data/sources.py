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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks.plumbing.errors import PipelineError, first_line
from tasks.plumbing.outputs import inside_project, project_root
from tasks.plumbing.params import DataParams
from tasks.data.pieces import TEXT_SUFFIXES, Piece, open_piece, source_format

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


Located = tuple[str, Any]  # (where the record is: file:line, the raw record)


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


def _read_json(path: Path, limits: DataParams) -> Iterator[Located]:
    """A list of records (or one record), read whole: up to data.max_json_bytes."""
    size, cap = path.stat().st_size, limits.max_json_bytes
    if size > cap:
        raise PipelineError(
            f"{path}: {size:,} bytes is over data.max_json_bytes ({cap:,}), and a .json file is read whole; "
            "write it as JSONL (one record a line, streamed) or raise the limit"
        )
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise PipelineError(f"{path}:{_line_deeper_than(text, JSON_DEPTH)}: {TOO_DEEP}") from None
    for index, record in enumerate(data if isinstance(data, list) else [data]):
        yield f"{path}: record {index}", record


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


def _read_parquet(path: Path, columns: list[str]) -> Iterator[Located]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    _require_columns(path, columns, parquet.schema_arrow.names)
    for batch in parquet.iter_batches(columns=columns, batch_size=1024):
        for record in batch.to_pylist():
            yield str(path), record


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
    if piece.source.startswith("hf:"):
        return _read_hub(piece.source, limits.hub_records)
    path = Path(piece.source)
    readers = {
        ".txt": lambda: _read_txt(piece),
        ".jsonl": lambda: _read_jsonl(piece, limits),
        ".json": lambda: _read_json(path, limits),
        ".csv": lambda: _read_csv(path, fields),
        ".parquet": lambda: _read_parquet(path, fields),
    }
    return readers[source_format(piece.source).removesuffix(".gz")]()


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
