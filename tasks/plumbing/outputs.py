"""Where a stage may read and how it writes.

Inside the project, and atomically (a killed stage leaves the previous output or nothing, never half of one)."""

from __future__ import annotations

import glob
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tasks.plumbing.errors import PipelineError, disk_full
from tasks.plumbing.stopping import raise_if_stopped, stops_deferred


def project_root(start: Path | None = None) -> Path:
    """The project a stage works for.

    The outermost folder, from start (the working directory) up, that holds a dvc.yaml. A run workspace
    (.runs/<hash>) and DVC's temporary experiment copies sit inside their project and may read its files."""
    here = (start or Path.cwd()).resolve()
    return ([folder for folder in (here, *here.parents) if (folder / "dvc.yaml").is_file()] or [here])[-1]


def inside_project(path: Path | str, key: str, allow_key: str | None = None, given: str | None = None) -> Path:
    """path resolved (symlinks followed).

    A path outside the project is one PipelineError naming key and the value given there (default: path), and, where
    params may allow it, the switch that does (allow_key)."""
    resolved, root = Path(path).resolve(), project_root()
    if not resolved.is_relative_to(root):
        allow = f", or set {allow_key}: true to read it where it is" if allow_key else ""
        raise PipelineError(
            f"{key}: {given or str(path)!r} resolves to {resolved}, outside the project ({root}); "
            f"copy it into the project{allow}"
        )
    return resolved


@contextmanager
def atomic_output(dest: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `dest` to write into; on success it replaces `dest` in one rename.

    A stage killed halfway leaves the previous output (or nothing), never half a file or folder.
    """
    with atomic_outputs(dest) as (tmp,):
        yield tmp


@contextmanager
def atomic_outputs(*dests: Path) -> Iterator[tuple[Path, ...]]:
    """atomic_output for outputs that belong together: all are swapped in at the end, or none is.

    A stop (SIGTERM, Ctrl-C) that arrives while they are swapped in waits until they all are; one that came
    earlier and was swallowed on its way up keeps them all out.
    """
    dests = tuple(Path(dest) for dest in dests)
    tmps = tuple(dest.with_name(f".{dest.name}.tmp-{os.getpid()}") for dest in dests)
    for dest, tmp in zip(dests, tmps, strict=True):
        dest.parent.mkdir(parents=True, exist_ok=True)
        _remove(tmp)
        _remove_abandoned(dest)
    try:
        yield tmps
        raise_if_stopped()
        with stops_deferred():
            for dest, tmp in zip(dests, tmps, strict=True):
                _swap_in(tmp, dest)
    except Exception as exc:
        if disk_full(exc):
            named, one = " and ".join(map(str, dests)), len(dests) == 1
            raise PipelineError(
                f"{named}: the disk filled up while writing {'it' if one else 'them'} ({exc}); free space on "
                f"{dests[0].parent.resolve()} and rerun; the previous {named} {'is' if one else 'are'} kept"
            ) from None
        raise
    finally:
        for tmp in tmps:
            _remove(tmp)


def _swap_in(tmp: Path, dest: Path) -> None:
    """Replace dest with tmp: a file in one rename, a folder by moving the old one aside first.

    A folder is only ever replaced by a folder (the pipeline's own outputs): a file never takes a folder's place."""
    if dest.is_dir() and not tmp.is_dir():
        raise PipelineError(f"{dest}: is a folder; name a file to write, the folder and its contents are kept")
    if tmp.is_dir() and dest.is_dir():
        # Directories cannot be swapped in one rename: move the old one aside first, then drop it.
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        _remove(old)
        dest.rename(old)
        tmp.rename(dest)
        _remove(old)
    else:
        tmp.replace(dest)


def _remove_abandoned(dest: Path) -> None:
    """What a writer of dest killed outright (SIGKILL, the stage's watchdog, a lost machine) left beside it: its
    `.<name>.tmp-<pid>` (as large as the output) and `.<name>.old-<pid>`, once no process <pid> runs."""
    for kind in ("tmp", "old"):
        for left in dest.parent.glob(f".{glob.escape(dest.name)}.{kind}-*"):
            pid = left.name.rpartition("-")[2]
            if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
                _remove(left)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def hash_file(digest: Any, path: Path, chunk: int = 1 << 20) -> None:
    """Feed a file to a hashlib digest a chunk at a time: constant memory for files of any size."""
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)


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
