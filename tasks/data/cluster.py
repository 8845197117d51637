"""Work spread over a Ray cluster (data.executor: ray), results in order, as Ray Data runs it.

ingest and tokenize hand their units of work here instead of to forked processes; the results come back to the
stage, which writes the same shards it writes locally. Every node reads the sources (and the prepared shards) where
the driver does: the project folder at the same path on each node, as a shared volume gives it. Ray is an optional
extra (pip install 'gpt2-pipeline[ray]'); nothing imports it unless data.executor is ray.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from tasks.plumbing.errors import PipelineError

INSTALL = "pip install 'gpt2-pipeline[ray]' on the driver and every node, or set data.executor: local"


def address(setting: str | None) -> str:
    """The cluster to join: data.ray_address, else RAY_ADDRESS (Ray's own variable), else a clear refusal."""
    chosen = setting or os.environ.get("RAY_ADDRESS")
    if not chosen:
        raise PipelineError(
            "data.executor is ray but no cluster is named: set data.ray_address (host:port of the head, or auto) "
            "or RAY_ADDRESS, or set data.executor: local"
        )
    return chosen


def ray_map(function: Callable, items: Iterable, cluster: str) -> Iterator:
    """function over items on the Ray cluster at `cluster`, results in the items' order.

    A Ray Data pipeline over the items (small descriptions of the work); each result travels back as the object
    it is (Ray serializes both).
    A PipelineError raised on a node comes back as a result and is raised here with its own message, as the local
    path would raise it.
    """
    ray = _connect(cluster)
    try:
        # A window of items at a time, two for each of the cluster's cores: an item may carry a unit's text (a
        # .gz file's, tasks/data/pieces.py), so all of them at once would be the corpus in this process.
        window = 2 * max(int(ray.cluster_resources().get("CPU", 1)), 1)
        pending = iter(items)
        while rows := [{"item": item} for item in itertools.islice(pending, window)]:
            dataset = ray.data.from_items(rows).map(_on_node(function, Path.cwd()), num_cpus=1)
            for row in dataset.iter_rows():
                kind, value = row["result"]
                if kind == "error":
                    raise PipelineError(value)
                yield value
    finally:
        ray.shutdown()


def _connect(cluster: str):
    try:
        import ray
        import ray.data
    except ImportError:
        raise PipelineError(f"data.executor is ray but Ray is not installed: {INSTALL}") from None
    import tasks

    _check_reachable(cluster)
    # Ray's own logs (connection, each dataset's start and finish) would bury the stage's one line of output.
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        # py_modules: the nodes run this driver's copy of tasks/, the code dvc.lock hashed, whatever they have.
        ray.init(
            address=cluster,
            runtime_env={"py_modules": [tasks]},
            logging_level=logging.ERROR,
            log_to_driver=False,
        )
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise PipelineError(
            f"data.ray_address: cannot join the Ray cluster at {cluster!r} ({str(exc).splitlines()[0]}); "
            "start one (ray start --head) or correct the address"
        ) from None
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # the shards are written in the items' order
    context.enable_progress_bars = False
    return ray


def _check_reachable(cluster: str, timeout: float = 10.0) -> None:
    """Refuse a host:port nothing answers on: ray.init would wait for it without end."""
    host, _, port = cluster.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" and the like: Ray finds the cluster itself, or says it has none
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise PipelineError(
            f"data.ray_address: nothing answers at {cluster!r} ({exc.strerror or exc}); start the cluster "
            "(ray start --head) or correct the address"
        ) from None


def _on_node(function: Callable, root: Path) -> Callable[[dict], dict]:
    """A Ray Data row function running function(item) in the project folder, the error as a result."""

    def call(row: dict) -> dict:
        try:
            os.chdir(root)  # the sources are project-relative paths
            result = ("value", function(row["item"]))
        except PipelineError as exc:
            result = ("error", str(exc))
        except (FileNotFoundError, PermissionError) as exc:
            result = (
                "error",
                f"{exc.filename or root}: not readable on Ray node {socket.gethostname()} ({exc.strerror}); "
                f"every node must see the project at {root} (a shared volume)",
            )
        return {"result": result}

    return call
