"""Prefect flow `training-pipeline`: one task per DVC stage, in order, each run through `dvc repro`.

DVC decides whether a stage has anything to do (an unchanged stage is skipped); Prefect gives the run a
name, logs, retries and schedules. The flow holds no ML logic. Run: python -m flows.pipeline
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prefect import flow, task
from prefect.runtime import flow_run

from tasks import tracking
from tasks.common import read_json
from tasks.register import REGISTERED_FILE

STAGES = ("ingest", "tokenize", "train", "evaluate", "register")


def stage_env(flow_run_id: str | None) -> dict[str, str]:
    """The environment a stage runs in: this interpreter's tools first, the flow run id for MLflow lineage."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if flow_run_id:
        env[tracking.FLOW_RUN_ENV] = flow_run_id
    return env


@task(name="dvc-stage", task_run_name="{stage}")
def run_stage(stage: str, flow_run_id: str | None) -> None:
    """Run one DVC stage (skipped by DVC when its inputs are unchanged), streaming its output to the log."""
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    with subprocess.Popen(
        command, env=stage_env(flow_run_id), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        lines = []
        for line in process.stdout or []:
            lines.append(line.rstrip())
            print(line.rstrip())
    if process.returncode != 0:
        errors = [line for line in lines if line.startswith("error:")] or lines[-1:]
        raise RuntimeError(f"stage {stage} failed: {errors[-1] if errors else 'no output'}")


@flow(name="training-pipeline", log_prints=True)
def training_pipeline() -> str:
    """ingest -> tokenize -> train -> evaluate -> register; returns the registered model URI."""
    flow_run_id = flow_run.get_id()
    for stage in STAGES:
        run_stage(stage, flow_run_id)
    registered = read_json(REGISTERED_FILE, "register")
    print(f"registered {registered['model_uri']} (@{registered['alias']})")
    return registered["model_uri"]


if __name__ == "__main__":
    training_pipeline()
