"""Run workspaces: where a run with parameter overrides executes, so the committed params.yaml never changes.

A run with overrides (`gpt2-pipeline run --set train.max_steps=200`, or a deployment run's `overrides`)
executes in `.runs/<hash of the overrides>/`: a git checkout of the project's committed HEAD whose params.yaml
has the overrides applied, sharing the project's DVC cache and (by default) its MLflow store. The project's
own params.yaml, dvc.lock and outputs stay as they were, so a plain `dvc repro` still reproduces the committed
params. The same overrides reuse the same workspace: DVC skips the stages already done there and a retried or
rerun training resumes from its checkpoint. This plays the part of `dvc exp run --temp --set-param`, which
would delete its temporary copy, checkpoints included, when a run fails.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from tasks.plumbing.errors import PipelineError
from tasks.plumbing.outputs import atomic_output
from tasks.plumbing.params import PARAMS_FILE, apply_overrides, read_raw
from tasks.plumbing.paths import DVC_YAML, data_deps
from tasks.tracking import store
from tasks.tracking.lineage import OVERRIDES_ENV

RUNS_DIR = Path(".runs")
SCHEMA_COMMENT = "# yaml-language-server: $schema="


def overrides_key(overrides: dict[str, Any]) -> str:
    """A short name for one set of overrides, independent of key order."""
    canonical = json.dumps(overrides, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def prepare(project: Path, overrides: dict[str, Any]) -> Path:
    """The run workspace for these overrides, at the project's committed HEAD, params written; created once."""
    params = apply_overrides(read_raw(project / PARAMS_FILE), overrides)
    workspace = project / RUNS_DIR / overrides_key(overrides)
    project_text = (project / PARAMS_FILE).read_text(encoding="utf-8")
    new = not (workspace / ".git").exists()
    if new:
        workspace.mkdir(parents=True, exist_ok=True)
        _git(workspace, "init", "--quiet")
    # Reset tracked files to the project's commit; untracked outputs (data, models, checkpoints) stay.
    _git(workspace, "fetch", "--quiet", "--no-tags", str(project.resolve()), "HEAD")
    _git(workspace, "reset", "--quiet", "--hard", "FETCH_HEAD")
    _share_dvc_cache(project, workspace)
    _link_corpora(project, workspace)
    if new:
        _check_out_committed_outputs(workspace)
    for key in ("sources", "validation_sources"):
        params["data"][key] = [_source_for(workspace, project, source) for source in params["data"].get(key, [])]
    with atomic_output(workspace / PARAMS_FILE) as tmp:
        comment = schema_comment(project_text, project / PARAMS_FILE, workspace / PARAMS_FILE)
        tmp.write_text(comment + yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return workspace


def schema_comment(text: str, source: Path, destination: Path) -> str:
    """The schema comment opening params file `source` (its `text`), rewritten to name the same schema file from
    `destination`'s folder, with its newline; "" when there is none."""
    first = text.partition("\n")[0].rstrip("\r")
    if not first.startswith(SCHEMA_COMMENT):
        return ""
    schema = first.removeprefix(SCHEMA_COMMENT).strip()
    if "://" in schema or Path(schema).is_absolute():  # names the same file from any folder
        return first + "\n"
    target = os.path.join(source.parent.absolute(), schema)
    return SCHEMA_COMMENT + Path(os.path.relpath(target, destination.parent.absolute())).as_posix() + "\n"


def relocated(text: str, source: Path, destination: Path) -> str:
    """Params file `source` (its `text`) as written at `destination`: the same, its schema comment still naming the
    schema file (`params/x.yaml`'s `../docs/...` is `docs/...` from the project's params.yaml)."""
    comment = schema_comment(text, source, destination)
    return comment + text.partition("\n")[2] if comment else text


@contextmanager
def claimed(project: Path, overrides: dict[str, Any]) -> Iterator[Path]:
    """The run workspace for these overrides (prepared), held by this run until it ends.

    A second run with the same overrides fails at once with one line instead of resetting the workspace under the
    first: an exclusive lock on .runs/<hash>.lock, released by the system when the holder ends however it ends."""
    apply_overrides(read_raw(project / PARAMS_FILE), overrides)  # bad overrides fail before anything is made
    lock = project / RUNS_DIR / f"{overrides_key(overrides)}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise PipelineError(
                f"{lock.with_suffix('')}: another run with the same overrides is using this workspace (PID {holder}); "
                "wait for it to finish, or run with other overrides"
            ) from None
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        yield prepare(project, overrides)


