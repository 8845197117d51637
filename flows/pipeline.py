"""Prefect flow `training-pipeline`: one task per DVC stage, in dvc.yaml's order, each run through `dvc repro`.

The stages come from dvc.yaml itself, so a stage added there is a task here. DVC decides whether a stage has
anything to do (an unchanged stage is skipped); Prefect gives the run a name, logs, retries and schedules. The
flow holds no ML logic. With `overrides` the stages run in a run workspace (flows/workspace.py), leaving the
project's params.yaml as committed. With `promote` the `promote-model` flow runs as a subflow once the new
version is registered.
Run: python -m flows.pipeline, gpt2-pipeline run, or a deployment (prefect.yaml, gpt2-pipeline serve).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, task
from prefect.runtime import flow_run
from prefect.tasks import exponential_backoff

from flows import artifacts, server, workspace
from flows.promote import promote_model
from tasks.plumbing.console import tools_first
from tasks.plumbing.errors import BAD_INPUT_EXIT, OUTPUTS_ELSEWHERE_EXIT, PRUNED_EXIT, PipelineError
from tasks.plumbing.outputs import read_json
from tasks.plumbing.params import PARAMS_FILE, RegisterParams, load_params
from tasks.plumbing.paths import EVAL_METRICS, REGISTERED_FILE
from tasks.plumbing.redaction import redact
from tasks.tracking.lineage import FLOW_RUN_ENV

DVC_FILE = Path("dvc.yaml")
TRAIN_RETRIES = 2  # a crashed or preempted training resumes from its last checkpoint
TRAIN_RETRY_DELAYS = exponential_backoff(backoff_factor=30)(TRAIN_RETRIES)  # 30 s, then 60 s
# DVC exits 255 whatever its stage did; the stage's own status is in its last line (a signal is negative).
DVC_STAGE_EXIT = re.compile(r"^ERROR: failed to reproduce '[^']+': failed to run: .*, exited with (-?\d+)$")
# What DVC tells a person at a terminal after each stage (git add dvc.lock, autostage, dvc push): the flow commits
# nothing and pushes itself (--remote), so its log leaves these out.
DVC_GIT_HINT = re.compile(
    r"^(To track the changes with git, run:|To enable auto staging, run:|\s+git add \S.*|"
    r"\s+dvc config core\.autostage true|Use `dvc push` to send your updates to remote storage\.)$"
)


class StageFailed(PipelineError):
    """A stage (or dvc) exited non-zero; the exit status is the stage's own (tasks.plumbing.errors' contract)."""

    def __init__(self, stage: str, returncode: int, message: str):
        super().__init__(f"stage {stage} failed: {message}")
        self.exit_status = returncode


def stages(project: Path) -> list[str]:
    """dvc.yaml's stages, each after the stages whose outputs it reads (in the file's order where that is free)."""
    try:
        spec = yaml.safe_load((project / DVC_FILE).read_text(encoding="utf-8"))["stages"]
    except (OSError, KeyError, TypeError) as exc:
        raise PipelineError(
            f"{project / DVC_FILE}: cannot read its stages ({exc}); run from the project root"
        ) from None
    made_by = {}
    for name, stage in spec.items():
        for out in (*stage.get("outs", []), *stage.get("metrics", []), *stage.get("plots", [])):
            made_by[Path(next(iter(out)) if isinstance(out, dict) else out)] = name

    def upstream(name: str) -> list[str]:
        deps = [Path(dep) for dep in spec[name].get("deps", [])]
        return [made_by[out] for dep in deps for out in made_by if out == dep or out in dep.parents]

    ordered: list[str] = []

    def visit(name: str, trail: tuple[str, ...]) -> None:
        if name in trail:
            raise PipelineError(f"{DVC_FILE}: stages {' -> '.join((*trail, name))} form a cycle")
        if name not in ordered:
            for before in upstream(name):
                visit(before, (*trail, name))
            ordered.append(name)

    for name in spec:
        visit(name, ())
    return ordered


def stage_additions(flow_run_id: str | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """What a stage's environment adds to this process's: the flow run id for MLflow lineage, a workspace's overrides.

    The tasks take these, never the environment itself: Prefect keeps task parameters (for cache keys, the UI,
    retries), and the environment holds passwords and cloud keys."""
    return {**({FLOW_RUN_ENV: flow_run_id} if flow_run_id else {}), **(extra or {})}


def stage_env(additions: dict[str, str]) -> dict[str, str]:
    """The environment a stage runs in, made inside the task: this process's, this interpreter's tools first."""
    env = dict(os.environ)
    env["PATH"] = tools_first(Path(sys.executable).parent, env.get("PATH", ""))
    env.update(additions)
    return env


def stage_status(lines: list[str], dvc_status: int) -> int:
    """The exit status of the stage DVC ran (128 + n when signal n ended it), else DVC's own."""
    for line in reversed(lines):
        found = DVC_STAGE_EXIT.match(line)
        if found:
            status = int(found.group(1))
            return 128 - status if status < 0 else status
    return dvc_status


def worth_retrying(task, task_run, state) -> bool:
    """Whether a failed stage is worth retrying.

    Retry crashes and faults, not bad input (the same params would fail the same way), a node whose part of a
    multi-node training is done (rerun alone, it would wait at the rendezvous for nodes that have finished) nor a
    training the sweep's pruner stopped (its verdict would stand)."""
    final = (BAD_INPUT_EXIT, OUTPUTS_ELSEWHERE_EXIT, PRUNED_EXIT)
    return not (isinstance(state.data, StageFailed) and state.data.exit_status in final)


