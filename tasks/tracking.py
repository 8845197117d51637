"""MLflow helpers: the pipeline's one run, lineage tags and registry aliases.

One MLflow run per pipeline execution. `dvc repro` starts every stage as its own process, so the first stage
that runs creates the run and records its id in RUN_FILE; later stages find it there, and `register` ends it.
A finished run, one on another tracking server or one made from other params is never reused. Everything
goes through an explicit run id and MlflowClient, never MLflow's thread-local active run (Prefect runs tasks
in threads).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tasks.common import PipelineError
from tasks.params import Params, flatten, params_hash

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
ARTIFACTS_DIR = Path("mlartifacts")
RUN_FILE = Path(".mlflow-run.json")
HEALTH_TIMEOUT_S = 10
MAX_METRICS_PER_BATCH = 1000  # the most metrics MLflow's log_batch takes in one request
RESUMABLE = ("RUNNING", "FAILED")  # a stage that failed leaves the run to be finished by the next attempt
RUN_ID_ENV = "GPT2_PIPELINE_RUN_ID"
FLOW_RUN_ENV = "GPT2_PIPELINE_PREFECT_FLOW_RUN_ID"
OVERRIDES_ENV = "GPT2_PIPELINE_OVERRIDES"  # JSON of the dotted-key overrides a run workspace applied
DVC_LOCK = Path("dvc.lock")
# Outputs whose dvc.lock hashes identify a model's data: (stage, path, tag name).
LINEAGE_OUTS = (
    ("ingest", "data/prepared", "data_md5"),
    ("tokenize", "data/tokenized", "tokenized_md5"),
    ("train", "models/gpt2", "model_md5"),
)


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set (a shared server), else a SQLite file in the project."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def shown_uri(uri: str | None = None) -> str:
    """The tracking URI as logs and messages show it: a password in it (user:password@host) becomes ***."""
    return re.sub(r"(//[^/@:]+:)[^/@]+@", r"\1***@", uri or tracking_uri())


def mlflow_module():
    """mlflow, imported with its usage telemetry off: the pipeline talks only to the configured tracking server."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # MLflow prints "View run at <tracking URI>" with the URI's password in it; the stages print their own lines.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    import mlflow

    return mlflow


def client():
    return mlflow_module().MlflowClient(tracking_uri=tracking_uri(), registry_uri=tracking_uri())


def experiment_id(name: str) -> str:
    """Get or create the experiment; the local default keeps its artifacts in ./mlartifacts."""
    mlflow_client = client()
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow_client.create_experiment(name, artifact_location=_local_artifacts(tracking_uri()))
    except Exception:  # another pipeline created it a moment ago (two workspaces, one server)
        experiment = mlflow_client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _local_artifacts(uri: str) -> str | None:
    """A SQLite store keeps its artifacts in mlartifacts/ beside the database file, wherever a stage runs
    (a run workspace under .runs/ shares the project's store); a server decides for itself."""
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri.removeprefix("sqlite:///"))
    return (database.parent / ARTIFACTS_DIR).resolve().as_uri()


def pipeline_run(params: Params) -> str:
    """The id of this pipeline execution's MLflow run: the one handed on, or a new one."""
    require_tracking_server()
    run_id = os.environ.get(RUN_ID_ENV) or _resumable_run(params)
    if run_id is None:
        run_id = _start_run(params)
    flow_run = os.environ.get(FLOW_RUN_ENV)
    if flow_run:
        client().set_tag(run_id, "prefect_flow_run_id", flow_run)
    return run_id


def _resumable_run(params: Params) -> str | None:
    if not RUN_FILE.exists():
        return None
    recorded = json.loads(RUN_FILE.read_text())
    if recorded.get("tracking_uri") != shown_uri():  # stored without its password
        return None
    try:
        run = client().get_run(recorded["run_id"])
    except Exception:  # deleted run or a reset store: start afresh
        return None
    if run.info.status not in RESUMABLE or run.data.tags.get("params_hash") != params_hash():
        return None
    return run.info.run_id


def _start_run(params: Params) -> str:
    from mlflow.entities import Param

    mlflow_client = client()
    tags = {"params_hash": params_hash(), **git_lineage()}
    run = mlflow_client.create_run(experiment_id(params.mlflow.experiment), tags=tags, run_name=_run_name())
    run_id = run.info.run_id
    logged = {**flatten(params), "overrides": os.environ.get(OVERRIDES_ENV) or "{}"}
    mlflow_client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in logged.items()])
    RUN_FILE.write_text(json.dumps({"tracking_uri": shown_uri(), "run_id": run_id}) + "\n")
    return run_id