def edits_only_here(params_file: Path, replacement: str) -> bool:
    """Whether params_file holds text found nowhere else, which writing `replacement` over it would lose: not the
    replacement itself, nor what the commit has, nor any params/ file as `run --params` writes it (a recipe put
    in place earlier is not an edit)."""
    current = params_file.read_text(encoding="utf-8")
    if current == replacement:
        return False
    folder = params_file.parent
    shown = subprocess.run(
        ["git", "show", f"HEAD:./{params_file.name}"],
        cwd=folder,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        check=False,
    )
    if shown.returncode == 0 and shown.stdout == current:
        return False
    recipes = sorted((folder / "params").glob("*.yaml"))
    return all(relocated(r.read_text(encoding="utf-8"), r, params_file) != current for r in recipes)


def uncommitted(project: Path) -> list[str]:
    """Tracked files changed since HEAD, which a run workspace does not see.

    Not params.yaml (prepare writes the workspace's from the project's own, overrides applied: `run --params FILE -S
    ...` uses FILE), nor dvc.lock and the metrics."""
    changed = _git(project, "status", "--porcelain", "--untracked-files=no").splitlines()
    paths = [line[3:] for line in changed]
    outputs = ("dvc.lock", str(PARAMS_FILE))
    return [path for path in paths if path not in outputs and not path.startswith(("metrics/", "plots/", "reports/"))]


def _source_for(workspace: Path, project: Path, source: str) -> str:
    """A relative source that only the project has (data kept out of git) is read from the project."""
    if source.startswith("hf:") or Path(source).is_absolute() or glob.glob(str(workspace / source), recursive=True):
        return source
    in_project = str(project.resolve() / source)
    return in_project if glob.glob(in_project, recursive=True) else source


def _link_corpora(project: Path, workspace: Path) -> None:
    """The project's corpora kept out of git, in the workspace's ingest dep folders as the project has them now.

    Hard links (symbolic ones across devices): no copy of a large corpus, and the workspace's DVC sees a corpus
    change as the project's does. Files git tracks come from the commit, as all tracked files do."""
    tracked = set(_git(workspace, "ls-files", "-z").split("\0"))
    for dep in data_deps("ingest", project / DVC_YAML):
        if Path(dep).is_absolute() or not (project / dep).is_dir():  # read where it is, or tracked as a file
            continue
        theirs, ours = (
            _untracked_files(project / dep, project, tracked),
            _untracked_files(workspace / dep, workspace, tracked),
        )
        for stale in ours - theirs:
            (workspace / stale).unlink()
        for name in theirs:
            source, target = project / name, workspace / name
            if target.exists() and os.path.samefile(source, target):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.unlink(missing_ok=True)
            try:
                os.link(source, target)
            except OSError:
                target.symlink_to(source.resolve())


def _untracked_files(folder: Path, root: Path, tracked: set[str]) -> set[str]:
    files = (path.relative_to(root).as_posix() for path in folder.rglob("*") if path.is_file() or path.is_symlink())
    return {name for name in files if name not in tracked}


def _share_dvc_cache(project: Path, workspace: Path) -> None:
    """Point the workspace's DVC at the project's cache, so data and models are stored once."""
    config = workspace / ".dvc" / "config.local"
    cache = (project / ".dvc" / "cache").resolve()
    config.write_text(f"[cache]\n    dir = {cache}\n", encoding="utf-8")


def _check_out_committed_outputs(workspace: Path) -> None:
    """Give a new workspace the outputs its dvc.lock names, from the shared cache.

    Give a new workspace the outputs its dvc.lock names, from the shared cache, so that DVC skips the stages the
    overrides leave unchanged (ingest and tokenize for a training override) instead of running them again: the
    stages' outputs are `persist`, which keeps DVC from restoring them from its run cache. An output the cache lacks
    is left out (`--allow-missing`); DVC then runs its stage."""
    command = [sys.executable, "-m", "dvc", "checkout", "--quiet", "--allow-missing"]
    subprocess.run(command, cwd=workspace, capture_output=True, check=False)


def environment(project: Path, overrides: dict[str, Any]) -> dict[str, str]:
    """Environment additions for stages run in a workspace: the overrides for MLflow, the project's store."""
    env = {OVERRIDES_ENV: json.dumps(overrides, sort_keys=True, ensure_ascii=False, default=str)}
    if not os.environ.get("MLFLOW_TRACKING_URI"):  # the workspace is a repository of its own: name the project's
        env["MLFLOW_TRACKING_URI"] = store.default_uri(project)
    return env


def _git(cwd: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise PipelineError(
            f"{cwd}: git {args[0]} failed ({detail}); runs with overrides need the project in git with a commit"
        )
    return result.stdout
