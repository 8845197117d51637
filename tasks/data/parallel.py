"""Work spread over processes with results in order.

What lets ingest and tokenize use every core and still write the same bytes for any number of workers
(data.workers)."""

from __future__ import annotations

import collections
import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor


def cores() -> int:
    """The cores this process may run on (a container's CPU set, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def workers(setting: int, units: int | None = None, local: bool = True) -> int:
    """Processes to run: the setting, or every core for 0; never more than there are units of work, nor, on this
    machine, than it has cores (a line says so: data.workers 1024 would fork 1024 processes)."""
    available = cores()
    chosen = setting or available
    if local and chosen > available:
        print(f"data.workers: {setting} is more than the {available} cores here; using {available}")
        chosen = available
    return max(1, min(chosen, units) if units is not None else chosen)


def cluster(executor: str, ray_address: str | None) -> str | None:
    """The Ray cluster data.executor names (data.ray_address or RAY_ADDRESS), or None to run on this machine."""
    if executor == "local":
        return None
    from tasks.data.cluster import address

    return address(ray_address)


def ordered_map(
    function: Callable, items: Iterable, processes: int, ahead: int = 2, on_cluster: str | None = None
) -> Iterator:
    """function over items, results in the items' order: here, in `processes` forked processes, or on a cluster.

    At most processes times ahead items are in flight, so memory stays flat however many items there are. Forked,
    not spawned: function may be a closure over what the parent built (a tokenizer), which a fork inherits as
    it is and a spawn would have to pickle. on_cluster (a Ray address) runs it as a Ray Data job instead
    (tasks/data/cluster.py).
    """
    if on_cluster:
        from tasks.data.cluster import ray_map

        yield from ray_map(function, items, on_cluster)
        return
    if processes == 1:
        yield from map(function, items)
        return
    global _FUNCTION
    _FUNCTION = function
    pending: collections.deque = collections.deque()
    before = set(multiprocessing.active_children())
    fork = multiprocessing.get_context("fork")
    pool = ProcessPoolExecutor(processes, mp_context=fork, initializer=_worker_start, initargs=(os.getpid(),))
    try:
        for item in items:
            pending.append(pool.submit(_call, item))
            if len(pending) >= processes * ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BaseException:  # an error, a stop (SIGTERM, Ctrl-C) or the caller's close(): the work is not wanted
        pool.shutdown(wait=False, cancel_futures=True)
        for worker in set(multiprocessing.active_children()) - before:
            worker.kill()  # not waited for: a stop must not sit behind the batches in flight
            worker.join()
        raise
    pool.shutdown()


def _worker_start(parent: int) -> None:
    """A worker ignores stop signals (its parent stops it as it unwinds) and dies with its parent.

    A worker left behind by a parent killed outright (SIGKILL, the stage's watchdog) would wait for work for ever
    and hold the stage's stdout, so the `dvc repro` reading it would never see its end."""
    signal.set_wakeup_fd(-1)  # the stage's watchdog counts from the parent's signals alone
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the request
            os._exit(1)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>: the signal this process gets when the thread that forked it ends
_FUNCTION: Callable | None = None  # set in the parent before the fork; each worker calls its copy


def _call(item):
    return _FUNCTION(item)
