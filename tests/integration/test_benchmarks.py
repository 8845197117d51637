"""Benchmark tasks end to end: lm-evaluation-harness tasks (the tiny samples in data/tasks/samples) scored by the
evaluate stage into eval.json, the MLflow run and the card; a promotion gate with task rules that keeps out a
model worse on a task and promotes one that is not."""

from __future__ import annotations

import csv
import json
import math

import pytest
import yaml

from tests.helpers import BIN, merge, run, store_client, tiny_params, write_params

pytestmark = pytest.mark.slow

TASKS = [
    {"name": "lambada_openai", "data": "data/tasks/samples/lambada_openai"},
    {"name": "hellaswag", "data": "data/tasks/samples/hellaswag", "limit": 4},
]
GATE = [
    {"metric": "lambada_openai/perplexity", "require": "not_worse", "margin": 0.05},  # at most 5% higher
    {"metric": "hellaswag/acc_norm", "require": "not_worse", "margin": 1.0, "unit": "stderr"},
]


def with_tasks(**overrides) -> dict:
    return merge(tiny_params(), {"evaluate": {"tasks": TASKS}, "promote": {"gate": GATE}, **overrides})


def promote(project, env, *args: str):
    result = run([str(BIN / "gpt2-pipeline"), "promote", *args], project, check=False, env=env)
    decision = json.loads(result.stdout[result.stdout.index("{") :]) if "{" in result.stdout else None
    return result, decision


