"""Training that survives preemption and scales out, on fresh copies of the project with real MLflow and DVC."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.conftest import BIN, copy_project, merge, run, tiny_params, tool_env, write_params

pytestmark = pytest.mark.slow


def mlflow_runs(project):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")
    experiment = client.get_experiment_by_name("gpt2-pipeline")
    return client, client.search_runs([experiment.experiment_id])


def test_killed_training_resumes_from_its_checkpoint(tmp_path):
    steps = {"max_steps": 400, "checkpoint_every": 50, "eval_steps": 50, "logging_steps": 10}
    reference, project = copy_project(tmp_path / "reference"), copy_project(tmp_path / "preempted")
    for folder in (reference, project):
        write_params(folder, merge(tiny_params(), {"train": steps}))
    run([str(BIN / "dvc"), "repro", "train"], reference)
    uninterrupted = json.loads((reference / "metrics/train.json").read_text())

    # Preempted: SIGKILL the whole `dvc repro` (DVC and the stage) once a checkpoint past step 100 exists.
    with subprocess.Popen(
        [str(BIN / "dvc"), "repro"],
        cwd=project,
        env=tool_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    ) as victim:
        deadline = time.time() + 300
        while not list((project / "checkpoints/train").glob("checkpoint-1[05]0")) and time.time() < deadline:
            time.sleep(0.05)
        os.killpg(victim.pid, signal.SIGKILL)
    assert list((project / "checkpoints/train").glob("checkpoint-*")), "killed before any checkpoint"
    assert not (project / "registered.json").exists()

    result = run([str(BIN / "dvc"), "repro"], project)
    assert "resuming from checkpoints/train/checkpoint-" in result.stdout
    resumed = json.loads((project / "metrics/train.json").read_text())
    assert resumed["steps"] == 400
    assert resumed["train_loss"] == pytest.approx(uninterrupted["train_loss"], rel=0.01)
    client, runs = mlflow_runs(project)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    losses = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(10, 401, 10))  # every step once, none twice
    assert not (project / "checkpoints/train").exists()


def test_two_processes_train_one_model_in_one_run(tmp_path):
    project = copy_project(tmp_path)
    write_params(
        project,
        merge(
            tiny_params(), {"train": {"num_processes": 2, "max_steps": 60, "eval_steps": 30, "checkpoint_every": 30}}
        ),
    )
    result = run([str(BIN / "dvc"), "repro"], project)
    assert "x 2 process(es)" in result.stdout
    metrics = json.loads((project / "metrics/train.json").read_text())
    assert metrics["processes"] == 2 and metrics["tokens_seen"] == 60 * 8 * 64 * 2
    assert metrics["train_loss"] < 0.9 * metrics["train_loss_first"]
    client, runs = mlflow_runs(project)
    assert len(runs) == 1
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")] == list(range(10, 61, 10))
    assert json.loads((project / "registered.json").read_text())["version"] == "1"
    assert sorted(p.name for p in (project / "models").iterdir()) == ["gpt2", "tokenizer"]


def test_chinese_dialogue_trains_with_a_char_tokenizer(tmp_path):
    project = copy_project(tmp_path)
    turns = [["你好", "你好呀，今天天气不错"], ["吃饭了吗", "吃了，你呢", "我也吃了"], ["在忙什么", "在看书"]]
    lines = [
        json.dumps({"dialog": [f"{t}{i}" for t in dialog]}, ensure_ascii=False) for i in range(300) for dialog in turns
    ]
    (project / "data/samples/chat.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    params = merge(
        tiny_params(),
        {
            "data": {"sources": ["data/samples/chat.jsonl"], "format": "dialog", "text_field": "dialog"},
            "tokenizer": {"kind": "char", "vocab_size": 200, "block_size": 32},
            "model": {"config": {"n_positions": 32}},
            "train": {"max_steps": 60, "eval_steps": 30, "checkpoint_every": 30},
        },
    )
    write_params(project, params)
    run([str(BIN / "dvc"), "repro"], project)
    metrics = json.loads((project / "metrics/train.json").read_text())
    assert metrics["train_loss"] < 0.5 * metrics["train_loss_first"]
    evaluation = json.loads((project / "metrics/eval.json").read_text())
    assert evaluation["perplexity"] < 10  # a tiny, repetitive dialogue corpus is learned almost by heart
