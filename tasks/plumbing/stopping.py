"""Stopping a stage cleanly.

SIGTERM and Ctrl-C unwind it (finished outputs kept), a commit of outputs is never cut in half, and a watchdog
kills a stage that cannot unwind."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from tasks.plumbing.errors import Stopped

# The stop signals run_cli's handler received. A library can swallow the Stopped it raises (one raised while a
# finalizer runs is only printed), so a commit of outputs and run_cli's end look here as well.
_stops_received: list[int] = []
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def raise_stopped(signum: int, frame: Any) -> None:
    _stops_received.append(signum)
    raise Stopped(signum=signum)


def clear() -> None:
    """Forget earlier stops (a stage run in-process after another, by a test)."""
    _stops_received.clear()


def raise_if_stopped() -> None:
    """Raise the stop that arrived earlier and was swallowed before it reached run_cli."""
    if _stops_received:
        raise Stopped(signum=_stops_received[0])


@contextmanager
def stops_deferred() -> Iterator[None]:
    """SIGTERM and Ctrl-C that arrive during the block are handled right after it, by the handler they would have met.

    A commit (the renames that swap outputs in) is never cut in half. Off the main thread, where handlers cannot be
    set (nor run), the block just runs."""
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


def start_watchdog() -> Callable[[], None]:
    """A stage stopped by a signal ends within STOP_GRACE_SECONDS, whatever its main thread is doing.

    Returns what disarms it (a stage run in-process, by a test, returns to its caller)."""
    # This interpreter running a fixed program, no shell.
    import subprocess  # nosec B404

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
