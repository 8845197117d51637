"""A DVC remote round trip: push the pipeline's outputs, clone fresh, pull, and nothing is left to rerun."""

from __future__ import annotations

import pytest

from tests.conftest import BIN, copy_project, run, tiny_params, write_params

pytestmark = pytest.mark.slow

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]


def test_pushed_outputs_pull_into_a_fresh_clone_that_is_up_to_date(tmp_path):
    project = copy_project(tmp_path)
    remote = tmp_path / "remote"
    write_params(project, tiny_params())
    run([str(BIN / "dvc"), "remote", "add", "--default", "store", str(remote)], project)
    run([str(BIN / "dvc"), "repro"], project)
    run([*GIT, "add", "-A"], project)
    run([*GIT, "commit", "-qm", "trained"], project)
    pushed = run([str(BIN / "dvc"), "push"], project).stdout
    assert "pushed" in pushed and any(remote.rglob("*")), pushed

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    assert not (clone / "models/gpt2").exists()
    run([str(BIN / "dvc"), "pull"], clone)
    assert (clone / "models/gpt2/model.safetensors").read_bytes() == (
        project / "models/gpt2/model.safetensors"
    ).read_bytes()
    assert (clone / "registered.json").read_text() == (project / "registered.json").read_text()

    status = run([str(BIN / "dvc"), "status"], clone).stdout
    assert "Data and pipelines are up to date." in status, status
    repro = run([str(BIN / "dvc"), "repro"], clone).stdout
    assert "Running stage" not in repro and "Data and pipelines are up to date." in repro, repro
