"""Helpers every stage shares: the one error type users see, atomic outputs, and the stage CLI wrapper."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tasks.redaction import redact_output

DEBUG_ENV = "GPT2_PIPELINE_DEBUG"
# Special tokens of the tokenizers the pipeline trains: end of text after every record, a separator between
# dialogue turns (as GPT2-chitchat does), unknown for characters below the char tokenizer's min_frequency.
EOS, SEP, UNK = "<|endoftext|>", "[SEP]", "[UNK]"


# The exit status contract, shared by the stages, the CLI and the flow's retry condition: a fault nobody
# anticipated (retrying may help), bad params or data (the same input fails the same way), a promotion that kept
# the champion (nothing failed, nothing to retry: a scheduler or CI tells it from both), a node of a multi-node
# training whose part is done while another node holds the outputs (DVC must not record this node's old ones),
# and a stop by a signal, 128 + its number as shells report it.
FAULT_EXIT = 1
BAD_INPUT_EXIT = 2
NOT_PROMOTED_EXIT = 3
OUTPUTS_ELSEWHERE_EXIT = 4


def interrupted_exit(signum: int) -> int:
    return 128 + signum


class PipelineError(Exception):
    """A problem the user can fix; its message is the one line they see."""

    exit_status = BAD_INPUT_EXIT


class Stopped(BaseException):
    """SIGTERM (a scheduler, Kubernetes, `kill`) or Ctrl-C: the stage stops, keeping every finished output.

    A BaseException, as KeyboardInterrupt is, so that libraries' `except Exception` blocks cannot swallow it.
    """

    def __init__(self, message: str = "", signum: int = signal.SIGTERM):
        super().__init__(message)
        self.signum = signum


# The stop signals run_cli's handler received. A library can swallow the Stopped it raises (one raised while a
# finalizer runs is only printed), so a commit of outputs and run_cli's end look here as well.
_stops_received: list[int] = []
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _raise_stopped(signum: int, frame: Any) -> None:
    _stops_received.append(signum)
    raise Stopped(signum=signum)


def raise_if_stopped() -> None:
    """Raise the stop that arrived earlier and was swallowed before it reached run_cli."""
    if _stops_received:
        raise Stopped(signum=_stops_received[0])


@contextmanager
def stops_deferred() -> Iterator[None]:
    """SIGTERM and Ctrl-C that arrive during the block are handled right after it, by the handler they would
    have met: a commit (the renames that swap outputs in) is never cut in half. Off the main thread, where
    handlers cannot be set (nor run), the block just runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {signum: signal.signal(signum, lambda got, frame: arrived.append(got)) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        if arrived:
            signal.raise_signal(arrived[0])


# How long a stage has, after SIGTERM or Ctrl-C, to unwind (train saves a checkpoint, runs are closed) before it is
# killed: a stage whose main thread cannot run Python then (stuck in a C call, deadlocked after a failed
# allocation) would otherwise ignore the signal and hold DVC's lock until someone sends SIGKILL.
STOP_GRACE_SECONDS = 60

# The watchdog, a separate tiny interpreter: Python's C-level signal handler writes the signal's number to the
# stage's wakeup fd, the watchdog's stdin, with no need for the stage's main thread; after SIGTERM or SIGINT it
# kills the stage if the stage is still there `grace` seconds later. It ends when the stage ends (EOF).
_WATCHDOG = """
import os, select, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C and a group's SIGTERM reach it too: it outlives the stage
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only until EOF or the grace period ends
stage, grace = int(sys.argv[1]), float(sys.argv[2])
while not (received := {signal.SIGTERM, signal.SIGINT} & set(data := os.read(0, 64))):
    if not data:
        sys.exit(0)
deadline = time.monotonic() + grace
while (left := deadline - time.monotonic()) > 0:
    if select.select([0], [], [], left)[0] and not os.read(0, 64):
        sys.exit(0)
name = signal.Signals(min(received)).name
print(f"error: the stage did not stop within {grace:g} s of {name}; killed it (SIGKILL), its previous outputs are"
      " kept", file=sys.stderr, flush=True)
os.kill(stage, signal.SIGKILL)
"""


def _start_stop_watchdog() -> Callable[[], None]:
    """A stage stopped by a signal ends within STOP_GRACE_SECONDS, whatever its main thread is doing. Returns
    what disarms it (a stage run in-process, by a test, returns to its caller)."""
    import subprocess  # nosec B404: this interpreter, a fixed program, no shell

    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    subprocess.Popen(  # nosec B603
        [sys.executable, "-S", "-c", _WATCHDOG, str(os.getpid()), str(STOP_GRACE_SECONDS)],
        stdin=read_end,
        stdout=subprocess.DEVNULL,
    )
    os.close(read_end)
    previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)

    def disarm() -> None:  # the watchdog reads EOF and ends
        signal.set_wakeup_fd(previous)
        os.close(write_end)

    return disarm


def project_root(start: Path | None = None) -> Path:
    """The project a stage works for: the outermost folder, from start (the working directory) up, that holds a
    dvc.yaml. A run workspace (.runs/<hash>) and DVC's temporary experiment copies sit inside their project and
    may read its files."""
    here = (start or Path.cwd()).resolve()
    return ([folder for folder in (here, *here.parents) if (folder / "dvc.yaml").is_file()] or [here])[-1]


