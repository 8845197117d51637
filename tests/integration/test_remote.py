"""A DVC remote round trip: push the pipeline's outputs, clone fresh, pull, and nothing is left to rerun."""

from __future__ import annotations

import pytest

from tests.helpers import BIN, run

pytestmark = pytest.mark.slow

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]


def test_pushed_outputs_pull_into_a_fresh_clone_that_is_up_to_date(trained_project, prefect_env, tmp_path):
    project = trained_project
    remote = tmp_path / "remote"
    run([str(BIN / "dvc"), "remote", "add", "--default", "store", str(remote)], project)
    # The flow's `remote`: pull what the remote has (nothing yet), run the stages (up to date), push the outputs.
    result = run([str(BIN / "gpt2-pipeline"), "run", "--remote", "store"], project, env=prefect_env)
    assert "files pushed" in result.stderr, result.stderr[-2000:]
    assert any(remote.rglob("*"))
    run([*GIT, "add", "-A"], project)
    run([*GIT, "commit", "-qm", "trained"], project)

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
