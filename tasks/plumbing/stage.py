"""The stage entry point: `python -m tasks.<stage>` runs its main() through run_cli."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import Any

from tasks.plumbing import stopping
from tasks.plumbing.console import console_output
from tasks.plumbing.errors import Stopped, interrupted_exit, report_error


def run_cli(main: Callable[[], Any]) -> None:
    """Run a stage's main(): any error becomes one line on stderr (see report_error) and the exit status it names.

    SIGTERM and Ctrl-C unwind the stage (temporary outputs are removed, finished ones kept) and exit 128 + signal;
    a stage that cannot unwind within STOP_GRACE_SECONDS is killed.
    """
    stopping.clear()
    signal.signal(signal.SIGTERM, stopping.raise_stopped)
    disarm = stopping.start_watchdog()
    console_output()
    stopped = False
    try:
        main()
        stopping.raise_if_stopped()
    except (Exception, Stopped, KeyboardInterrupt) as exc:
        status = report_error(exc)
        stopped = status > interrupted_exit(0)
        sys.exit(status)
    finally:
        if not stopped:  # a stopped stage's watchdog keeps counting until the process is gone
            disarm()