def _run_name() -> str:
    return time.strftime("pipeline-%Y%m%d-%H%M%S")


def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log several metrics at one step in one request."""
    log_metric_steps(run_id, [(step, int(time.time() * 1000), metrics)])


def log_metric_steps(run_id: str, entries: list[tuple[int, int, dict[str, float]]]) -> None:
    """Log (step, timestamp in ms, metrics) entries gathered over several steps, MLflow's limit of 1,000 metrics
    a request at a time."""
    from mlflow.entities import Metric

    batch = [Metric(key, float(value), at, step) for step, at, metrics in entries for key, value in metrics.items()]
    for start in range(0, len(batch), MAX_METRICS_PER_BATCH):
        client().log_batch(run_id, metrics=batch[start : start + MAX_METRICS_PER_BATCH], synchronous=True)


def last_logged_steps(run_id: str, keys: list[str]) -> dict[str, int]:
    """The highest step logged so far for each metric of a run (a resumed stage continues after it)."""
    mlflow_client = client()
    steps = {}
    for key in keys:
        history = mlflow_client.get_metric_history(run_id, key)
        if history:
            steps[key] = max(metric.step for metric in history)
    return steps


def git_lineage() -> dict[str, str]:
    """The git commit and whether tracked files differ from it (dvc.lock aside: dvc repro rewrites it)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!dvc.lock"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    return {"git_commit": commit.strip(), "git_dirty": str(bool(status.strip())).lower()}


def dvc_lineage(lock_path: Path = DVC_LOCK) -> dict[str, str]:
    """md5 of the prepared data, tokenized data and model from dvc.lock, where recorded."""
    if not lock_path.exists():
        return {}
    stages = (yaml.safe_load(lock_path.read_text()) or {}).get("stages", {})
    tags = {}
    for stage, path, tag in LINEAGE_OUTS:
        for out in stages.get(stage, {}).get("outs", []):
            if out.get("path") == path and "md5" in out:
                tags[tag] = out["md5"]
    return tags


def lineage_tags(run_id: str) -> dict[str, str]:
    """Everything that says where a model came from: commit, data hashes, params hash, run ids."""
    tags: dict[str, Any] = {**git_lineage(), **dvc_lineage(), "params_hash": params_hash(), "mlflow_run_id": run_id}
    flow_run = os.environ.get(FLOW_RUN_ENV)
    if flow_run:
        tags["prefect_flow_run_id"] = flow_run
    return {key: str(value) for key, value in tags.items()}


def require_tracking_server() -> None:
    """Fail before any work when a configured tracking server does not answer.

    An HTTP server is asked for /health with a short timeout first: MLflow's client retries a refused
    connection with backoff for minutes before it gives up.
    """
    uri = tracking_uri()
    try:
        if uri.startswith(("http://", "https://")):
            import httpx

            httpx.get(f"{uri.rstrip('/')}/health", timeout=HEALTH_TIMEOUT_S).raise_for_status()
        client().search_experiments(max_results=1)
    except Exception as exc:
        raise PipelineError(
            f"MLflow tracking server {shown_uri(uri)} is not reachable ({type(exc).__name__}); "
            "start it or unset MLFLOW_TRACKING_URI to use the local mlflow.db"
        ) from None


@dataclass(frozen=True)
class ModelSource:
    """Where from_pretrained finds a model and its tokenizer."""

    model: str
    tokenizer: str


MLFLOW_URI_PREFIXES = ("models:/", "runs:/")


@contextmanager
def model_source(name_or_path: str) -> Iterator[ModelSource]:
    """A hub id or a local folder as is; an MLflow model URI (`models:/gpt2-lm@champion`) downloaded for the
    duration of the block, its transformers-flavor layout (model/, components/tokenizer/) resolved."""
    if not name_or_path.startswith(MLFLOW_URI_PREFIXES):
        yield ModelSource(name_or_path, name_or_path)
        return
    mlflow = mlflow_module()
    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_registry_uri(tracking_uri())
    with tempfile.TemporaryDirectory(prefix="gpt2-source-") as scratch:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=name_or_path, dst_path=scratch))
        except Exception as exc:  # MLflow raises its own, REST and OS errors for a missing model or alias
            raise PipelineError(
                f"model.name_or_path: {name_or_path} is not in the MLflow registry at {shown_uri()} "
                f"({str(exc).splitlines()[0][:200]}); list versions and aliases in the MLflow UI"
            ) from None
        if not (local / "model" / "config.json").exists():
            raise PipelineError(f"model.name_or_path: {name_or_path} is not a transformers model logged by register")
        yield ModelSource(str(local / "model"), str(local / "components" / "tokenizer"))
