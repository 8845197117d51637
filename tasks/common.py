"""Helpers every stage shares: the one error type users see, atomic outputs, and the stage CLI wrapper."""

from __future__ import annotations

import json
import os
import shutil
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DEBUG_ENV = "GPT2_PIPELINE_DEBUG"
# Special tokens of the tokenizers the pipeline trains: end of text after every record, a separator between
# dialogue turns (as GPT2-chitchat does), unknown for characters below the char tokenizer's min_frequency.
EOS, SEP, UNK = "<|endoftext|>", "[SEP]", "[UNK]"


class PipelineError(Exception):
    """A problem the user can fix; its message is the one line they see."""


@contextmanager
def atomic_output(dest: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `dest` to write into; on success it replaces `dest` in one rename.

    A stage killed halfway leaves the previous output (or nothing), never half a file or folder.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_dir() and dest.is_dir():
            # Directories cannot be swapped in one rename: move the old one aside first, then drop it.
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            _remove(old)
            dest.rename(old)
            tmp.rename(dest)
            _remove(old)
        else:
            if dest.is_dir():
                shutil.rmtree(dest)
            tmp.replace(dest)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_json(path: Path, data: Any) -> None:
    """Write pretty JSON atomically."""
    with atomic_output(Path(path)) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_json(path: Path, what: str) -> Any:
    """Read a JSON output of an earlier stage, saying which stage to run when it is missing."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found; run the {what} stage first (dvc repro)") from None


def run_cli(main: Callable[[], Any]) -> None:
    """Run a stage's main(): a PipelineError becomes one line on stderr and exit status 2.

    The traceback is shown only with GPT2_PIPELINE_DEBUG=1, so the line users see stays the first thing they read.
    """
    try:
        main()
    except PipelineError as exc:
        if os.environ.get(DEBUG_ENV) == "1":
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
