"""The registry end to end: promotion only of better models, rollback, the models table, the promotion report."""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.browser import chromium, pixels_near
from tests.helpers import BIN, merge, mlflow_on, run, store_client, tiny_params, trained_copy, write_params

pytestmark = pytest.mark.slow
# The default gate's one rule, as the decision, the report and the command say it.
BPB_RULE = (
    r"bits_per_byte \d\.\d+ → \d\.\d+, \d+\.\d\d% (better|worse) \(must improve by at least 1\.00%\): (met|NOT met)"
)


def train_and_register(project, max_steps: int) -> str:
    write_params(project, merge(tiny_params(), {"train": {"max_steps": max_steps}}))
    run([str(BIN / "dvc"), "repro"], project)
    return json.loads((project / "registered.json").read_text())["version"]


def cli(scenario, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([str(BIN / "gpt2-pipeline"), *args], scenario.project, check=check, env=scenario.env)


def aliases(project) -> dict[str, str]:
    client = store_client(project)
    return {alias: str(version) for alias, version in client.get_registered_model("gpt2-lm").aliases.items()}


def version_tags(project, version: str) -> dict[str, str]:
    return store_client(project).get_model_version("gpt2-lm", version).tags


@dataclass
class Scenario:
    """What a promotion history left behind: the project, each version's role and each step's outcome."""

    project: Path
    env: dict[str, str]
    first: str = ""
    worse: str = ""
    better: str = ""
    outcomes: dict[str, object] = field(default_factory=dict)


@pytest.fixture(scope="module")
def scenario(golden, prefect_env, tmp_path_factory) -> Scenario:
    """From the trained project (150 steps, registered): promote; train 5 steps (worse) and promote; train 250
    (better) and promote twice at once; then roll back, twice. Each test below checks one part of what happened,
    so any of them runs alone."""
    project = trained_copy(golden, tmp_path_factory.mktemp("registry"))
    scenario = Scenario(project, prefect_env)
    scenario.first = json.loads((project / "registered.json").read_text())["version"]
    outcomes = scenario.outcomes
    outcomes["first"], outcomes["after first"] = _decision(scenario), aliases(project)
    scenario.worse = train_and_register(project, 5)  # far fewer steps
    outcomes["named version"] = _decision(scenario, "--version", scenario.first)  # not the new @challenger
    outcomes["worse"], outcomes["after worse"] = _decision(scenario), aliases(project)
    scenario.better = train_and_register(project, 250)
    # Two promotions at once: one promotes, the other finds the challenger already champion.
    both = [
        subprocess.Popen(
            [str(BIN / "gpt2-pipeline"), "promote"],
            cwd=project,
            env=prefect_env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    outcomes["concurrent"] = [(process.communicate(timeout=600)[0], process.wait()) for process in both]
    outcomes["after better"] = aliases(project)
    outcomes["described after better"] = store_client(project).get_registered_model("gpt2-lm").description
    owned = project.parent / "my-reports"  # a folder of the user's: --output writes inside it, keeps the rest
    owned.mkdir()
    (owned / "notes.txt").write_text("mine")
    outcomes["compare"] = cli(scenario, "compare", f"models:/gpt2-lm/{scenario.first}",
                              f"models:/gpt2-lm/{scenario.better}", "--output", str(owned))  # fmt: skip
    outcomes["compare report"] = (owned / "compare.html").read_text(encoding="utf-8")
    outcomes["compare kept"] = (owned / "notes.txt").read_text()
    outcomes["rollback"] = cli(scenario, "rollback").stdout
    outcomes["after rollback"] = aliases(project)
    outcomes["described after rollback"] = store_client(project).get_registered_model("gpt2-lm").description
    outcomes["second rollback"] = cli(scenario, "rollback", check=False)
    return scenario


def test_the_first_challenger_becomes_champion(scenario):
    decision = scenario.outcomes["first"]
    assert decision["promoted"] and decision["reason"] == "no champion yet" and decision["exit status"] == 0
    assert scenario.outcomes["after first"] == {"challenger": scenario.first, "champion": scenario.first}


def test_a_worse_challenger_is_kept_out(scenario):
    decision = scenario.outcomes["worse"]
    assert not decision["promoted"] and decision["champion_bits_per_byte"] < decision["challenger_bits_per_byte"]
    assert decision["exit status"] == 3  # kept the champion: told apart from a failure (1, 2) and a promotion
    assert scenario.outcomes["after worse"] == {"challenger": scenario.worse, "champion": scenario.first}
    assert version_tags(scenario.project, scenario.worse)["promotion_promoted"] == "False"


def test_promotion_judges_the_version_it_is_given(scenario):
    """A pipeline run's promotion names the version it registered; @challenger (here the worse model, as another
    pipeline's registration would have moved it) is not what is judged."""
    decision = scenario.outcomes["named version"]
    assert decision["challenger_version"] == scenario.first != scenario.worse
    assert decision["reason"] == f"version {scenario.first} is already @champion" and decision["exit status"] == 3


def test_two_promotions_at_once_promote_a_better_challenger_once(scenario):
    outputs = scenario.outcomes["concurrent"]
    assert sorted((code, '"promoted": true' in output) for output, code in outputs) == [(0, True), (3, False)]
    assert scenario.outcomes["after better"] == {
        "challenger": scenario.better,
        "champion": scenario.better,
        "previous-champion": scenario.first,
    }
    tags = version_tags(scenario.project, scenario.better)
    assert float(tags["promotion_challenger_bits_per_byte"]) < float(tags["promotion_champion_bits_per_byte"])


def test_the_registered_model_is_described_by_its_champion_s_card(scenario):
    for when, version in (("after better", scenario.better), ("after rollback", scenario.first)):
        described = scenario.outcomes[f"described {when}"]
        card = store_client(scenario.project).get_model_version("gpt2-lm", version).description
        assert described == f"@champion is version {version}.\n\n{card}" and card.startswith("# gpt2-lm\n"), when


def test_rollback_restores_the_previous_champion_once(scenario):
    assert "@champion is version" in scenario.outcomes["rollback"]
    assert scenario.outcomes["after rollback"] == {"challenger": scenario.better, "champion": scenario.first}
    second = scenario.outcomes["second rollback"]
    assert second.returncode == 2
    assert second.stderr.strip() == "error: gpt2-lm has no @previous-champion to roll back to"


def _decision(scenario, *args: str) -> dict:
    """The decision `gpt2-pipeline promote` printed, with its exit status."""
    result = cli(scenario, "promote", *args, check=False)
    assert result.returncode in (0, 3), result.stderr[-3000:]
    return {**json.loads(result.stdout[result.stdout.index("{") :]), "exit status": result.returncode}


def test_every_version_carries_lineage_and_the_table_shows_it(scenario):
    project = scenario.project
    client = store_client(project)
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
    table = cli(scenario, "models").stdout
    for version in versions:
        assert f"{float(version.tags['eval_bits_per_byte']):.4f}" in table
    assert "@champion" in table and "@challenger" in table and "kept out" in table


def test_the_promotion_report_is_logged_and_draws_in_a_browser(scenario, tmp_path):
    """The better challenger's promotion logged its report to the challenger's run; Chromium draws both training
    curves and shows the decision in words."""
    from tasks.tracking.report import COLORS

    (promoted,) = [json.loads(out[out.index("{") :]) for out, _ in scenario.outcomes["concurrent"] if '"report"' in out]
    run_id = store_client(scenario.project).get_model_version("gpt2-lm", scenario.better).run_id
    assert promoted["report"] == f"runs:/{run_id}/promotion/v{scenario.better}-vs-v{scenario.first}.html"
    with mlflow_on(f"sqlite:///{scenario.project}/mlflow.db") as mlflow:
        page = Path(mlflow.artifacts.download_artifacts(artifact_uri=promoted["report"], dst_path=str(tmp_path)))
    dom, png = chromium(page, tmp_path)
    assert f"Promoted: {promoted['reason']}." in dom and re.fullmatch(BPB_RULE, promoted["reason"])
    assert "better (must improve by at least 1.00%): met" in promoted["reason"]
    assert dom.count("<polyline") == 4  # training and validation loss, champion and challenger
    assert pixels_near(png, COLORS[0]) > 300 and pixels_near(png, COLORS[1]) > 300, "a chart was not drawn"
    # The worse challenger's report says why it was kept out.
    worse = scenario.outcomes["worse"]["reason"]
    assert re.fullmatch(BPB_RULE, worse) and worse.endswith("worse (must improve by at least 1.00%): NOT met"), worse


def test_compare_writes_the_same_report_for_any_two_models(scenario):
    line, rule = scenario.outcomes["compare"].stdout.strip().splitlines()
    assert re.fullmatch(r"\S+my-reports/compare\.html: B would be promoted over A", line), line
    assert re.fullmatch(BPB_RULE, rule.strip()) and rule.endswith("better (must improve by at least 1.00%): met"), rule
    reason = re.escape(rule.strip())
    assert scenario.outcomes["compare kept"] == "mine"
    page = scenario.outcomes["compare report"]
    assert re.search(f'<p class="decision promoted">Promoted: {reason}.</p>', page)
    assert f"models:/gpt2-lm/{scenario.first} (version {scenario.first})" in page and page.count("<polyline") == 4
    assert "<td>train.max_steps</td><td>150</td><td>250</td>" in page