def inside_project(path: Path | str, key: str, allow_key: str | None = None, given: str | None = None) -> Path:
    """path resolved (symlinks followed); a path outside the project is one PipelineError naming key and the value
    given there (default: path), and, where params may allow it, the switch that does (allow_key)."""
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
    try:
        yield tmps
        raise_if_stopped()
        with stops_deferred():
            for dest, tmp in zip(dests, tmps, strict=True):
                _swap_in(tmp, dest)
    except Exception as exc:
        if _disk_full(exc):
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
    """Replace dest with tmp: a file in one rename, a folder by moving the old one aside first. A folder is only
    ever replaced by a folder (the pipeline's own outputs): a file never takes a folder's place."""
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


DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def _disk_full(exc: BaseException) -> bool:
    """Out of space or over a file-size limit; safetensors reports it as its own error with the OS code."""
    if isinstance(exc, OSError):
        return exc.errno in DISK_FULL
    return any(f"(os error {code})" in str(exc) for code in DISK_FULL)


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


def quiet_progress_bars() -> None:
    """No progress bars from transformers and the Hugging Face libraries: in a terminal a bar redraws one line,
    but in a log (a Prefect flow's, CI's, a file) every redraw adds one, e.g. "Writing model shards: 0%|"."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read by the libraries imported from here on
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # read at each download
    if "transformers" in sys.modules:  # imported already (the train stage's module does): it read the variable
        from transformers.utils import logging

        logging.disable_progress_bar()


def tools_first(bin_dir: Path, path: str | None = None) -> str:
    """PATH with bin_dir first (default: after it, this process's PATH): the programs a child starts by name
    (dvc's `python`, mlflow's `uvicorn`, torchrun) are then the project interpreter's."""
    return f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '') if path is None else path}"


def one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, line=None) -> str:
    """A Python warning as one line, naming where it was raised: the default adds the source line below it, two
    lines a log reader takes for an error's traceback."""
    return f"warning: {category.__name__}: {' '.join(str(message).split())} ({Path(filename).name}:{lineno})\n"


def console_output() -> None:
    """What a stage and the CLI print alike: redacted, warnings on one line, and no progress bars in a log."""
    redact_output()
    warnings.formatwarning = one_line_warning
    if not sys.stderr.isatty():
        quiet_progress_bars()


def run_cli(main: Callable[[], Any]) -> None:
    """Run a stage's main(): any error becomes one line on stderr (see report) and the exit status it names.

    SIGTERM and Ctrl-C unwind the stage (temporary outputs are removed, finished ones kept) and exit 128 + signal;
    a stage that cannot unwind within STOP_GRACE_SECONDS is killed.
    """
    _stops_received.clear()
    signal.signal(signal.SIGTERM, _raise_stopped)
    disarm = _start_stop_watchdog()
    console_output()
    stopped = False
    try:
        main()
        raise_if_stopped()
    except (Exception, Stopped, KeyboardInterrupt) as exc:
        status = report(exc)
        stopped = status > interrupted_exit(0)
        sys.exit(status)
    finally:
        if not stopped:  # a stopped stage's watchdog keeps counting until the process is gone
            disarm()


def report(exc: BaseException) -> int:
    """Print the one line a user sees for exc and return the exit status; the stages and the CLI both use it.

    The traceback is shown only with GPT2_PIPELINE_DEBUG=1 (or --verbose), so the line stays the first thing read.
    """
    stop = _stop_within(exc)  # a library (datasets) may wrap the stop in an error of its own
    if stop is not None or isinstance(exc, KeyboardInterrupt):
        signum = stop.signum if stop is not None else signal.SIGINT
        detail = (
            str(stop or "")
            or f"stopped by {signal.Signals(signum).name} before it finished; its previous outputs are kept"
        )
        print(f"error: {detail}; rerun `dvc repro` to continue", file=sys.stderr)
        return interrupted_exit(signum)
    if os.environ.get(DEBUG_ENV) == "1":
        traceback.print_exception(exc)
    if isinstance(exc, PipelineError):
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_status
    if _disk_full(exc):  # outside atomic_output, e.g. a training checkpoint (skipped on resume when partial)
        print(
            f"error: the disk filled up while writing ({exc}); free space on {Path.cwd()} and rerun; "
            "finished outputs are kept",
            file=sys.stderr,
        )
    else:
        print(f"error: {unexpected(exc)}", file=sys.stderr)
    return FAULT_EXIT


def _stop_within(exc: BaseException | None) -> Stopped | None:
    """The Stopped that caused exc, however deep in its chain of causes."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, Stopped):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def first_line(exc: BaseException, limit: int = 300, empty: str = "no message") -> str:
    """The first line of an exception's message (a library's may span pages, or be empty), at most limit long."""
    return (str(exc).strip().splitlines() or [empty])[0][:limit]


def unexpected(exc: BaseException) -> str:
    """One line for an exception the pipeline did not anticipate, and how to see more."""
    return f"{type(exc).__name__}: {first_line(exc)} (set {DEBUG_ENV}=1 or pass --verbose for the traceback)"
