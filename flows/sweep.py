"""Prefect flow `sweep`: an Optuna study over params.yaml's `sweep.space`, each trial a DVC experiment.

A trial is `dvc exp run --temp --name <study>-<number> -S key=value ... evaluate`: the same stages and code as `dvc
repro`, in a temporary copy of the project, so `dvc exp show` lists every finished trial and `dvc exp apply` brings
one back. Its training reports the validation loss to the trial and stops when the study's pruner says so
(tasks/training/pruning.py). The study has one MLflow run, each trial's model run is its child; at the end the
study's plots and best params are logged on it, a table of trials is printed, the best params are written as
params/<study>-best.yaml, and with `register_best` the best trial's params go through the pipeline flow (a run
workspace, the register stage, its card and lineage) like any run.
Run: gpt2-pipeline sweep [--trials N] [--resume] [--register-best], or a deployment (prefect.yaml).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows import pipeline, server
from tasks import sweep as study_tools
from tasks.data.sources import resolve_sources
from tasks.plumbing.errors import PRUNED_EXIT, PipelineError
from tasks.plumbing.params import PARAMS_FILE, Params, apply_overrides, load_params, read_raw
from tasks.plumbing.redaction import redact
from tasks.tracking import mlflow_runs, store
from tasks.tracking.lineage import SWEEP_TRIAL_ENV

LAST_STAGE = "evaluate"  # a trial trains and evaluates; only the best is registered, through the pipeline flow
STATE_TAG = "sweep_state"  # a trial's run: complete, pruned or failed
FAILURES_IN_A_ROW = 3  # a worker stops after this many: the setting, not the params, is then what fails
POLL = 5.0  # seconds: how often --register-best looks whether other workers' trials have ended


def experiment_name(study: str, number: int) -> str:
    return f"{study}-{number}"


@task(name="trial", task_run_name="trial {number}", cache_policy=NO_CACHE)
def run_trial(number: int, overrides: dict[str, Any], additions: dict[str, str], cwd: str, started) -> tuple[int, str]:
    """One trial as a DVC experiment in a temporary copy; returns the stage's exit status and its failure line."""
    command = [
        sys.executable,
        "-m",
        "dvc",
        "exp",
        "run",
        "--temp",
        "--name",
        experiment_name(additions["study"], number),
    ]
    for key, value in overrides.items():
        command += ["-S", f"{key}={json.dumps(value)}"]
    for path in copy_paths(Path(cwd), overrides):
        command += ["--copy-paths", path]
    command.append(LAST_STAGE)
    env = pipeline.stage_env({SWEEP_TRIAL_ENV: additions["trial"]})
    lines: list[str] = []
    # A session of its own: a worker that finds this worker dead stops the trial's processes as one group.
    with subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    ) as process:
        started(process.pid)
        for line in process.stdout or []:
            lines.append(redact(line.rstrip()))
            if not (pipeline.DVC_GIT_HINT.match(lines[-1]) or _pruned_by_dvc(lines[-1])):
                print(f"trial {number}: {lines[-1]}")
    status = pipeline.stage_status(lines, process.returncode) if process.returncode else 0
    return status, pipeline.failure_line(lines) if status else ""


def _pruned_by_dvc(line: str) -> bool:
    """DVC's 'ERROR: failed to reproduce' for a training the pruner stopped: no failure, so not in the log (the
    stage's own line says it was pruned, the flow's that the trial is)."""
    return pipeline.stage_status([line], 0) == PRUNED_EXIT


