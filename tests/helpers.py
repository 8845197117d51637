"""What the tests share besides fixtures: the tiny params, running commands in a project, the MLflow store of
a project, the golden project's build and copies of it."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import yaml

from tasks.tracking.store import point_mlflow

# Tests and benchmarks run the same tools on the same copies.
from tools.project import BIN, copy_project, tool_env

ROOT = Path(__file__).resolve().parents[1]


# Small enough to train in seconds on two CPU cores, big enough to learn something. A validation split of 2% (147
# records, 179 blocks): the evaluations during training and the evaluate stage score each model on it, and at 10%
# they were a third of a training run.
TINY_OVERRIDES = {
    "data": {"validation_fraction": 0.02},
    "tokenizer": {"vocab_size": 512, "block_size": 64},
    "model": {"config": {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 64, "dropout": 0.0}},
    "train": {
        "max_steps": 150,
        "batch_size": 8,
        "learning_rate": 3.0e-3,
        "warmup_steps": 10,
        "logging_steps": 10,
        "eval_steps": 50,
    },
}


def merge(base: dict, overrides: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def default_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def tiny_params() -> dict:
    return merge(default_params(), TINY_OVERRIDES)


def write_params(folder: Path, params: dict) -> None:
    (folder / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False))


def run(args: list[str], cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env or tool_env(), capture_output=True, text=True, timeout=1200)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def cli_here(project: Path, *args: str) -> str:
    """`gpt2-pipeline args...` run in this process in project (the same command, without a new interpreter to
    import torch and transformers again); its output."""
    from typer.testing import CliRunner

    from flows.cli import app

    cwd = Path.cwd()
    os.chdir(project)
    try:
        result = CliRunner().invoke(app, list(args))
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output[-3000:]
    return result.stdout


def store_copy(empty_store: Path, database: Path) -> str:
    """A new MLflow store at database, copied from the session's empty one; its tracking URI."""
    shutil.copyfile(empty_store, database)
    return f"sqlite:///{database}"


def store_client(project: Path):
    """A client of the project's own MLflow store, for its runs and its registry alike: a client given only a
    tracking URI takes the registry from MLflow's process-wide setting, which another test may have set."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{project}/mlflow.db"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def mlflow_on(uri: str) -> Iterator[object]:
    """mlflow with its fluent API (load_model, download_artifacts) on uri for tracking and registry alike, both
    restored afterwards: they are process-wide, and another test (a stage run in-process) may have set them."""
    import mlflow

    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    try:
        yield point_mlflow(uri)
    finally:
        point_mlflow(*previous)


def stage_processes(root: int, stage: str) -> list:
    """The pythons running `-m tasks.<stage>` below the process root: not a shell around one, nor a child it
    forked (between fork and exec a git call or a worker has the same command line); processes that end while
    this looks are left out."""
    import psutil

    found = []
    for child in psutil.Process(root).children(recursive=True):
        try:
            if child.name().startswith("python") and f"tasks.{stage}" in " ".join(child.cmdline()):
                found.append((child, child.ppid()))
        except psutil.Error:
            continue
    pids = {child.pid for child, _ in found}
    return [child for child, parent in found if parent not in pids]


def untrained_perplexity(project: Path) -> float:
    """The validation perplexity of an untrained model shaped like the project's trained one: the starting point
    a trained model is measured against."""
    import datasets
    from transformers import GPT2Config, GPT2LMHeadModel

    from tasks.evaluate import score

    config = GPT2Config.from_pretrained(project / "models/gpt2")
    block = yaml.safe_load((project / "params.yaml").read_text())["tokenizer"]["block_size"]
    blocks = datasets.load_from_disk(str(project / "data/tokenized"))["validation"].with_format("torch")[:]
    return score(GPT2LMHeadModel(config), blocks, block, block, 16, "cpu").metrics()["perplexity"]


def commit(project: Path, message: str = "state") -> None:
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message, "--allow-empty"], project)


def build_golden(tmp_path_factory) -> Path:
    """Train the golden project once per test run (under pytest-xdist the workers share it: the first to get
    here trains it, the others wait for it); returns its folder."""
    from filelock import FileLock

    run_folder = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker has a folder of its own in the run's folder
        run_folder = run_folder.parent
    folder, done = run_folder / "golden", run_folder / "golden.trained"
    with FileLock(run_folder / "golden.lock"):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed attempt left
            folder.mkdir()
            project = copy_project(folder)
            write_params(project, tiny_params())
            # System metrics every second instead of every 10 (the training takes seconds): only how often.
            run([str(BIN / "dvc"), "repro"], project, env=tool_env(MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1"))
            commit(project, "trained")
            done.touch()
    return folder / "project"


class GoldenBuild(threading.Thread):
    """The golden project trained while the first tests (those that do not need it) run."""

    def __init__(self, tmp_path_factory):
        super().__init__(daemon=True)
        self.tmp_path_factory, self.project, self.error = tmp_path_factory, None, None

    def run(self):
        try:
            self.project = build_golden(self.tmp_path_factory)
        except BaseException as exc:  # handed to the golden fixture, which raises it in the tests that need it
            self.error = exc


def trained_copy(source: Path, parent: Path) -> Path:
    """A copy of a trained project under parent: its git history, outputs, DVC cache and MLflow store.

    MLflow records artifact locations as absolute paths (the store must not depend on the folder a stage runs
    in), so they are rewritten to the copy's; DVC's temporary folder (locks, queue) is not copied."""
    dest = parent / "project"
    shutil.copytree(source, dest, symlinks=True, ignore=lambda folder, _: {"tmp"} if folder.endswith(".dvc") else ())
    relocate_mlflow_store(dest / "mlflow.db", str(source), str(dest))
    return dest


def relocate_mlflow_store(database: Path, old: str, new: str) -> None:
    """Replace the folder old by new in every text column of a copied SQLite MLflow store."""
    with contextlib.closing(sqlite3.connect(database)) as db, db:
        tables = [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            columns = [c[1] for c in db.execute(f'PRAGMA table_info("{table}")') if "CHAR" in c[2] or "TEXT" in c[2]]
            for column in columns:  # table and column names come from the schema, the paths are parameters
                update = f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) WHERE instr("{column}", ?) > 0'  # noqa: S608
                db.execute(update, (old, new, old))


IDLE_PREFECT_SERVICES = (
    "CANCELLATION_CLEANUP", "CLEANUP_RECONCILER", "FOREMAN", "LATE_RUNS", "PAUSE_EXPIRATIONS", "REPOSSESSOR",
    "SCHEDULER", "TRIGGERS",
)  # fmt: skip


def greedy_alone(model, tokenizer, prompt: str, new: int) -> list[int]:
    """The tokens transformers' greedy generate writes after prompt alone (no padding), up to end-of-text."""
    import torch

    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new,
        do_sample=False,
        pad_token_id=tokenizer.eos_token_id,
    )[0, ids.shape[1] :].tolist()
    return out[: out.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in out else out
