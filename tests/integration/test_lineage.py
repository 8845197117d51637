"""Lineage across processes: one MLflow run per trained model, found from the model's DVC-tracked record, in
every workflow (dvc repro, a DVC experiment in a temporary copy; a re-evaluation through the flow is in
test_pipeline.py), no run left RUNNING, and dvc.yaml's code deps rerunning exactly the stages an edit can change."""

from __future__ import annotations

import json

import pytest

from tests.helpers import BIN, merge, run, store_client, tiny_params, write_params

pytestmark = pytest.mark.slow


def all_runs(project) -> list:
    mlflow_client = store_client(project)
    return mlflow_client.search_runs([e.experiment_id for e in mlflow_client.search_experiments()])


def registered(project) -> dict:
    return json.loads((project / "registered.json").read_text())


def dvc(project, *args: str, check: bool = True):
    return run([str(BIN / "dvc"), *args], project, check=check)


def stages_ran(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


def changed_stages(project) -> set[str]:
    """Stages whose code or data deps differ from dvc.lock (dvc status)."""
    status = json.loads(dvc(project, "status", "--json").stdout or "{}")
    return {
        stage for stage, changes in status.items() if any("changed deps" in c for c in changes if isinstance(c, dict))
    }


@pytest.fixture
def project(trained_project):
    """A trained project of the test's own (params and dvc.lock committed): each test changes it."""
    return trained_project


def test_a_failed_stage_closes_its_run_as_failed(project):
    write_params(project, merge(tiny_params(), {"evaluate": {"prompts": ["ROMEO: " * 64]}}))
    result = dvc(project, "repro", check=False)
    assert result.returncode != 0 and "fills the model's 64 positions" in result.stderr
    model_run = registered(project)["run_id"]
    assert store_client(project).get_run(model_run).info.status == "FAILED"
    assert "RUNNING" not in {r.info.status for r in all_runs(project)}
    write_params(project, tiny_params())
    dvc(project, "repro", "--force", "--single-item", "evaluate")  # the model's run reopens, then finishes
    assert store_client(project).get_run(model_run).info.status == "FINISHED"


def test_a_corpus_change_reruns_ingest_and_a_speed_setting_reruns_nothing(project):
    """A file added under data/corpora (a corpus outside data/samples) changes ingest's deps; data.workers,
    executor and ray_address change only how fast the shards are made, so no stage is out of date."""
    params = tiny_params()
    write_params(project, merge(params, {"data": {"workers": 1, "executor": "local", "ray_address": "host:1"}}))
    assert json.loads(dvc(project, "status", "--json").stdout or "{}") == {}
    write_params(project, params)
    (project / "data/corpora/new.txt").write_text("a new corpus\n")
    assert changed_stages(project) == {"ingest"}


def test_an_edit_to_the_registry_helpers_reruns_only_register(project):
    before = registered(project)
    with (project / "tasks/tracking/registry.py").open("a") as handle:
        handle.write("\n# an edit\n")
    assert changed_stages(project) == {"register"}
    output = dvc(project, "repro").stdout
    assert stages_ran(output) == ["register"]
    assert registered(project)["run_id"] == before["run_id"]
    assert int(registered(project)["version"]) == int(before["version"]) + 1


def test_an_edit_to_text_normalization_reruns_ingest_and_everything_after_it(project):
    before = registered(project)
    ingest = project / "tasks/ingest.py"
    source = ingest.read_text()
    assert "line.rstrip() for line in" in source
    ingest.write_text(source.replace("line.rstrip() for line in", "line.rstrip().lower() for line in"))
    assert changed_stages(project) == {"ingest"}
    output = dvc(project, "repro").stdout
    assert stages_ran(output) == ["ingest", "tokenize", "train", "evaluate", "register"]
    first = json.loads((project / "data/prepared/train/00000.jsonl").open().readline())["text"]
    assert first == first.lower()
    after = registered(project)
    assert after["run_id"] != before["run_id"]  # a new model, a new run
    assert json.loads((project / "models/gpt2/mlflow_run.json").read_text())["run_id"] == after["run_id"]
    assert {r.info.status for r in all_runs(project)} <= {"FINISHED", "FAILED"}


def test_an_experiment_in_a_temporary_copy_reaches_the_project_registry(project):
    """`dvc exp run --temp` (as `--queue` and `--run-all` do) runs in a temporary copy under .dvc/tmp; its model
    still reaches the project's registry, tagged with the experiment, and its run is closed."""
    # train.loss_kernel: a key the pipeline reads at its default, which -S sets without DVC's `+` prefix
    dvc(project, "exp", "run", "--temp", "-n", "lineage-a", "-S", "train.max_steps=20", "-S", "train.seed=1",
        "-S", "train.loss_kernel=chunked")  # fmt: skip
    mlflow_client = store_client(project)
    versions = {v.tags.get("dvc_exp_name"): v for v in mlflow_client.search_model_versions("name='gpt2-lm'")}
    version = versions["lineage-a"]
    assert [m.step for m in mlflow_client.get_metric_history(version.run_id, "train/loss")] == [10, 20]
    assert mlflow_client.get_run(version.run_id).info.status == "FINISHED"
    assert len(version.tags["dvc_exp_baseline_rev"]) == 40
    assert version.run_id != registered(project)["run_id"]  # a model of its own, in a run of its own
    assert not list((project / ".dvc/tmp").rglob("mlflow.db")), "an experiment wrote to a throwaway store"
    shown = dvc(project, "exp", "show", "--csv", "--no-pager").stdout.splitlines()
    header = shown[0].split(",")
    rows = {row.split(",")[header.index("Experiment")]: row.split(",") for row in shown[1:]}
    assert float(rows["lineage-a"][header.index("perplexity")]) > 1
    assert "lineage-a" in run([str(BIN / "gpt2-pipeline"), "models"], project).stdout