def copy_paths(project: Path, overrides: dict[str, Any]) -> list[str]:
    """What a trial passes with --copy-paths: its corpus files that neither git nor DVC tracks (`dvc exp run --temp`
    copies only what they track; a `dvc add`-ed corpus comes from the DVC cache).

    DVC copies a file only into a folder the copy already has (one where git tracks a file), so a file in a folder
    of its own is passed as that folder (copied whole, with the folders above it made)."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=project, capture_output=True, text=True, check=True)
    tracked = {name for name in listed.stdout.split("\0") if name}
    files = untracked_sources(project, overrides, tracked)
    present = {str(parent) for name in tracked for parent in Path(name).parents}
    picked = sorted({path if str(Path(path).parent) in present else str(Path(path).parent) for path in files})
    return [path for path in picked if not any(Path(path).is_relative_to(other) for other in picked if other != path)]


def untracked_sources(project: Path, overrides: dict[str, Any], tracked: set[str]) -> list[str]:
    """The trial's corpus files that neither git (tracked: the files it lists) nor DVC tracks."""
    data = apply_overrides(read_raw(project / PARAMS_FILE), overrides)["data"]
    names = [
        name for name in (*data.get("sources", []), *data.get("validation_sources", [])) if not Path(name).is_absolute()
    ]
    try:
        with contextlib.chdir(project):  # the files ingest will read, matched as ingest matches them
            found = [name for name in resolve_sources(names) if not name.startswith("hf:")]
    except PipelineError:
        return []  # a name that matches nothing: the trial's ingest says so in its one line
    return [path for path in found if path not in tracked and not study_tools.dvc_tracked(project, path)]


@flow(name="sweep", log_prints=True)
def sweep(
    trials: int | None = None, timeout_minutes: float | None = None, resume: bool = False, register_best: bool = False
) -> dict[str, Any]:
    """Run (or continue, with resume) the study params.yaml's `sweep:` describes; returns the best trial.

    Args:
        trials: how many trials the study holds when done (all workers together); default sweep.trials.
        timeout_minutes: start no trial after this long; default sweep.timeout_minutes.
        resume: continue the study sweep.study names, with its finished trials (a new one where none is).
        register_best: put the study's best trial's params through the pipeline flow, which registers its model
            (once the trials other workers run have ended).
    """
    server.one_line_errors()
    params = load_params()
    update = {key: value for key, value in (("trials", trials), ("timeout_minutes", timeout_minutes)) if value}
    settings = params.sweep.model_copy(update=update)
    project = Path.cwd()
    url = study_tools.storage_url(settings, project)
    storage = study_tools.open_storage(url)
    study = study_tools.open_study(settings, storage, resume)
    print(
        f"study {study.study_name} in {study_tools.shown(url)}: {settings.trials} trials, objective "
        f"{settings.objective} ({settings.direction}), sampler {settings.sampler}, pruner {settings.pruner}"
    )
    parent = _study_run(study, params, url)
    status = "FAILED"
    deadline = time.monotonic() + settings.timeout_minutes * 60 if settings.timeout_minutes else None

    def work() -> None:  # fail the trials of workers that are gone (queued again), then run trials to the budget
        _fail_interrupted(study, params, parent, url)
        _run_trials(study, storage, settings, params, parent, project, url, deadline)

    try:
        work()
        if register_best:  # the study's best, not this worker's best so far
            await_other_workers(study, work, deadline)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        _close_study_run(study, settings, parent, status)
    found = study_tools.best(study)
    if found is None:
        raise PipelineError(f"sweep {study.study_name}: no trial finished; see the trials' lines above")
    best_file = study_tools.best_params_file(
        PARAMS_FILE, found.params, Path("params") / f"{study.study_name}-best.yaml"
    )
    print(f"best: trial {found.number}, {settings.objective} {found.value:.4f}, params {found.params}\n"
          f"      written to {best_file} (dvc repro with it: gpt2-pipeline run --params {best_file}); "
          f"its experiment: dvc exp apply {experiment_name(study.study_name, found.number)}")  # fmt: skip
    result = {"study": study.study_name, "trial": found.number, "value": found.value, "params": found.params,
              "params_file": str(best_file), "mlflow_run_id": parent}  # fmt: skip
    if register_best:
        result["model_uri"] = pipeline.training_pipeline(overrides=found.params)
    return result


def _fail_interrupted(study, params: Params, parent: str, url: str) -> None:
    """Fail the trials whose worker is gone (their params queued to run again), in Optuna and MLflow."""
    for trial in study_tools.fail_interrupted(study, url):
        print(f"trial {trial.number}: its worker is gone; marked failed, its params queued to run again")
        if not _close_trial_runs(params, study.study_name, trial.number, "failed"):
            # stopped before its training made a run: MLflow still shows it, failed
            _stand_in_run(params, study.study_name, trial.number, parent, trial.params, "its worker stopped")


