"""The project as the tests and the benchmarks use it.

Its folder, its interpreter's tools, and a copy of it as a newcomer's clone has it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the project's interpreter's folder: dvc, prefect, mlflow, gpt2-pipeline
PLOTS_TEMPLATE = ROOT / ".dvc/plots/offline.html"  # make install's page for `dvc plots` (tools/plots_template.py)


def tool_env(**extra: str) -> dict[str, str]:
    """The environment the project's tools run in.

    This interpreter's tools first on PATH (dvc runs `python -m tasks.<stage>` through it) and the local MLflow
    store and ephemeral Prefect server, whatever the caller's shell points at; then `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


def copy_project(parent: Path) -> Path:
    """A copy of the project as a newcomer's clone has it.

    The project's tracked and new files in a fresh git repository under parent, as a newcomer's clone has them
    (without dvc.lock: nothing has run there yet)."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    dest = parent / "project"
    for name in files:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    (dest / "dvc.lock").unlink(missing_ok=True)
    if PLOTS_TEMPLATE.is_file():  # what make install wrote, as a clone has it after make install
        (dest / PLOTS_TEMPLATE.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PLOTS_TEMPLATE, dest / PLOTS_TEMPLATE.relative_to(ROOT))
    for args in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"],
    ):
        subprocess.run(args, cwd=dest, check=True)
    return dest
