"""The lineage's dirty flag: whether code, params or inputs differ from the commit, not whether a run wrote its
outputs."""

from __future__ import annotations

import pytest

from tasks.tracking.lineage import git_lineage
from tests.helpers import copy_project


@pytest.fixture
def project(tmp_path, monkeypatch):
    folder = copy_project(tmp_path)
    monkeypatch.chdir(folder)
    return folder


def test_the_pipeline_outputs_a_run_rewrites_leave_the_tree_clean(project):
    """A fresh clone's `dvc repro` rewrites dvc.lock, the metrics, the plots and the samples: still clean."""
    assert git_lineage()["git_dirty"] == "false"
    for written in ("dvc.lock", "metrics/train.json", "metrics/eval.json", "plots/loss.svg", "reports/samples.json"):
        (project / written).write_text("rewritten by a run\n")
    assert git_lineage()["git_dirty"] == "false"
    for edited in ("params.yaml", "tasks/train.py", "data/samples/tang300.json"):
        original = (project / edited).read_bytes()
        (project / edited).write_bytes(original + b"\n")
        assert git_lineage()["git_dirty"] == "true", edited
        (project / edited).write_bytes(original)
