"""The exit status contract and the one line a user sees for any error.

Shared by the stages, the CLI and the flow's retry condition."""

from __future__ import annotations

import errno
import os
import signal
import sys
import traceback
from pathlib import Path

from tasks.plumbing.redaction import redact

DEBUG_ENV = "GPT2_PIPELINE_DEBUG"


# The exit status contract, shared by the stages, the CLI and the flow's retry condition: a fault nobody
# anticipated (retrying may help), bad params or data (the same input fails the same way), a promotion that kept
# the champion (nothing failed, nothing to retry: a scheduler or CI tells it from both), a node of a multi-node
# training whose part is done while another node holds the outputs (DVC must not record this node's old ones),
# a sweep trial's training stopped early by the pruner (nothing failed, nothing to retry, no model),
# and a stop by a signal, 128 + its number as shells report it.
FAULT_EXIT = 1
BAD_INPUT_EXIT = 2
NOT_PROMOTED_EXIT = 3
OUTPUTS_ELSEWHERE_EXIT = 4
PRUNED_EXIT = 5


def interrupted_exit(signum: int) -> int:
    return 128 + signum


class PipelineError(Exception):
    """A problem the user can fix; its message is the one line they see, after its label."""

    exit_status = BAD_INPUT_EXIT
    label = "error: "


class TrialPruned(PipelineError):
    """The sweep's pruner stopped this trial's training: its validation loss trailed the other trials' at a step."""

    exit_status = PRUNED_EXIT
    label = ""  # the sweep at work, no fault


class Stopped(BaseException):
    """SIGTERM (a scheduler, Kubernetes, `kill`) or Ctrl-C: the stage stops, keeping every finished output.

    A BaseException, as KeyboardInterrupt is, so that libraries' `except Exception` blocks cannot swallow it.
    """

    def __init__(self, message: str = "", signum: int = signal.SIGTERM):
        super().__init__(message)
        self.signum = signum


DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def disk_full(exc: BaseException) -> bool:
    """Out of space or over a file-size limit; safetensors reports it as its own error with the OS code."""
    if isinstance(exc, OSError):
        return exc.errno in DISK_FULL
    return any(f"(os error {code})" in str(exc) for code in DISK_FULL)


def report_error(exc: BaseException) -> int:
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
        print(f"{exc.label}{exc}", file=sys.stderr)
        return exc.exit_status
    if disk_full(exc):  # outside atomic_output, e.g. a training checkpoint (skipped on resume when partial)
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
    """The first line of an exception's message (a library's may span pages, or be empty), at most limit long.

    Secrets are hidden before the cut: the part of a password that a cut leaves matches neither its value nor a
    URI's shape, so the output's own redaction would miss it."""
    return redact((str(exc).strip().splitlines() or [empty])[0])[:limit]


def cause(exc: BaseException, limit: int = 200) -> str:
    """An exception as the reason inside an error line: its type and the first line of its message."""
    line = first_line(exc, limit, empty="")
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def unexpected(exc: BaseException) -> str:
    """One line for an exception the pipeline did not anticipate, and how to see more."""
    return f"{type(exc).__name__}: {first_line(exc)} (set {DEBUG_ENV}=1 or pass --verbose for the traceback)"
