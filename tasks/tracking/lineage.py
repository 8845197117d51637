"""Where a model came from: git commit, dvc.lock hashes, params hash, the DVC experiment and Prefect flow run.

Tagged on the training run (train) and on every registered version (register).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import yaml

from tasks.plumbing.params import params_hash
from tasks.plumbing.paths import DVC_YAML, pipeline_outputs

DVC_LOCK = Path("dvc.lock")
FLOW_RUN_ENV = "GPT2_PIPELINE_PREFECT_FLOW_RUN_ID"  # set by the Prefect flow for the stages it runs
OVERRIDES_ENV = "GPT2_PIPELINE_OVERRIDES"  # JSON of the dotted-key overrides a run workspace applied
# Set by `gpt2-pipeline sweep` for a trial's stages: JSON of the study (name, storage), the trial (number, id) and the
# study's MLflow run, which the training run is a child of. Only lineage and pruning read it: a trial that completes
# writes what `dvc exp run` with its params writes.
SWEEP_TRIAL_ENV = "GPT2_PIPELINE_SWEEP_TRIAL"
# Set by `dvc exp run` (plain, --temp, --queue, --run-all) for the stages of an experiment.
DVC_EXPERIMENT_ENV = {"dvc_exp_name": "DVC_EXP_NAME", "dvc_exp_baseline_rev": "DVC_EXP_BASELINE_REV"}
# Outputs whose dvc.lock hashes identify a model's data: (stage, path, tag name).
LINEAGE_OUTS = (
    ("ingest", "data/prepared", "data_md5"),
    ("tokenize", "data/tokenized", "tokenized_md5"),
    ("train", "models/gpt2", "model_md5"),
)


def git_lineage() -> dict[str, str]:
    """The git commit and whether the code, params or inputs differ from it: tracked files changed, apart from what
    the pipeline itself writes (dvc.lock and the stages' outputs, whose hashes the lineage carries)."""
    written = pipeline_outputs() if DVC_YAML.is_file() else []
    outputs = [f":(exclude){path}" for path in (str(DVC_LOCK), *written)]  # relative to the project's folder
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *outputs],
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
    # The safe loader, in libyaml's C where PyYAML has it: dvc.lock grows with the pipeline, and the pure-Python
    # parser takes ~0.1 s of each registration.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    stages = (yaml.load(lock_path.read_text(), Loader=loader) or {}).get("stages", {})  # noqa: S506  # nosec B506
    tags = {}
    for stage, path, tag in LINEAGE_OUTS:
        for out in stages.get(stage, {}).get("outs", []):
            if out.get("path") == path and "md5" in out:
                tags[tag] = out["md5"]
    return tags


def run_context() -> dict[str, str]:
    """What started this stage: the DVC experiment and the Prefect flow run, where there is one."""
    tags = {tag: os.environ[name] for tag, name in DVC_EXPERIMENT_ENV.items() if os.environ.get(name)}
    if os.environ.get(FLOW_RUN_ENV):
        tags["prefect_flow_run_id"] = os.environ[FLOW_RUN_ENV]
    trial = sweep_trial()
    if trial:
        tags.update(
            {
                "mlflow.parentRunId": trial["parent_run_id"],
                "sweep_study": trial["study"],
                "sweep_trial": str(trial["number"]),
            }
        )
    return tags


def sweep_trial() -> dict | None:
    """The sweep trial this stage runs for (SWEEP_TRIAL_ENV), or None."""
    text = os.environ.get(SWEEP_TRIAL_ENV)
    return json.loads(text) if text else None


def run_tags() -> dict[str, str]:
    """The training run's tags: the code, the settings and what started it."""
    return {**git_lineage(), "params_hash": params_hash(), **run_context()}


def version_tags(run_id: str) -> dict[str, str]:
    """A registered version's tags: the run's, the data and model hashes, and the run id."""
    return {**run_tags(), **dvc_lineage(), "mlflow_run_id": run_id}


def overrides() -> str:
    return os.environ.get(OVERRIDES_ENV) or "{}"
