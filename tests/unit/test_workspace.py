"""Run workspaces for overrides, and the train task's retry policy."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from prefect.states import Failed

from flows import workspace
from flows.cli import use_params
from flows.pipeline import TRAIN_RETRY_DELAYS, StageFailed, run_train_stage, worth_retrying
from tasks.plumbing.errors import BAD_INPUT_EXIT, PipelineError
from tests.helpers import copy_project, run


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return copy_project(tmp_path_factory.mktemp("workspace"))


def test_overrides_go_to_a_workspace_and_leave_the_project_params_alone(project):
    committed = (project / "params.yaml").read_bytes()
    (project / "extra").mkdir(exist_ok=True)
    (project / "extra/mine.txt").write_text("data kept out of git\n")
    overrides = {"train.max_steps": 7, "data.sources": ["extra/mine.txt", "data/samples/tang300.json"]}

    folder = workspace.prepare(project, overrides)

    assert folder == project / ".runs" / workspace.overrides_key(overrides)
    assert (project / "params.yaml").read_bytes() == committed
    params = yaml.safe_load((folder / "params.yaml").read_text())
    assert params["train"]["max_steps"] == 7
    # Untracked data is read from the project; tracked data from the workspace's own checkout.
    assert params["data"]["sources"] == [str(project / "extra/mine.txt"), "data/samples/tang300.json"]
    assert run(["git", "status", "--porcelain"], folder).stdout.split() == ["M", "params.yaml"]
    assert f"dir = {project / '.dvc/cache'}" in (folder / ".dvc/config.local").read_text()
    assert workspace.prepare(project, dict(reversed(overrides.items()))) == folder  # key order does not matter


def test_a_workspace_reads_the_project_corpora_as_they_are_now(project):
    """Corpora kept out of git under ingest's dep folders appear in the workspace's own (hard links), so its
    `dvc repro` sees them change: edited in place, replaced, added or removed in the project."""
    corpora = project / "data/corpora"
    (corpora / "web").mkdir(parents=True, exist_ok=True)
    (corpora / "web/a.jsonl").write_text('{"text": "first"}\n')
    (corpora / "old.txt").write_text("removed later\n")
    folder = workspace.prepare(project, {"train.seed": 11})
    mirrored = folder / "data/corpora"
    assert (mirrored / "web/a.jsonl").stat().st_ino == (corpora / "web/a.jsonl").stat().st_ino
    assert (mirrored / "README.md").stat().st_ino != (corpora / "README.md").stat().st_ino  # tracked: from git
    with (corpora / "web/a.jsonl").open("a") as handle:
        handle.write('{"text": "appended in place"}\n')
    assert "appended in place" in (mirrored / "web/a.jsonl").read_text()
    (corpora / "old.txt").unlink()
    (corpora / "web/b.jsonl").write_text('{"text": "new"}\n')
    (corpora / "web/a.jsonl").unlink()
    (corpora / "web/a.jsonl").write_text('{"text": "replaced"}\n')
    workspace.prepare(project, {"train.seed": 11})
    assert sorted(p.relative_to(mirrored).as_posix() for p in mirrored.rglob("*") if p.is_file()) == [
        "README.md", "web/a.jsonl", "web/b.jsonl"
    ]  # fmt: skip
    assert (mirrored / "web/a.jsonl").read_text() == '{"text": "replaced"}\n'
    assert run(["git", "status", "--porcelain", "--untracked-files=no"], folder).stdout.split() == ["M", "params.yaml"]


def test_a_workspace_follows_the_project_to_its_new_commit(project):
    folder = workspace.prepare(project, {"train.seed": 5})
    (project / "NOTES.md").write_text("new\n")
    run(["git", "add", "NOTES.md"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "notes"], project)
    (project / "README.md").write_text("changed, not committed\n")
    (project / "params.yaml").write_text((project / "params.yaml").read_text() + "\n")  # `run --params FILE`
    assert workspace.uncommitted(project) == ["README.md"]  # the workspace takes the project's params.yaml
    assert workspace.prepare(project, {"train.seed": 5}) == folder
    assert (folder / "NOTES.md").read_text() == "new\n"
    assert (folder / "README.md").read_text() != "changed, not committed\n"


def test_params_written_elsewhere_keep_a_schema_comment_that_names_the_schema(tmp_path, monkeypatch):
    """`run --params params/x.yaml` writes params.yaml a folder up, and a run workspace two folders down: editors
    follow each file's schema comment from its own folder, so it must still name docs/reference/params.schema.json."""
    project = copy_project(tmp_path)
    schema = project / "docs/reference/params.schema.json"

    def named_schema(path: Path) -> Path:
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith(workspace.SCHEMA_COMMENT), path
        return (path.parent / first.removeprefix(workspace.SCHEMA_COMMENT)).resolve()

    source = project / "params/tang-poetry.yaml"
    assert named_schema(source) == schema
    monkeypatch.chdir(project)
    use_params(Path("params/tang-poetry.yaml"))
    assert named_schema(project / "params.yaml") == schema
    assert (project / "params.yaml").read_text().partition("\n")[2] == source.read_text().partition("\n")[2]
    assert named_schema(workspace.prepare(project, {"train.seed": 3}) / "params.yaml") == schema


def test_run_params_never_replaces_edits_kept_nowhere_else(tmp_path, monkeypatch):
    """`run --params FILE` over a params.yaml with uncommitted edits would lose them: refused, params.yaml kept.
    Committed, or a recipe that --params put there earlier, it is replaced."""
    project = copy_project(tmp_path)
    monkeypatch.chdir(project)
    edited = (project / "params.yaml").read_text().replace("max_steps: 800 ", "max_steps: 1234")
    assert "max_steps: 1234" in edited
    (project / "params.yaml").write_text(edited)
    with pytest.raises(PipelineError, match=r"^params\.yaml: holds edits that are neither committed nor in params/"):
        use_params(Path("params/tang-poetry.yaml"))
    assert (project / "params.yaml").read_text() == edited
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "my recipe"], project)
    use_params(Path("params/tang-poetry.yaml"))  # committed: nothing is lost
    use_params(Path("params/tang-poetry-uer.yaml"))  # params.yaml holds a recipe that is still in params/
    assert "uer" in (project / "params.yaml").read_text()


def test_bad_overrides_fail_before_any_workspace_exists(tmp_path):
    project = copy_project(tmp_path)
    for start in (workspace.prepare, lambda *args: workspace.claimed(*args).__enter__()):
        with pytest.raises(PipelineError, match=r"^override train\.max_step: unknown key"):
            start(project, {"train.max_step": 7})
    assert not (project / ".runs").exists()


def test_train_retries_faults_with_backoff_but_not_bad_input():
    assert run_train_stage.retries == 2 and TRAIN_RETRY_DELAYS == [30, 60]
    crash = Failed(data=StageFailed("train", 1, "killed"))
    bad_params = Failed(data=StageFailed("train", BAD_INPUT_EXIT, "error: params.yaml: ..."))
    assert worth_retrying(None, None, crash) is True
    assert worth_retrying(None, None, bad_params) is False
