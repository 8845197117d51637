"""The MLflow run of a model: one run per trained model, found from the model's own files.

The rule: `train` creates the run and logs to it the params that made the model, the ingest and tokenize
figures carried with the data, and the training curve; it records the run's id in the model folder
(models/gpt2/mlflow_run.json, tracked by DVC with the model). `evaluate` and `register` read that record and log
to the same run: each evaluation appends a step to `eval/*`, each registration adds a model version whose
source is the run. Every stage reopens the run for its own work and closes it when it ends (FINISHED, FAILED,
or KILLED when stopped), so no run is left RUNNING. A model pulled into a store that lacks its run gets a run
that stands in for it, tagged with the original id. Everything goes through an explicit run id and
MlflowClient, never MLflow's thread-local active run (Prefect runs tasks in threads).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

from tasks.plumbing.errors import Stopped, TrialPruned
from tasks.plumbing.outputs import write_json
from tasks.plumbing.params import Params, flatten
from tasks.plumbing.paths import RUN_RECORD
from tasks.plumbing.redaction import redact
from tasks.tracking import inputs, lineage, store

MAX_METRICS_PER_BATCH = 1000  # the most metrics MLflow's log_batch takes in one request
RUN_ID_ENV = "GPT2_PIPELINE_RUN_ID"  # the run train's launcher opened, for its torchrun workers
# The params sections that make a model; evaluate's settings belong to each evaluation (evaluations/*.json).
MODEL_SECTIONS = ("data", "tokenizer", "model", "train", "mlflow")


def experiment_id(name: str) -> str:
    """Get or create the experiment; the local default keeps its artifacts in mlartifacts/ beside mlflow.db."""
    mlflow_client = store.client()
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow_client.create_experiment(name, artifact_location=store.local_artifacts(store.tracking_uri()))
    except Exception:  # another pipeline created it a moment ago (two workspaces, one server)
        experiment = mlflow_client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def create_run(params: Params, tags: dict[str, str] | None = None) -> str:
    """A new run with the model-making params and the lineage tags; it starts RUNNING."""
    mlflow_client = store.client()
    run = mlflow_client.create_run(
        experiment_id(params.mlflow.experiment),
        tags={key: redact(str(value)) for key, value in {**lineage.run_tags(), **(tags or {})}.items()},
        run_name=run_name(),
    )
    logged = {key: value for key, value in flatten(params).items() if key.split(".")[0] in MODEL_SECTIONS}
    logged["overrides"] = lineage.overrides()
    _log_params(run.info.run_id, logged)
    return run.info.run_id


def run_name() -> str:
    """A sweep trial's run is named as its DVC experiment (<study>-<number>), any other by its start."""
    trial = lineage.sweep_trial()
    return f"{trial['study']}-{trial['number']}" if trial else time.strftime("train-%Y%m%d-%H%M%S")


def _log_params(run_id: str, params: dict[str, object]) -> None:
    from mlflow.entities import Param

    # Params, like every line the project writes, never carry a URI's credentials (a hub or MLflow address).
    store.client().log_batch(run_id, params=[Param(key, redact(str(value))[:6000]) for key, value in params.items()])


def log_params_once(run_id: str, params: dict[str, str]) -> None:
    """Params a stage decides (not params.yaml's).

    Logged by the run's first attempt; a resumed attempt, maybe on another machine, keeps them (MLflow refuses to
    change a logged param)."""
    logged = store.client().get_run(run_id).data.params
    fresh = {key: value for key, value in params.items() if key not in logged}
    if fresh:
        _log_params(run_id, fresh)


def write_record(folder: Path, run_id: str) -> None:
    """Record the run in folder/mlflow_run.json (the model folder, a checkpoint folder)."""
    write_json(folder / RUN_RECORD, {"run_id": run_id, "tracking_uri": store.shown_uri()})


def read_record(folder: Path) -> str | None:
    try:
        return json.loads((folder / RUN_RECORD).read_text())["run_id"]
    except (OSError, ValueError, KeyError):
        return None


def run_exists(run_id: str | None) -> bool:
    """Whether the store holds this run (not deleted, not recorded in another store)."""
    if not run_id:
        return False
    try:
        store.client().get_run(run_id)
    except Exception:  # deleted, or recorded in another store
        return False
    return True


