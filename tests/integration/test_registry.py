"""The registry end to end: promotion only of better models, rollback, the models table, generation."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import BIN, copy_project, merge, run, tiny_params, tool_env, write_params

pytestmark = pytest.mark.slow


def train_and_register(project, max_steps: int) -> str:
    write_params(project, merge(tiny_params(), {"train": {"max_steps": max_steps}}))
    run([str(BIN / "dvc"), "repro"], project)
    return json.loads((project / "registered.json").read_text())["version"]


def cli(project, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**tool_env(), "PREFECT_HOME": str(project / ".prefect")}
    return run([str(BIN / "gpt2-pipeline"), *args], project, check=check, env=env)


def aliases(project) -> dict[str, str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")
    return {alias: str(version) for alias, version in client.get_registered_model("gpt2-lm").aliases.items()}


def version_tags(project, version: str) -> dict[str, str]:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db").get_model_version("gpt2-lm", version).tags


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return copy_project(tmp_path_factory.mktemp("registry"))


def test_promotion_accepts_better_and_refuses_worse_then_rolls_back(project):
    first = train_and_register(project, 150)
    decision = _decision(project)
    assert decision["promoted"] and decision["reason"] == "no champion yet"
    assert aliases(project) == {"challenger": first, "champion": first}

    worse = train_and_register(project, 5)  # far fewer steps
    decision = _decision(project)
    assert not decision["promoted"] and decision["champion_bits_per_byte"] < decision["challenger_bits_per_byte"]
    assert aliases(project) == {"challenger": worse, "champion": first}
    assert version_tags(project, worse)["promotion_promoted"] == "False"

    better = train_and_register(project, 400)
    # Two promotions at once: one promotes, the other finds the challenger already champion.
    env = {**tool_env(), "PREFECT_HOME": str(project / ".prefect")}
    both = [
        subprocess.Popen(
            [str(BIN / "gpt2-pipeline"), "promote"],
            cwd=project,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=600)[0] for process in both]
    assert all(process.returncode == 0 for process in both)
    assert sorted('"promoted": true' in output for output in outputs) == [False, True]
    assert aliases(project) == {"challenger": better, "champion": better, "previous-champion": first}
    tags = version_tags(project, better)
    assert float(tags["promotion_challenger_bits_per_byte"]) < float(tags["promotion_champion_bits_per_byte"])

    assert "@champion is version" in cli(project, "rollback").stdout
    assert aliases(project) == {"challenger": better, "champion": first}
    assert (
        cli(project, "rollback", check=False).stderr.strip()
        == "error: gpt2-lm has no @previous-champion to roll back to"
    )


def _decision(project) -> dict:
    output = cli(project, "promote").stdout
    return json.loads(output[output.index("{") :])


def test_every_version_carries_lineage_and_the_table_shows_it(project):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")
    versions = client.search_model_versions("name='gpt2-lm'")
    assert len(versions) == 3
    for version in versions:
        assert {
            "git_commit",
            "git_dirty",
            "data_md5",
            "tokenized_md5",
            "model_md5",
            "params_hash",
            "mlflow_run_id",
            "eval_bits_per_byte",
        } <= set(version.tags)
    table = cli(project, "models").stdout
    for version in versions:
        assert f"{float(version.tags['eval_bits_per_byte']):.4f}" in table
    assert "@champion" in table and "@challenger" in table and "kept out" in table


def test_generate_from_the_champion(project):
    text = cli(project, "generate", "--model", "models:/gpt2-lm@champion", "--prompt", "ROMEO:").stdout
    assert text.startswith("ROMEO:") and len(text.strip()) > len("ROMEO:")
