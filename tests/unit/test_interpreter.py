"""One interpreter, whatever starts the stages: `.venv/bin/dvc repro` without the venv on PATH runs them under
the project's .venv, and an interpreter without the project's packages and no .venv stops with one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import copy_project, tool_env

SYSTEM_PATH = "/usr/bin:/bin"
SYSTEM_PYTHON = Path("/usr/bin/python3")  # what `python3` is with the venv off PATH


@pytest.fixture
def bare_path_env() -> dict[str, str]:
    if not SYSTEM_PYTHON.exists():
        pytest.skip("no /usr/bin/python3 on this machine")
    probe = subprocess.run([str(SYSTEM_PYTHON), "-c", "import torch"], capture_output=True, check=False)
    assert probe.returncode != 0, "the system python has torch: this test needs one without the project's packages"
    return {**tool_env(), "PATH": SYSTEM_PATH}


def test_venv_dvc_without_the_venv_on_path_runs_the_stage_in_the_venv(tmp_path, bare_path_env):
    project = copy_project(tmp_path)
    (project / ".venv").symlink_to(Path(sys.prefix))  # the project's venv, as `make install` makes it
    result = subprocess.run(
        [str(project / ".venv/bin/dvc"), "repro", "ingest"],
        cwd=project, env=bare_path_env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "> python3 -m tasks.ingest" in result.stdout and "ingest: " in result.stdout
    assert (project / "data/prepared/train/00000.jsonl").stat().st_size > 0


def test_another_interpreter_without_a_venv_stops_with_one_line(tmp_path, bare_path_env):
    project = copy_project(tmp_path)
    result = subprocess.run(
        [str(SYSTEM_PYTHON), "-m", "tasks.ingest"],
        cwd=project, env=bare_path_env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: {SYSTEM_PYTHON} (Python 3.")
    assert "lacks the project's packages (torch" in line and "run `make install`, then `.venv/bin/dvc repro`" in line
    assert not (project / "data/prepared").exists()
