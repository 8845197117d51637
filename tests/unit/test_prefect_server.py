"""The temporary Prefect server of a command without PREFECT_API_URL: one start at a time per PREFECT_HOME."""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
from pathlib import Path

import pytest

from flows.server import START_LOCK, promotion_limit
from tests.helpers import BIN, ROOT, tool_env

pytestmark = pytest.mark.servers


def blocked_on_lock(pid: int) -> bool:
    """Whether pid waits for a file lock (/proc/locks marks a waiter's line with `->`)."""
    waiting = [line.split() for line in Path("/proc/locks").read_text().splitlines() if " -> " in line]
    return any(fields[5] == str(pid) for fields in waiting)


def test_a_start_waits_for_another_start_on_the_same_prefect_home(tmp_path):
    """While another command starts the server (here: the test holds its lock), a second start waits and creates
    no database; once the lock is free it starts, making the tables itself, however short Prefect's own budget
    for a start (a first start takes more than its default 20 s on a busy machine: flows.server waits longer)."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    env = tool_env(PREFECT_HOME=str(home), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1")
    start = [str(BIN / "python"), "-c", "from flows.server import start_local; start_local(); print('started')"]
    with (home / START_LOCK).open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        child = subprocess.Popen(start, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 120
            while not blocked_on_lock(child.pid):
                assert child.poll() is None and time.monotonic() < deadline, child.communicate()[0]
                time.sleep(0.1)
            assert not (home / "prefect.db").exists()
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)
    output = child.communicate(timeout=300)[0]
    assert child.returncode == 0 and output.strip().splitlines()[-1] == "started", output
    assert "Traceback" not in output and (home / "prefect.db").exists()


def test_a_command_with_prefect_api_url_starts_no_server(tmp_path):
    env = tool_env(PREFECT_HOME=str(tmp_path), PREFECT_API_URL="http://127.0.0.1:9/api")
    code = "from flows.server import start_local; start_local(); print('nothing started')"
    result = subprocess.run([str(BIN / "python"), "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.stdout == "nothing started\n" and os.listdir(tmp_path) == []


def test_promotion_limits_are_named_for_the_model():
    assert promotion_limit("gpt2-lm") == "promote-gpt2-lm"
    assert promotion_limit("team/gpt2 <zh>") == "promote-team-gpt2 -zh-"