def test_tasks_reach_the_metrics_the_run_the_card_and_a_gate_that_judges_by_them(trained_project, prefect_env):
    project = trained_project
    write_params(project, with_tasks())
    run([str(BIN / "dvc"), "repro"], project)  # the model is the same: evaluate and register run again
    scores = json.loads((project / "metrics/eval.json").read_text())
    assert scores["hellaswag/examples"] == 4 and scores["lambada_openai/examples"] == 6  # limit 4; all 6 samples
    accuracy = scores["hellaswag/acc_norm"]
    assert accuracy in (0, 0.25, 0.5, 0.75, 1)  # of 4 examples
    # The harness's standard error of a mean: the sample's standard deviation over the root of the examples.
    assert scores["hellaswag/acc_norm_stderr"] == pytest.approx(math.sqrt(accuracy * (1 - accuracy) / 3))
    assert scores["lambada_openai/perplexity"] > 1 and "bits_per_byte" in scores
    # The plot `benchmarks`: every task metric (no stderr, no count), as dvc plots draws it for each revision.
    rows = list(csv.reader((project / "plots/benchmarks.csv").open()))
    task_scores = {key: value for key, value in scores.items()
                   if "/" in key and not key.endswith(("_stderr", "/examples"))}  # fmt: skip
    assert rows[0] == ["metric", "value"] and {key: float(value) for key, value in rows[1:]} == task_scores
    drawn = json.loads(run([str(BIN / "dvc"), "plots", "show", "--json"], project).stdout)
    assert "hellaswag/acc_norm" in json.dumps(drawn["data"]["benchmarks"])
    registered = json.loads((project / "registered.json").read_text())
    client = store_client(project)
    logged = client.get_run(registered["run_id"]).data.metrics
    assert logged["eval/hellaswag/acc_norm"] == scores["hellaswag/acc_norm"]
    version = client.get_model_version("gpt2-lm", registered["version"])
    assert float(version.tags["eval_lambada_openai/perplexity"]) == scores["lambada_openai/perplexity"]
    assert f"| hellaswag/acc\\_norm | {scores['hellaswag/acc_norm']:.6g} |" in version.description  # the card

    # The run's dataset inputs: the splits it trained on and was judged on, and each task's data, with DVC's hashes.
    stats = json.loads((project / "data/tokenized/stats.json").read_text())
    outs = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["tokenize"]["outs"]
    tokenized = next(out["md5"] for out in outs if out["path"] == "data/tokenized").removesuffix(".dir")
    seen = {}
    for entry in client.get_run(registered["run_id"]).inputs.dataset_inputs:
        context = {tag.key: tag.value for tag in entry.tags}["mlflow.data.context"]
        seen[(entry.dataset.name, context)] = (entry.dataset.digest, json.loads(entry.dataset.profile))
    train = seen[("tinyshakespeare/train", "training")]
    assert train == (tokenized, {"records": stats["ingest/train_records"], "bytes": stats["ingest/train_bytes"],
                                 "tokens": stats["tokenize/train_tokens"]})  # fmt: skip
    # The split evaluate scores is the one training validated on: one input (the first context logged), not two.
    assert [key for key in seen if key[0] == "tinyshakespeare/validation"] == [
        ("tinyshakespeare/validation", "validation")
    ]
    assert seen[("tinyshakespeare/validation", "validation")][0] == tokenized
    digest, profile = seen[("hellaswag", "evaluation")]
    assert profile["examples"] == 4 and len(digest) == 32 and profile["files"] == ["validation.jsonl"]
    assert f"hellaswag (evaluation) {digest}" in version.tags["datasets"]

    # The first challenger becomes champion; its figures on the gate's tasks are in the decision's report.
    result, decision = promote(project, prefect_env)
    assert result.returncode == 0 and decision["reason"] == "no champion yet", result.stderr[-2000:]

    # A model trained 5 steps: far worse on lambada_openai's last words, so the perplexity rule keeps it out.
    write_params(project, with_tasks(train={**tiny_params()["train"], "max_steps": 5}))
    run([str(BIN / "dvc"), "repro"], project)
    worse = json.loads((project / "registered.json").read_text())["version"]
    result, decision = promote(project, prefect_env)
    assert result.returncode == 3 and not decision["promoted"], result.stderr[-2000:]
    perplexity, accuracy = decision["gate"]
    assert not perplexity["met"] and perplexity["challenger"] > perplexity["champion"] * 1.05
    assert decision["reason"].startswith("lambada_openai/perplexity ") and decision["reason"].endswith(": NOT met")
    tags = client.get_model_version("gpt2-lm", worse).tags
    assert tags["promotion_rule_1"] == perplexity["text"] and tags["promotion_rule_2"] == accuracy["text"]
    assert str(client.get_model_version_by_alias("gpt2-lm", "champion").version) == registered["version"]

    # The golden run's version 1 is the champion's model: no task worse, so every rule holds and it is promoted.
    result, decision = promote(project, prefect_env, "--version", "1")
    assert result.returncode == 0 and decision["promoted"], result.stderr[-2000:]
    assert [rule["change"] for rule in decision["gate"]] == [0.0, 0.0] and all(r["met"] for r in decision["gate"])
    assert "  lambada_openai/perplexity " in result.stderr + result.stdout  # each rule's line in the output


def test_a_rule_on_a_metric_the_task_lacks_is_refused_before_anything_moves(trained_project, prefect_env):
    project = trained_project
    write_params(project, with_tasks(promote={"gate": [{"metric": "hellaswag/f1"}]}))
    result, _ = promote(project, prefect_env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: promote.gate.0.metric: hellaswag/f1: the version has no such metric (hellaswag gives acc, acc_norm); "
        "name one it has"
    )
    assert "champion" not in store_client(project).get_registered_model("gpt2-lm").aliases


def test_a_task_without_its_data_stops_evaluate_with_one_line(trained_project):
    project = trained_project
    write_params(project, merge(tiny_params(), {"evaluate": {"tasks": [{"name": "xcopa_zh"}]}}))
    result = run([str(BIN / "dvc"), "repro", "evaluate"], project, check=False)
    assert result.returncode != 0
    line = (
        "error: evaluate.tasks xcopa_zh: data/tasks/xcopa_zh/test.jsonl not found; fetch the task's data once on a "
        "connected machine with `python -m tools.task_data xcopa_zh` (docs/evaluation.md)"
    )
    assert line in result.stderr.splitlines() and "Traceback" not in result.stderr
    assert "xcopa_zh" not in (project / "metrics/eval.json").read_text()  # the last evaluation's metrics kept