def training_run(params: Params, checkpoint_dir: Path, resuming: bool, figures: dict[str, float]) -> str:
    """The run a training logs to.

    The one its checkpoint recorded when it resumes, else a new one, holding the data's figures (ingest/*,
    tokenize/*) from the start."""
    store.require_tracking_server()
    recorded = read_record(checkpoint_dir) if resuming else None
    if run_exists(recorded):
        return recorded
    run_id = create_run(params)
    # What the data is (records, blocks, vocabulary): one value each, so tags; and the splits as dataset inputs.
    set_tags(run_id, {key: value for key, value in figures.items() if not isinstance(value, list)})
    inputs.log(run_id, inputs.split_inputs(figures, {"train": "training", "validation": "validation"}))
    write_record(checkpoint_dir, run_id)
    return run_id


def model_run(params: Params, model_dir: Path) -> str:
    """The run of the model in model_dir.

    A model trained against another store (a fresh clone's own mlflow.db after `dvc pull`) gets one run standing in
    for it, tagged trained_in_run, which its later stages find."""
    store.require_tracking_server()
    recorded = read_record(model_dir) or "unknown"
    if run_exists(recorded):
        return recorded
    stand_ins = store.client().search_runs(
        [experiment_id(params.mlflow.experiment)], filter_string=f"tags.trained_in_run = '{recorded}'", max_results=1
    )
    if stand_ins:
        return stand_ins[0].info.run_id
    run_id = create_run(params, {"trained_in_run": recorded})
    print(f"{model_dir}: its training run {recorded} is not in {store.shown_uri()}; logging to new run {run_id}")
    return run_id


@contextlib.contextmanager
def active(run_id: str) -> Iterator[str]:
    """The run is RUNNING while the block runs, then FINISHED, FAILED, or KILLED when the stage was stopped (a signal,
    or a sweep's pruner)."""
    mlflow_client = store.client()
    mlflow_client.update_run(run_id, status="RUNNING")
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    except (Stopped, KeyboardInterrupt, TrialPruned):
        status = "KILLED"
        raise
    finally:
        try:
            mlflow_client.set_terminated(run_id, status)
        except Exception:
            if status == "FINISHED":
                raise
            # The stage's own error wins over a failure to close its run (the server went away).


@contextlib.contextmanager
def system_metrics(run_id: str, resuming: bool) -> Iterator[None]:
    """MLflow's system metrics on the run while the block runs.

    System/* for CPU, memory, disk, network and each GPU, sampled every 10 s
    (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL); a resumed run continues their steps."""
    import logging

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)  # "started", "no GPU": not for the log
    monitor = SystemMetricsMonitor(run_id, resume_logging=resuming, tracking_uri=store.tracking_uri())
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log several metrics at one step in one request."""
    log_metric_steps(run_id, [(step, int(time.time() * 1000), metrics)])


def set_tags(run_id: str, tags: dict[str, object]) -> None:
    from mlflow.entities import RunTag

    store.client().log_batch(run_id, tags=[RunTag(key, redact(str(value))) for key, value in tags.items()])


def log_artifacts(run_id: str, folder: Path, artifact_path: str) -> None:
    """The files of folder as the run's artifacts under artifact_path."""
    store.client().log_artifacts(run_id, str(folder), artifact_path)


def log_metric_steps(run_id: str, entries: list[tuple[int, int, dict[str, float]]]) -> None:
    """Log metric entries gathered over several steps.

    Log (step, timestamp in ms, metrics) entries gathered over several steps, MLflow's limit of 1,000 metrics a
    request at a time."""
    from mlflow.entities import Metric

    batch = [Metric(key, float(value), at, step) for step, at, metrics in entries for key, value in metrics.items()]
    mlflow_client = store.client()
    for start in range(0, len(batch), MAX_METRICS_PER_BATCH):
        mlflow_client.log_batch(run_id, metrics=batch[start : start + MAX_METRICS_PER_BATCH], synchronous=True)


def last_logged_steps(run_id: str, keys: list[str]) -> dict[str, int]:
    """The highest step logged so far for each metric of a run (a resumed stage continues after it)."""
    mlflow_client = store.client()
    steps = {}
    for key in keys:
        history = mlflow_client.get_metric_history(run_id, key)
        if history:
            steps[key] = max(metric.step for metric in history)
    return steps


def next_step(run_id: str, key: str) -> int:
    """The step after the last one logged for key: 0 for the first evaluation, then 1, 2, ..."""
    return last_logged_steps(run_id, [key]).get(key, -1) + 1
