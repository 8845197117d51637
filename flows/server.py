"""The Prefect server a flow talks to: the user's (PREFECT_API_URL), or a temporary one this process starts.

Without PREFECT_API_URL every command starts Prefect's temporary server on the SQLite database in PREFECT_HOME.
Two commands starting at once on a new PREFECT_HOME both create that database's tables: one fails ("duplicate
column name") or prints "database is locked" tracebacks, although its flow would have succeeded. Here the start
waits for any other one under a file lock in PREFECT_HOME, so the first creates the tables and the others find
them made. Promotions of one model take a slot of a Prefect global concurrency limit of 1 on the user's server,
so two hosts promoting at once against shared servers take turns (tasks.promote's file lock covers one host).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tasks.plumbing.errors import DEBUG_ENV, PipelineError

START_LOCK = "gpt2-pipeline-server.lock"
# A first start makes the database's tables: about 13 s on an idle 2-core machine, past Prefect's default budget of
# 20 s (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS) when training or tests keep the machine busy.
STARTUP_SECONDS = 120


def shared() -> bool:
    """Whether the flows report to a server of the user's (PREFECT_API_URL), not a temporary one of this process."""
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def start_local() -> None:
    """Start the temporary server now (Prefect would at the first flow call), one start at a time per PREFECT_HOME.

    Nothing to do with PREFECT_API_URL set."""
    from prefect.settings import (
        PREFECT_HOME,
        PREFECT_SERVER_EPHEMERAL_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    )

    if shared() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    home = Path(PREFECT_HOME.value()).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    with (home / START_LOCK).open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, also if the start fails
        budget = max(STARTUP_SECONDS, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())  # a longer one stands
        SubprocessASGIServer().start(timeout=budget)  # returns once the server answers, its tables made


def promotion_limit(model_name: str) -> str:
    """The global concurrency limit promotions of model_name share (Prefect names exclude / % & < >)."""
    return "promote-" + re.sub(r"[/%&<>]", "-", model_name)


@contextmanager
def promotion_slot(model_name: str) -> Iterator[None]:
    """Hold the model's promotion slot on the user's Prefect server.

    Hold the model's promotion slot on the user's Prefect server (the limit is made on first use), waiting for
    another host's promotion to finish; on a temporary server, no one else can reach it: nothing to hold."""
    if not shared():
        yield
        return
    from prefect.concurrency.sync import concurrency

    name = promotion_limit(model_name)
    _ensure_limit(name)
    with concurrency(name, occupy=1, strict=True):
        yield


def _ensure_limit(name: str) -> None:
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another host made it first: the same limit
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))


class _NoTracebackForBadInput(logging.Filter):
    """Prefect logs a failed flow or task run's exception with its traceback. For a PipelineError (bad input, a
    failed stage) the command ends with that error's one line, so the traceback is left out (kept with --verbose);
    any other exception keeps it. On the logger, not the console's handler: Prefect may set its handlers up again,
    which drops a handler's filters but not a logger's (so the run's log on the server has no traceback either)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, PipelineError) and os.environ.get(DEBUG_ENV) != "1":
            record.exc_info, record.exc_text = None, None
        return True


_ONE_LINE = _NoTracebackForBadInput()


def one_line_errors() -> None:
    """The flows' and tasks' run loggers in this process log bad input without a traceback. Called by the CLI and
    by each flow as it starts (a deployment's worker runs the flow in a process of its own); once is enough."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_ONE_LINE)  # a filter already there is not added twice
