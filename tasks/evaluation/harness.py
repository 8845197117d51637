"""Benchmark tasks (hellaswag, lambada_openai, xcopa_zh, ...) scored by EleutherAI's lm-evaluation-harness.

The harness's own task definitions score the model: its prompts, its metrics and their standard errors. Only
where the data comes from changes: each task's dataset is replaced by its split files in a local folder
(<split>.jsonl in the hub dataset's own fields, under data/tasks), because the runs never reach a dataset hub and
dvc repro must see the data change. The harness is an optional extra (pip install 'gpt2-pipeline[eval]'),
imported only when evaluate.tasks names a task.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tasks.plumbing.errors import PipelineError
from tasks.plumbing.params import BenchmarkTask

# The splits a harness task may name; a task is scored on its test split, else its validation split.
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
LOCAL_PREFIX = "gpt2_pipeline_"  # the local copy's name, apart from the stock task it includes
# Resamples for the standard errors the harness bootstraps (perplexity's); its default, 100,000, takes minutes.
BOOTSTRAP_ITERS = 1000
INSTALL = "pip install 'gpt2-pipeline[eval]'"
NO_POOL = "DISABLE_MULTIPROC"  # read by the harness where it bootstraps a standard error


@dataclass
class Scores:
    """A model's task metrics, flat as `<task>/<metric>` (metrics/eval.json, MLflow, the card and the gate)."""

    metrics: dict[str, float] = field(default_factory=dict)
    higher_is_better: dict[str, bool] = field(default_factory=dict)  # by the same names, for the gate's rules


def _harness():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise PipelineError(f"evaluate.tasks needs lm-evaluation-harness ({error}): {INSTALL}") from None
    return lm_eval, HFLM, TaskManager


def local_config(task: BenchmarkTask, entry: Any, root: Path = Path()) -> dict[str, Any]:
    """The harness config that is the stock task with its dataset read from the task's folder.

    entry: the stock task's entry in the harness's index (its YAML and its resolved config)."""
    if entry is None:
        raise PipelineError(f"evaluate.tasks: {task.name!r} is not an lm-evaluation-harness task; `lm-eval ls tasks`")
    if entry.kind.name != "TASK" or entry.yaml_path is None:
        raise PipelineError(
            f"evaluate.tasks: {task.name} is a {entry.kind.name.lower()} of harness tasks, not one; list its tasks"
        )
    splits = {key: entry.cfg.get(key) for key in SPLIT_KEYS if entry.cfg.get(key)}
    scored = splits.get("test_split") or splits.get("validation_split")
    folder = root / task.folder
    files = {split: folder / f"{split}.jsonl" for split in splits.values()}
    if scored is None or not files[scored].is_file():
        looked = files[scored] if scored else folder
        raise PipelineError(
            f"evaluate.tasks {task.name}: {looked} not found; fetch the task's data once on a connected machine "
            f"with `python -m tools.task_data {task.name}` (docs/evaluation.md)"
        )
    present = {split: str(path.resolve()) for split, path in files.items() if path.is_file()}
    return {
        "include": str(entry.yaml_path),
        "task": LOCAL_PREFIX + task.name,
        "tag": [],  # the stock task's tags would make a second task of the same name
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": present},
        "num_fewshot": task.num_fewshot,
        **{key: split if split in present else None for key, split in splits.items()},
    }


def scores(name: str, local: str, result: dict[str, Any]) -> Scores:
    """A harness result as flat figures: each metric (`acc`, `acc_norm`, `perplexity`...), its `_stderr` where
    the harness gives one, and `examples` (those scored) under the task's name."""
    found = Scores()
    for key, value in result["results"][local].items():
        metric, _, filtered = key.partition(",")  # "acc,none": the metric, and the harness filter it went through
        if not filtered or isinstance(value, str) or value is None:  # alias, name; "N/A" for a missing stderr
            continue
        label = metric if filtered == "none" else f"{metric}_{filtered}"
        found.metrics[f"{name}/{label}"] = float(value)
    found.metrics[f"{name}/examples"] = int(result["n-samples"][local]["effective"])
    for metric, higher in result["higher_is_better"][local].items():
        found.higher_is_better[f"{name}/{metric}"] = bool(higher)
    return found


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The harness's info, warnings (one a task built, one for a model passed as an object) and progress bars off.

    Its bars (documents, tokenizing, requests) have no switch the caller reaches; in a stage's log every redraw
    is one more line. tqdm is one class for all its modules (the harness passes disable=False itself), so its
    constructor is wrapped here and put back. Its prints go to stderr: a command's stdout is its answer (promote's
    decision). And its bootstrapped standard errors (perplexity's) are computed in this process: in a pool, forked
    from a process with threads (Prefect's), a worker can start holding a lock no thread will release, and hang.
    The draws are seeded the same either way."""
    import datasets
    import tqdm

    logger = logging.getLogger("lm_eval")
    level, init = logger.level, tqdm.tqdm.__init__
    logger.setLevel(logging.ERROR)

    def silent(self, *args, **kwargs):
        init(self, *args, **{**kwargs, "disable": True})

    tqdm.tqdm.__init__ = silent
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    pool = os.environ.get(NO_POOL)
    os.environ[NO_POOL] = "1"
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        logger.setLevel(level)
        tqdm.tqdm.__init__ = init
        if pool is None:
            os.environ.pop(NO_POOL, None)
        if bars:
            datasets.enable_progress_bars()


def evaluate(model, tokenizer, tasks: list[BenchmarkTask], batch_size: int, root: Path = Path()) -> Scores:
    """Score the loaded model on each task; each task's limit and few-shot count are its own."""
    if not tasks:
        return Scores()
    lm_eval, HFLM, TaskManager = _harness()
    import datasets

    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False  # local files: no download counter on the hub to ping
    found = Scores()
    with _quiet(), tempfile.TemporaryDirectory(prefix="gpt2-pipeline-tasks-") as folder:
        manager = TaskManager()
        configs = {task.name: local_config(task, manager.task_index.get(task.name), root) for task in tasks}
        lm = HFLM(pretrained=model.eval(), tokenizer=tokenizer, batch_size=batch_size,
                  max_length=model.config.n_positions)  # fmt: skip
        for task in tasks:
            path = Path(folder) / f"{task.name}.yaml"
            path.write_text(yaml.safe_dump(configs[task.name], sort_keys=False, allow_unicode=True))
            try:
                result = lm_eval.simple_evaluate(
                    model=lm, tasks=[str(path)], limit=task.limit, bootstrap_iters=BOOTSTRAP_ITERS,
                    log_samples=False, task_manager=manager,
                )  # fmt: skip
            except (KeyError, ValueError, TypeError) as error:  # a record without the fields the task's prompts read
                raise PipelineError(
                    f"evaluate.tasks {task.name}: {task.folder} could not be scored ({type(error).__name__}: {error}); "
                    "its records must hold the hub dataset's fields (python -m tools.task_data writes them)"
                ) from None
            part = scores(task.name, LOCAL_PREFIX + task.name, result)
            found.metrics.update(part.metrics)
            found.higher_is_better.update(part.higher_is_better)
    return found
