"""Launching the train stage past one process.

Torchrun on this machine or across nodes, and the role each process plays."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from enum import StrEnum

from tasks.plumbing.errors import OUTPUTS_ELSEWHERE_EXIT, PipelineError
from tasks.plumbing.params import Params, TrainParams
from tasks.plumbing.paths import (
    MODEL_DIR,
    RUN_RECORD,
    TOKENIZED_DIR,
)
from tasks.tracking import mlflow_runs
from tasks.training import checkpoints, pruning


class Role(StrEnum):
    """What this process of the train stage does, from train.nodes, train.num_processes and torchrun's variables."""

    SINGLE = "single"  # one process: holds the run, trains, writes the outputs
    LAUNCHER = "launcher"  # holds the run and starts train.num_processes torchrun workers on this machine
    NODE_LAUNCHER = "node launcher"  # starts this node's share of a multi-node job; holds nothing
    WORKER = "worker"  # a torchrun worker whose launcher holds the run (rank 0 writes the outputs)
    GLOBAL_RANK_0 = "global rank 0"  # the multi-node worker c10d made rank 0: creates the run, writes the outputs


def role(train: TrainParams, environ: Mapping[str, str]) -> Role:
    """This process's role: torchrun sets LOCAL_RANK and RANK in its workers, a launcher RUN_ID_ENV in its own."""
    if "LOCAL_RANK" not in environ:
        if train.nodes > 1:
            return Role.NODE_LAUNCHER
        return Role.LAUNCHER if train.num_processes > 1 else Role.SINGLE
    if environ.get(mlflow_runs.RUN_ID_ENV) or environ.get("RANK", "0") != "0":
        return Role.WORKER
    return Role.GLOBAL_RANK_0


def launch_processes(params: Params, run_id: str | None) -> int:
    """Rerun this stage under torchrun.

    train.num_processes workers on this machine, all writing to the run run_id; or, with train.nodes > 1, this
    node's share of a c10d rendezvous (run_id None: the worker that becomes global rank 0, on whichever node,
    creates the run and writes the outputs)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if run_id is not None:
        env[mlflow_runs.RUN_ID_ENV] = run_id
    code = subprocess.run(torchrun_command(params), env=env, check=False).returncode
    if code == 0:
        pruning.raise_if_pruned()  # the workers stopped together for a sweep's pruner and ended as finished
    return code


def torchrun_command(params: Params) -> list[str]:
    train = params.train
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={train.num_processes}"]
    if train.nodes == 1:
        command.append("--standalone")
    else:
        # The same id on every node, and another for other params or data: nodes of different jobs never meet.
        job = checkpoints.fingerprint(params, TOKENIZED_DIR)[:16]
        endpoint = rendezvous_endpoint(train, os.environ)
        command += [f"--nnodes={train.nodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={job}"]
    return [*command, "-m", "tasks.train"]


def rendezvous_endpoint(train: TrainParams, environ: Mapping[str, str]) -> str:
    """Where the nodes meet.

    train.rendezvous, else the scheduler's (torchrun's own PET_RDZV_ENDPOINT, or the MASTER_ADDR and MASTER_PORT a
    PyTorchJob sets)."""
    if train.rendezvous:
        return train.rendezvous
    if environ.get("PET_RDZV_ENDPOINT"):
        return environ["PET_RDZV_ENDPOINT"]
    if environ.get("MASTER_ADDR"):
        return f"{environ['MASTER_ADDR']}:{environ.get('MASTER_PORT', '29500')}"
    raise PipelineError(
        f"train.nodes: {train.nodes} nodes need a place to meet: set train.rendezvous to host:port of the first "
        "node (the same on every node), or run where the scheduler sets MASTER_ADDR and MASTER_PORT"
    )


def train_on_nodes(params: Params) -> None:
    """This node's launcher of a multi-node training.

    c10d may give global rank 0 to any node: the node where it ran holds the model and the run; any other node exits
    OUTPUTS_ELSEWHERE_EXIT, so that DVC does not record its old outputs as this training's."""
    record = MODEL_DIR / RUN_RECORD

    def written() -> tuple[int, int] | None:  # a model swapped in is a new file, even for a resumed run's id
        return (record.stat().st_ino, record.stat().st_mtime_ns) if record.exists() else None

    before = written()
    code = launch_processes(params, None)
    if code:
        raise PipelineError(f"train: a torchrun worker failed (exit status {code}); see its output above")
    if written() in (None, before):
        print(
            f"train: this node's {params.train.num_processes} process(es) trained; global rank 0 ran on another node, "
            f"which saved {MODEL_DIR} and logged the run: evaluate and register there"
        )
        sys.exit(OUTPUTS_ELSEWHERE_EXIT)
