"""ordered_map's worker processes end with the work: at once when the caller stops early, and with their parent
when it is killed outright (a stage's watchdog, an OOM kill), so nothing holds a stage's output pipe open."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

from tasks.data.parallel import ordered_map

ROOT = Path(__file__).resolve().parents[2]


def _slow(item: tuple[int, str]) -> int:
    """Item 0 at once; the others leave a mark after 30 s (a worker still running them then)."""
    index, marks = item
    if index:
        time.sleep(30)
        (Path(marks) / str(index)).touch()
    return index


def test_a_map_closed_early_stops_its_workers_without_finishing_their_items(tmp_path):
    results = ordered_map(_slow, [(index, str(tmp_path)) for index in range(6)], processes=2)
    assert next(results) == 0
    results.close()  # what a stop (SIGTERM in the stage) does through contextlib.closing
    # Waiting for the items in flight (the pool's own shutdown) would have left their marks by now.
    assert list(tmp_path.iterdir()) == []


PARENT = """
import json, multiprocessing, os, sys, time
from tasks.data.parallel import ordered_map

results = ordered_map(lambda index: index and time.sleep(600), range(6), processes=2)
next(results)
print(json.dumps([child.pid for child in multiprocessing.active_children()]), flush=True)
time.sleep(600)
"""


def test_workers_die_with_a_parent_killed_outright():
    parent = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(PARENT)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        workers = [psutil.Process(pid) for pid in json.loads(parent.stdout.readline())]
        assert len(workers) == 2
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    _, alive = psutil.wait_procs(workers, timeout=60)
    alive = [worker for worker in alive if _running(worker)]
    for worker in alive:  # not left behind by a failing test
        worker.kill()
    assert alive == [], "a worker outlived its parent"


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_workers_are_capped_by_the_cores_here_with_a_line_but_not_on_a_cluster(capsys):
    from tasks.data.parallel import cores, workers

    assert workers(1024) == cores()
    assert capsys.readouterr().out == f"data.workers: 1024 is more than the {cores()} cores here; using {cores()}\n"
    assert workers(1024, units=1) == 1
    assert workers(1024, local=False) == 1024  # a Ray cluster's cores are not this machine's
    assert workers(1) == 1 and capsys.readouterr().out.count("data.workers") == 1