def await_other_workers(
    study, work: Callable[[], None], deadline: float | None, pause: Callable[[], None] = lambda: time.sleep(POLL)
) -> None:
    """Until no trial of another worker runs, or the deadline (time.monotonic()) passes; after each pause, `work`
    fails those whose worker is gone and runs their retries."""
    state = study_tools.optuna_module().trial.TrialState
    told = ""
    while running := study.get_trials(deepcopy=False, states=(state.RUNNING,)):
        numbers = ", ".join(str(trial.number) for trial in running)
        if deadline is not None and time.monotonic() >= deadline:
            print(f"trials {numbers}: still running at sweep.timeout_minutes; the best so far is registered")
            return
        if numbers != told:
            print(f"trials {numbers}: other workers still run them; the best is registered once they end")
            told = numbers
        pause()
        work()


def _run_trials(
    study, storage, settings, params: Params, parent: str, project: Path, url: str, deadline: float | None
) -> None:
    """Trials until the study holds its budget or the deadline (time.monotonic()) passes; FAILURES_IN_A_ROW failed
    trials stop the worker (a failed trial does not count toward the budget: a broken setting would otherwise fail
    trials forever)."""
    failures = 0
    while deadline is None or time.monotonic() < deadline:
        trial = study_tools.next_trial(study, settings, url)
        if trial is None:
            return
        failure = _trial(study, trial, storage, settings, params, parent, project)
        failures = failures + 1 if failure else 0
        if failures == FAILURES_IN_A_ROW:
            raise PipelineError(
                f"sweep {study.study_name}: {failures} trials in a row failed, the last with: "
                f"{failure.removeprefix('error: ')}; mend "
                "that, then continue with gpt2-pipeline sweep --resume"
            )


def _trial(study, trial, storage, settings, params: Params, parent: str, project: Path) -> str:
    """Run one trial and tell the study how it went: complete (with its objective), pruned or failed. Returns the
    failure's line, or "" when it did not fail (params the pipeline refuses count: a space of mostly refused
    combinations would otherwise draw forever)."""
    state = study_tools.optuna_module().trial.TrialState
    overrides = study_tools.overrides(trial)
    try:
        apply_overrides(read_raw(), overrides)  # a combination the pipeline refuses fails here, not after ingest
    except PipelineError as exc:
        print(f"trial {trial.number}: failed: {exc}")
        study.tell(trial, state=state.FAIL)
        _stand_in_run(params, study.study_name, trial.number, parent, overrides, str(exc))
        return str(exc)
    print(f"trial {trial.number}: {overrides}")
    additions = {"study": study.study_name, "trial": json.dumps({
        "study": study.study_name, "storage": storage.url, "trial_id": trial._trial_id, "number": trial.number,
        "parent_run_id": parent, "pruner": settings.pruner, "startup_trials": settings.startup_trials})}  # fmt: skip
    with study_tools.heartbeat(storage, trial):
        status, line = run_trial(
            trial.number, overrides, additions, str(project), lambda pgid: study_tools.record_group(trial, pgid)
        )
    child = _trial_run(params, study.study_name, trial.number)
    if status == 0 and child is not None:
        value = child.data.metrics.get(f"eval/{settings.objective}")
        if value is not None:
            study.tell(trial, value)
            _tag(child.info.run_id, "complete")
            mlflow_runs.log_metrics(parent, {f"sweep/{settings.objective}": value}, step=trial.number)
            print(f"trial {trial.number}: complete, {settings.objective} {value:.4f}")
            return ""
        line = f"its run {child.info.run_id} has no eval/{settings.objective}"
    if status == PRUNED_EXIT:
        study.tell(trial, state=state.PRUNED)
        print(f"trial {trial.number}: pruned")
        _close_trial_runs(params, study.study_name, trial.number, "pruned")
        return ""
    study.tell(trial, state=state.FAIL)
    print(f"trial {trial.number}: failed (exit status {status}): {line}")
    if child is None:
        _stand_in_run(params, study.study_name, trial.number, parent, overrides, line)
    else:
        _close_trial_runs(params, study.study_name, trial.number, "failed")
    return line or f"exit status {status}"


