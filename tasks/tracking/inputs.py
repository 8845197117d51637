"""The data a model was trained and judged on, as MLflow dataset inputs of its run.

MLflow's Datasets panel and `mlflow.search_runs` then show what a version saw. Each input carries four things:
its name; its source (the data.sources path or `hf:` name, or a task's folder); the DVC content hash as its
digest (dvc.lock's, so `dvc checkout` at that hash gives the same bytes; a content hash of the files where DVC
has none); and its size as the profile (records, tokens, bytes). Its context (training, validation, evaluation)
and split are tags of the input.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import yaml

from tasks.plumbing.paths import SOURCES_FIGURE, TOKENIZED_DIR
from tasks.tracking import store
from tasks.tracking.lineage import DVC_LOCK

HUB_PREFIX = "hf:"
DIGEST_LENGTH = 32  # MLflow keeps a dataset digest of at most 36 characters
RACE_ATTEMPTS = 4  # log_inputs tries when another run creates the same dataset at the same moment


def _source(path: str):
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

    if path.startswith(HUB_PREFIX):
        name, _, config = path.removeprefix(HUB_PREFIX).partition(":")
        return HuggingFaceDatasetSource(path=name, config_name=config or None)
    # By its type: resolving a bare path finds two (file: and no scheme), and MLflow warns that it picked one.
    return get_dataset_source_from_json(json.dumps({"uri": str(Path(path).resolve())}), "local")


def dataset(name: str, sources: list[str], digest: str, profile: dict[str, Any]):
    """A dataset that only describes the data (MLflow's MetaDataset), with its size as the profile."""
    from mlflow.data.meta_dataset import MetaDataset

    class Described(MetaDataset):
        @property
        def profile(self) -> dict[str, Any]:
            return profile

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(profile)}

    described = Described(_source(sources[0]), name=name, digest=digest[:DIGEST_LENGTH])
    return described


def dvc_digest(path: str, lock_path: Path = DVC_LOCK) -> str | None:
    """The md5 dvc.lock records for an output path (data/tokenized), or that path's own .dvc file's; None if neither."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    tracked = Path(f"{path}.dvc")
    for file, key in ((lock_path, "stages"), (tracked, "outs")):
        if not file.is_file():
            continue
        document = yaml.load(file.read_text(), Loader=loader) or {}  # noqa: S506  # nosec B506
        outs = [out for stage in document.get("stages", {}).values() for out in stage.get("outs", [])]
        for out in outs if key == "stages" else document.get("outs", []):
            if out.get("path") in (path, Path(path).name) and "md5" in out:
                return str(out["md5"]).removesuffix(".dir")
    return None


def files_digest(files: list[Path]) -> str:
    """A content hash of files, in name order, for data DVC has no hash of (the task samples git tracks)."""
    digest = hashlib.md5(usedforsecurity=False)
    for file in sorted(files):
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def label(sources: list[str]) -> str:
    """A dataset's name from its sources: the first one's file name (or hub name), and how many more there are."""
    first = sources[0] if sources[0].startswith(HUB_PREFIX) else Path(sources[0]).stem
    return first + (f" (+{len(sources) - 1})" if len(sources) > 1 else "")


def split_inputs(figures: dict[str, Any], contexts: dict[str, str]) -> list[tuple[Any, str, str]]:
    """The tokenized splits as inputs, {split: context}: their sources, data/tokenized's hash, their sizes.

    figures: data/tokenized/stats.json, which tokenize writes beside the blocks (ingest's and its own counts)."""
    sources = [str(source) for source in figures.get(SOURCES_FIGURE) or ["unknown"]]
    digest = (
        dvc_digest(str(TOKENIZED_DIR))
        or hashlib.md5(json.dumps(figures, sort_keys=True).encode(), usedforsecurity=False).hexdigest()
    )  # a folder tokenized outside dvc repro: the figures stand for it
    found = []
    for split, context in contexts.items():
        profile = {
            unit: figures.get(f"{stage}/{split}_{unit}")
            for stage, unit in (("ingest", "records"), ("ingest", "bytes"), ("tokenize", "tokens"))
        }
        found.append((dataset(f"{label(sources)}/{split}", sources, digest, profile), context, split))
    return found


def task_input(name: str, folder: Path, examples: int, num_fewshot: int) -> tuple[Any, str, str]:
    """A benchmark task's data as an evaluation input: its folder, its DVC hash (or its files'), the examples scored."""
    files = sorted(folder.glob("*.jsonl"))
    digest = dvc_digest(str(folder)) or files_digest(files)
    profile = {"examples": examples, "num_fewshot": num_fewshot, "files": [file.name for file in files]}
    return dataset(name, [str(folder)], digest, profile), "evaluation", ",".join(file.stem for file in files)


def log(run_id: str, inputs: list[tuple[Any, str, str]]) -> None:
    """Log (dataset, context, split) inputs to a run: one call, so a run gets all of them or none."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.exceptions import MlflowException
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    entries = [
        DatasetInput(
            described._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, context), InputTag("split", split)]
        )
        for described, context, split in inputs
    ]
    for attempt in range(RACE_ATTEMPTS):
        try:
            return store.client().log_inputs(run_id, datasets=entries)
        except MlflowException as exc:
            # Two runs logging the same dataset at once (two workspaces, one server) race on the store's unique
            # (experiment, name, digest): the loser's transaction is rolled back, and again it finds the dataset.
            raced = "UNIQUE constraint" in str(exc) or "duplicate key" in str(exc)  # SQLite's, PostgreSQL's words
            if not raced or attempt == RACE_ATTEMPTS - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def named(run_id: str) -> str:
    """A run's dataset inputs as one line: "tinyshakespeare/train (training) d1c2..., ..." (a version's tag)."""
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    found = []
    for entry in store.client().get_run(run_id).inputs.dataset_inputs:
        context = next((tag.value for tag in entry.tags if tag.key == MLFLOW_DATASET_CONTEXT), "")
        found.append(f"{entry.dataset.name} ({context}) {entry.dataset.digest}")
    return ", ".join(sorted(set(found)))
