"""Where the stages read and write: each output path named once (dvc.yaml lists the same paths).

Stages import their inputs' paths from here, never from each other, so an edit to one stage's code reruns only
that stage (and what its changed outputs feed).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import yaml

DVC_YAML = Path("dvc.yaml")
# ingest
CORPORA_DIR = Path("data/corpora")  # where a user's corpora go: one of ingest's deps in dvc.yaml
PREPARED_DIR = Path("data/prepared")
SPLITS = ("train", "validation")
INGEST_STATS = PREPARED_DIR / "stats.json"


NUMBERS = re.compile(r"(\d+)")


def in_number_order(paths: Iterable[Path]) -> list[Path]:
    """Paths sorted by the numbers in their names: shard 100000 after 99999, where string order puts it first."""
    return sorted(paths, key=lambda path: [int(part) if part.isdigit() else part for part in NUMBERS.split(path.name)])


def data_deps(stage: str, dvc_yaml: Path = DVC_YAML) -> list[str]:
    """The data a stage depends on in dvc.yaml: its deps that are not code."""
    spec = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))
    return [dep for dep in spec["stages"][stage].get("deps", []) if not str(dep).endswith(".py")]


def pipeline_outputs(dvc_yaml: Path = DVC_YAML) -> list[str]:
    """Every path a stage writes (outs, metrics, plots in dvc.yaml): what `dvc repro` changes, not the user."""
    spec = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))
    entries = [
        entry
        for stage in spec["stages"].values()
        for kind in ("outs", "metrics", "plots")
        for entry in stage.get(kind, [])
    ]
    return [str(next(iter(entry))) if isinstance(entry, dict) else str(entry) for entry in entries]


def prepared_shards(split: str, prepared: Path = PREPARED_DIR) -> list[Path]:
    """A split's shards as ingest wrote them (<prepared>/<split>/NNNNN.jsonl), in order."""
    return in_number_order((prepared / split).glob("*.jsonl"))


# tokenize
TOKENIZER_DIR = Path("models/tokenizer")
TOKENIZED_DIR = Path("data/tokenized")
# The figures of ingest and tokenize, carried with the blocks so that the training run can log them.
DATA_STATS = TOKENIZED_DIR / "stats.json"
SOURCES_FIGURE = "ingest/sources"  # in DATA_STATS: the files (or hf: names) ingest read, a list
FRAMING_FIGURE = "tokenize/framing"  # in DATA_STATS: the framing tokenize used (tasks/data/framing.py)
# train
MODEL_DIR = Path("models/gpt2")
RUN_RECORD = "mlflow_run.json"  # in MODEL_DIR (and a checkpoint folder): the model's MLflow run
TRAIN_METRICS = Path("metrics/train.json")
PLOTS_DIR = Path("plots")  # the train stage's: train_loss.csv, eval_loss.csv (dvc.yaml's plot) and loss.svg (an image)
BENCHMARKS_PLOT = PLOTS_DIR / "benchmarks.csv"  # evaluate's: the tasks' scores, dvc.yaml's plot `benchmarks`
CHECKPOINT_DIR = Path("checkpoints/train")
# evaluate
EVAL_METRICS = Path("metrics/eval.json")
# evaluate.tasks' data: one folder a task, its split files (<split>.jsonl) in the dataset's own fields; a
# dependency of the evaluate stage in dvc.yaml. samples/ holds tiny ones in each task's format, to try the path.
TASK_DATA_DIR = Path("data/tasks")
SAMPLES_FILE = Path("reports/samples.json")
# register
REGISTERED_FILE = Path("registered.json")
SWEEP_DB = Path("sweeps.db")  # gpt2-pipeline sweep's studies (SQLite) unless sweep.storage names a database
# A registered version's files (MLflow's transformers layout, tasks/tracking/flavor.py): the model, then its tokenizer
MLFLOW_MODEL_SUBDIR = "model"
MLFLOW_TOKENIZER_SUBDIR = "components/tokenizer"