def _trial_runs(params: Params, study: str, number: int) -> list:
    experiment = mlflow_runs.experiment_id(params.mlflow.experiment)
    query = f"tags.sweep_study = '{study}' and tags.sweep_trial = '{number}'"
    return store.client().search_runs([experiment], filter_string=query, order_by=["attributes.start_time DESC"])


def _trial_run(params: Params, study: str, number: int):
    """The trial's model run (its training's), or None when the trial ended before training."""
    runs = _trial_runs(params, study, number)
    return runs[0] if runs else None


def _close_trial_runs(params: Params, study: str, number: int, state: str) -> list:
    """Tag the trial's runs with its state; one its stage left RUNNING (a worker killed under it) ends FAILED.
    Returns the runs (none: the trial ended before its training made one)."""
    runs = _trial_runs(params, study, number)
    for run in runs:
        _tag(run.info.run_id, state)
        if run.info.status == "RUNNING":
            store.client().set_terminated(run.info.run_id, "FAILED")
    return runs


def _tag(run_id: str, state: str) -> None:
    mlflow_runs.set_tags(run_id, {STATE_TAG: state})


def _stand_in_run(params: Params, study: str, number: int, parent: str, overrides: dict, reason: str) -> None:
    """A child run for a trial that failed before its training made one: its params, state and reason."""
    client = store.client()
    run = client.create_run(
        mlflow_runs.experiment_id(params.mlflow.experiment),
        run_name=experiment_name(study, number),
        tags={
            "mlflow.parentRunId": parent,
            "sweep_study": study,
            "sweep_trial": str(number),
            STATE_TAG: "failed",
            "sweep_failure": redact(reason)[:5000],
        },
    )
    for key, value in overrides.items():
        client.log_param(run.info.run_id, key, str(value))
    client.set_terminated(run.info.run_id, "FAILED")


def _study_run(study, params: Params, url: str) -> str:
    """The study's MLflow run (the parent of its trials' runs): made with the study, reopened by a resume."""
    with study_tools.budget_lock(url, study.study_name):  # workers starting together make one run, not one each
        return _study_run_locked(study, params, url)


def _study_run_locked(study, params: Params, url: str) -> str:
    client = store.client()
    recorded = study.user_attrs.get("mlflow_run_id")  # read from the storage: another worker's, when it was first
    if mlflow_runs.run_exists(recorded):
        client.update_run(recorded, status="RUNNING")
        return recorded
    run = client.create_run(
        mlflow_runs.experiment_id(params.mlflow.experiment),
        run_name=f"sweep-{study.study_name}",
        tags={"sweep_study": study.study_name, "sweep_storage": study_tools.shown(url)},
    )
    for key, value in study_tools.space_summary(params).items():
        client.log_param(run.info.run_id, key, value)
    study.set_user_attr("mlflow_run_id", run.info.run_id)
    return run.info.run_id


def _close_study_run(study, settings, parent: str, status: str) -> None:
    """The plots, the table and the best params on the study's run; it ends when no trial of the study is left
    running (another worker's included)."""
    client = store.client()
    with tempfile.TemporaryDirectory() as folder:
        _, skipped = study_tools.write_plots(study, Path(folder) / "plots")
        for line in skipped:
            print(f"plot left out: {line}")
        table = study_tools.trials_table(study, settings.objective)
        (Path(folder) / "trials.txt").write_text(table, encoding="utf-8")
        print(table)
        client.log_artifacts(parent, folder)
    found = study_tools.best(study)
    if found is not None:
        client.log_metric(parent, f"sweep/best_{settings.objective}", found.value)
        mlflow_runs.set_tags(parent, {"sweep_best_trial": found.number, "sweep_best_params": json.dumps(found.params)})
    states = {trial.state.name for trial in study.get_trials(deepcopy=False)}
    if status != "FINISHED" or not states & {"RUNNING", "WAITING"}:
        client.set_terminated(parent, status)


if __name__ == "__main__":
    from flows import server

    server.start_local()
    sweep()