@task(name="dvc-remote", task_run_name="dvc {action}")
def sync_remote(action: str, remote: str, cwd: str, additions: dict[str, str]) -> None:
    """`dvc pull` what the remote already has (missing outputs are fine: the stages make them) or `dvc push`."""
    command = [sys.executable, "-m", "dvc", action, "--remote", remote]
    if action == "pull":
        command.append("--allow-missing")
    env = stage_env(additions)
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    print(redact(result.stdout.strip()))  # a remote's URL may carry credentials; the print goes to Prefect's log
    if result.returncode != 0:
        detail = redact((result.stderr.strip().splitlines() or ["no output"])[-1])
        raise StageFailed(f"dvc {action}", result.returncode, f"{detail} (remote {remote!r}; see `dvc remote list`)")


def for_the_log(line: str) -> bool:
    """A stage's output line for the flow's log: not DVC's hints for a terminal, nor the blank lines around them."""
    return bool(line.strip()) and not DVC_GIT_HINT.match(line)


@task(name="dvc-stage", task_run_name="{stage}")
def run_stage(stage: str, cwd: str, additions: dict[str, str]) -> dict[str, Any]:
    """Run one DVC stage (skipped by DVC when its inputs are unchanged), streaming its output to the log.

    Whether DVC ran it, and the seconds it took: a row of the run's stage table."""
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    started = time.perf_counter()
    with subprocess.Popen(
        command, cwd=cwd, env=stage_env(additions), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        lines = []
        for line in process.stdout or []:
            lines.append(redact(line.rstrip()))  # DVC's and MLflow's own lines too, before Prefect's log has them
            if for_the_log(lines[-1]):
                print(lines[-1])
    if process.returncode != 0:
        raise StageFailed(stage, stage_status(lines, process.returncode), failure_line(lines))
    ran = any(line.startswith(f"Running stage '{stage}'") for line in lines)  # DVC's words before the command
    return {
        "stage": stage,
        "ran": "ran" if ran else "skipped (unchanged)",
        "seconds": round(time.perf_counter() - started, 1),
    }


def failure_line(lines: list[str]) -> str:
    """The line that explains a failed `dvc repro`.

    The stage's own (`error: ...`), else DVC's (`ERROR: ...`, such as another run holding the workspace's lock),
    else the last line."""
    for prefix in ("error:", "ERROR:"):
        found = [line for line in lines if line.startswith(prefix)]
        if found:
            return found[-1]
    return lines[-1] if lines else "no output"


run_train_stage = run_stage.with_options(
    retries=TRAIN_RETRIES, retry_delay_seconds=TRAIN_RETRY_DELAYS, retry_condition_fn=worth_retrying
)


@flow(name="training-pipeline", log_prints=True)
def training_pipeline(overrides: dict[str, Any] | None = None, promote: bool = False, remote: str | None = None) -> str:
    """ingest -> tokenize -> train -> evaluate -> register [-> promote]; returns the registered model URI.

    Args:
        overrides: params.yaml keys to change for this run only, e.g. {"train.max_steps": 200}.
        promote: run the promote-model flow once the new version is registered.
        remote: a DVC remote to pull existing outputs from first and push the new ones to afterwards.
    """
    server.one_line_errors()
    overrides = overrides or {}
    project = Path.cwd()
    try:
        if not overrides:  # DVC's own lock keeps two runs in the project apart
            return _run_stages(project, stage_additions(flow_run.get_id()), promote, remote)
        stale = workspace.uncommitted(project)
        if stale:
            print(f"warning: the run uses the committed HEAD; uncommitted changes not included: {', '.join(stale)}")
        with workspace.claimed(project, overrides) as cwd:  # no other run resets it under this one
            print(f"overrides {overrides} run in {cwd.relative_to(project)}")
            additions = stage_additions(flow_run.get_id(), workspace.environment(project, overrides))
            return _run_stages(cwd, additions, promote, remote)
    except PipelineError as error:  # the run's one line, where the Prefect UI shows the run
        artifacts.publish_failure(_model_name(project), str(error))
        raise


def _model_name(project: Path) -> str:
    """register.model_name in the project's params, or the default where they cannot be read."""
    try:
        return load_params(project / PARAMS_FILE).register.model_name
    except PipelineError:
        return RegisterParams().model_name


def _run_stages(cwd: Path, additions: dict[str, str], promote: bool, remote: str | None) -> str:
    """The stages in cwd (the project or a run workspace) in order, with the remote and promotion around them."""
    if remote:
        sync_remote("pull", remote, str(cwd), additions)
    table = []
    for stage in stages(cwd):
        runner = run_train_stage if stage == "train" else run_stage
        table.append(runner(stage, str(cwd), additions))
    if remote:
        sync_remote("push", remote, str(cwd), additions)
    registered = read_json(cwd / REGISTERED_FILE, "register")
    print(f"registered {registered['model_uri']} (@{registered['alias']})")
    decision = None
    if promote:  # this run's model, whatever @challenger names by now
        decision = promote_model(workdir=str(cwd), version=registered["version"])
    artifacts.publish_run(registered, read_json(cwd / EVAL_METRICS, "evaluate"), table, decision)
    return registered["model_uri"]


if __name__ == "__main__":
    server.start_local()
    training_pipeline()
