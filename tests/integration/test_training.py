"""Training that survives preemption and scales out, on copies of the trained project (its tokenized data kept)
with real MLflow and DVC; and a corpus of its own from scratch."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import (
    BIN,
    ROOT,
    copy_project,
    merge,
    run,
    store_client,
    store_copy,
    tiny_params,
    tool_env,
    trained_copy,
    untrained_perplexity,
    write_params,
)
from tests.servers import LOOPBACK, free_port

pytestmark = pytest.mark.slow


def mlflow_runs(project):
    client = store_client(project)
    experiment = client.get_experiment_by_name("gpt2-pipeline")
    return client, client.search_runs([experiment.experiment_id])


def test_killed_training_resumes_from_its_checkpoint(golden, tmp_path):
    """The golden project's own 150 steps are the uninterrupted reference: the same training with a checkpoint
    every 50 steps, killed while it writes the second, then resumed, ends within 1% of it."""
    project = trained_copy(golden, tmp_path)
    write_params(project, merge(tiny_params(), {"train": {"checkpoint_every": 50}}))
    uninterrupted = json.loads((golden / "metrics/train.json").read_text())

    # Preempted: SIGKILL the whole `dvc repro` (DVC and the stage) while it writes its second checkpoint.
    with subprocess.Popen(
        [str(BIN / "dvc"), "repro"],
        cwd=project,
        env=tool_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    ) as victim:
        deadline = time.time() + 300
        while not list((project / "checkpoints/train").glob("checkpoint-100")) and time.time() < deadline:
            time.sleep(0.05)
        os.killpg(victim.pid, signal.SIGKILL)
    assert list((project / "checkpoints/train").glob("checkpoint-*")), "killed before any checkpoint"
    registered_before = (golden / "registered.json").read_text()
    assert (project / "registered.json").read_text() == registered_before  # killed before registering

    result = run([str(BIN / "dvc"), "repro", "train"], project)
    assert "resuming from checkpoints/train/checkpoint-" in result.stdout
    resumed = json.loads((project / "metrics/train.json").read_text())
    assert resumed["steps"] == 150
    assert resumed["train_loss"] == pytest.approx(uninterrupted["train_loss"], rel=0.01)
    client, runs = mlflow_runs(project)
    new_run = json.loads((project / "models/gpt2/mlflow_run.json").read_text())["run_id"]
    # The trained project's run and the resumed one, both closed: the killed attempt's run is the one resumed.
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    losses = client.get_metric_history(new_run, "train/loss")
    assert sorted(m.step for m in losses) == list(range(10, 151, 10))  # every step once, none twice
    assert not (project / "checkpoints/train").exists()


DATA_PARALLEL = {"max_steps": 6, "logging_steps": 1, "eval_steps": 6, "checkpoint_every": 6, "warmup_steps": 0}


def curve(plot_file) -> list[tuple[int, float]]:
    with open(plot_file, newline="") as handle:
        return [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(handle)]


def single_process_curve(project, tmp_path, monkeypatch, empty_store) -> list[tuple[int, float]]:
    """The loss curve of 1 process x batch 16 (DATA_PARALLEL), trained in this process on project's data."""
    from tasks.plumbing.params import parse_params
    from tasks.tracking import mlflow_runs as pipeline_runs
    from tasks.train import train

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_copy(empty_store, tmp_path / "single.db"))
    single = parse_params(merge(tiny_params(), {"train": {**DATA_PARALLEL, "num_processes": 1, "batch_size": 16}}))
    run_id = pipeline_runs.create_run(single)
    train(single, run_id, project / "models/tokenizer", project / "data/tokenized", tmp_path / "single",
          tmp_path / "single", tmp_path / "checkpoints")  # fmt: skip
    return curve(tmp_path / "single/train_loss.csv")


def recording_ranks(folder, **extra: str) -> dict[str, str]:
    """The environment for a train stage whose torchrun ranks record their weights and blocks to folder
    (tests/rank_hook: a sitecustomize that only torchrun's workers act on)."""
    return tool_env(PYTHONPATH=str(ROOT / "tests/rank_hook"), RECORD_RANKS_TO=str(folder), **extra)


def assert_ranks_in_step(folder, steps: int) -> None:
    """Two ranks saw different blocks at every step, and after each optimizer step their weights were the same,
    bit for bit, and changed by the step."""
    ranks = [json.loads((folder / f"{rank}.json").read_text()) for rank in (0, 1)]
    for step in range(1, steps + 1):
        assert ranks[0]["blocks"][str(step)] != ranks[1]["blocks"][str(step)]
    weights = [rank["weights"] for rank in ranks]
    assert list(weights[0]) == [str(step) for step in range(steps + 1)]  # before training, then after each step
    assert weights[0] == weights[1]
    assert len(set(weights[0].values())) == steps + 1  # each step changed them


def test_two_processes_train_like_one_process_with_twice_the_batch(golden, tmp_path, monkeypatch, empty_store):
    """2 processes x batch 8 (torchrun, gradients averaged) take the same steps as 1 process x batch 16: the same
    loss at every step, to float rounding (1e-4; measured: within 2e-7), in one MLflow run; the two ranks train
    on different blocks and hold identical weights after every step."""
    project = trained_copy(golden, tmp_path)
    write_params(project, merge(tiny_params(), {"train": {**DATA_PARALLEL, "num_processes": 2, "batch_size": 8}}))
    result = run([str(BIN / "dvc"), "repro", "train"], project, env=recording_ranks(tmp_path / "ranks"))
    assert "x 2 process(es)" in result.stdout
    assert_ranks_in_step(tmp_path / "ranks", DATA_PARALLEL["max_steps"])
    metrics = json.loads((project / "metrics/train.json").read_text())
    assert metrics["processes"] == 2 and metrics["tokens_seen"] == 6 * 8 * 64 * 2
    two = curve(project / "plots/train_loss.csv")
    one = single_process_curve(project, tmp_path, monkeypatch, empty_store)
    assert [step for step, _ in two] == [step for step, _ in one] == list(range(1, 7))
    assert [loss for _, loss in two] == pytest.approx([loss for _, loss in one], abs=1e-4)
    assert two[-1][1] < two[0][1] - 0.1  # and they learn: six steps at this rate move the loss

    client, runs = mlflow_runs(project)
    trained_in = json.loads((project / "models/gpt2/mlflow_run.json").read_text())["run_id"]
    assert len(runs) == 2 and trained_in in {r.info.run_id for r in runs}  # the golden model's run and this one
    assert [m.step for m in client.get_metric_history(trained_in, "train/loss")] == list(range(1, 7))
    assert sorted(p.name for p in (project / "models").iterdir()) == ["gpt2", "tokenizer"]


def test_a_sweep_trial_pruned_under_torchrun_stops_both_processes_and_exits_as_pruned(golden, tmp_path):
    """A sweep trial trained by 2 torchrun processes trails a finished trial at its first evaluation: the first
    process decides, both stop at that step, and the stage exits as pruned with its one line, no traceback and
    the model untouched (the first process stopping alone made torchrun report a failed worker)."""
    from tasks import sweep
    from tasks.plumbing.errors import PRUNED_EXIT
    from tasks.plumbing.params import parse_params
    from tasks.tracking.lineage import SWEEP_TRIAL_ENV

    project = trained_copy(golden, tmp_path)
    train = {**DATA_PARALLEL, "eval_steps": 2, "num_processes": 2, "batch_size": 8}
    write_params(project, merge(tiny_params(), {"train": train}))
    url = f"sqlite:///{tmp_path / 'sweeps.db'}"
    settings = parse_params({"sweep": {"study": "unit", "trials": 2, "startup_trials": 1}}).sweep
    study = sweep.open_study(settings, sweep.open_storage(url), resume=False)
    leader = sweep.next_trial(study, settings, url)
    for step in (2, 4, 6):
        leader.report(0.01, step)
    study.tell(leader, 0.01)
    trial = sweep.next_trial(study, settings, url)
    spec = {"study": "unit", "storage": url, "trial_id": trial._trial_id, "number": trial.number,
            "parent_run_id": "0" * 32, "pruner": "median", "startup_trials": 1}  # fmt: skip
    model = (project / "models/gpt2/model.safetensors").read_bytes()

    result = run([str(BIN / "python"), "-m", "tasks.train"], project, check=False,
                 env=tool_env(**{SWEEP_TRIAL_ENV: json.dumps(spec)}))  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == PRUNED_EXIT, output[-3000:]
    assert "x 2 process(es)" in output and "train: pruned at step 2 by sweep unit" in output
    assert "Traceback" not in output and "ChildFailedError" not in output
    assert (project / "models/gpt2/model.safetensors").read_bytes() == model
    assert study.trials[trial.number].intermediate_values.keys() == {2}  # reported once: it stopped there


def test_a_sweep_prunes_the_trial_that_trails_and_records_the_study_where_users_look(golden, tmp_path):
    """`gpt2-pipeline sweep` on the project's SQLite study: the random sampler (seeded) draws a working learning rate
    first and a hopeless one second, which the median pruner stops at its first evaluation. The table and the best
    are printed; Optuna, MLflow (the study's run, its plots and a child run a trial) and DVC (the finished trial's
    experiment, the pruned one none) agree."""
    project = trained_copy(golden, tmp_path)
    sweep = {"study": "prune", "trials": 2, "startup_trials": 1, "sampler": "random", "seed": 0, "pruner": "median"}
    params = merge(tiny_params(), {"train": {"max_steps": 40, "eval_steps": 20}, "sweep": sweep})
    params["sweep"]["space"] = {"train.learning_rate": {"type": "categorical", "choices": [1.0e-6, 3.0e-3]}}
    write_params(project, params)
    run(["git", "commit", "-qam", "sweep"], project)
    result = run([str(BIN / "gpt2-pipeline"), "sweep"], project)
    output = result.stdout + result.stderr
    assert "Traceback" not in output and "error:" not in output.lower(), output[-3000:]  # DVC's ERROR: lines too
    assert re.search(r"│ 0 +│ complete +│ \d\.\d{4} +│", output) and re.search(r"│ 1 +│ pruned +│ +│", output), output
    assert "best: trial 0, bits_per_byte " in output and "{'train.learning_rate': 0.003}" in output
    assert yaml.safe_load((project / "params/prune-best.yaml").read_text())["train"]["learning_rate"] == 3.0e-3

    import optuna

    study = optuna.load_study(study_name="prune", storage=f"sqlite:///{project / 'sweeps.db'}")
    assert [(t.state.name, t.params["train.learning_rate"]) for t in study.trials] == [
        ("COMPLETE", 3.0e-3), ("PRUNED", 1.0e-6)]  # fmt: skip
    assert list(study.trials[1].intermediate_values) == [20]  # stopped at its first evaluation
    client, runs = mlflow_runs(project)
    (parent,) = [
        r for r in runs if r.data.tags.get("sweep_study") == "prune" and "mlflow.parentRunId" not in r.data.tags
    ]
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep_best_trial"] == "0"
    assert parent.data.metrics["sweep/best_bits_per_byte"] == pytest.approx(study.best_value)
    children = {
        r.data.tags["sweep_trial"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert {n: (r.info.status, r.data.tags["sweep_state"]) for n, r in children.items()} == {
        "0": ("FINISHED", "complete"), "1": ("KILLED", "pruned")}  # fmt: skip
    # The study's plots, drawn offline: SVG files on its run that name nothing outside themselves.
    drawn = Path(client.download_artifacts(parent.info.run_id, "", str(tmp_path / "study")))
    plots = sorted(path.name for path in (drawn / "plots").iterdir())
    assert {"optimization_history.svg", "intermediate_values.svg", "slice.svg"} <= set(plots), plots
    for name in plots:
        text = (drawn / "plots" / name).read_text()
        assert "<svg" in text[:500] and not re.search(r'(href|src)="https?:', text), name
    assert re.search(r"│ 1 +│ pruned", (drawn / "trials.txt").read_text())
    assert run([str(BIN / "dvc"), "exp", "ls", "--name-only"], project).stdout.split() == ["prune-0"]


def test_two_nodes_train_as_one_node_with_two_processes(golden, tmp_path, monkeypatch, empty_store):
    """train.nodes: 2 runs each node's share under torchrun, meeting at a c10d rendezvous: here two "nodes" on this
    machine (two copies of the project, one process each, meeting on the loopback) logging to one team store.
    c10d gives global rank 0 to either: that node saves the model and holds the one run; the other exits 4 with
    its outputs untouched, so DVC there records nothing. The loss curve is 1 process x batch 16's, as 1 node x 2
    processes' is (the test above), and the two nodes' ranks hold identical weights after every step."""
    nodes = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        nodes.append(trained_copy(golden, tmp_path / name))
    settings = {
        **DATA_PARALLEL,
        "nodes": 2,
        "num_processes": 1,
        "batch_size": 8,
        "rendezvous": f"{LOOPBACK}:{free_port()}",
    }
    records = []
    for node in nodes:
        write_params(node, merge(tiny_params(), {"train": settings}))
        records.append((node / "models/gpt2/mlflow_run.json").read_text())
    team = store_copy(empty_store, tmp_path / "team.db")  # the team's tracking server both nodes log to
    env = recording_ranks(tmp_path / "ranks", MLFLOW_TRACKING_URI=team, OMP_NUM_THREADS="1")
    launched = [
        subprocess.Popen([str(BIN / "python"), "-m", "tasks.train"], cwd=node, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for node in nodes
    ]  # fmt: skip
    outputs = [process.communicate(timeout=600)[0] for process in launched]
    statuses = [process.returncode for process in launched]
    assert sorted(statuses) == [0, 4], outputs
    writer, other = (0, 1) if statuses[0] == 0 else (1, 0)
    assert "global rank 0 ran on another node" in outputs[other] and "Traceback" not in "".join(outputs)
    assert (nodes[other] / "models/gpt2/mlflow_run.json").read_text() == records[other]  # untouched
    assert_ranks_in_step(tmp_path / "ranks", DATA_PARALLEL["max_steps"])
    run_id = json.loads((nodes[writer] / "models/gpt2/mlflow_run.json").read_text())["run_id"]

    import mlflow

    client = mlflow.MlflowClient(team)
    (only,) = client.search_runs([client.get_experiment_by_name("gpt2-pipeline").experiment_id])
    assert only.info.run_id == run_id and only.info.status == "FINISHED" and only.data.params["train.nodes"] == "2"
    metrics = json.loads((nodes[writer] / "metrics/train.json").read_text())
    assert metrics["processes"] == 2 and metrics["tokens_seen"] == 6 * 8 * 64 * 2
    two_nodes = curve(nodes[writer] / "plots/train_loss.csv")
    one = single_process_curve(nodes[writer], tmp_path, monkeypatch, empty_store)
    assert [step for step, _ in two_nodes] == [step for step, _ in one] == list(range(1, 7))
    assert [loss for _, loss in two_nodes] == pytest.approx([loss for _, loss in one], abs=1e-4)


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
    run([str(BIN / "dvc"), "repro", "train"], project)
    metrics = json.loads((project / "metrics/train.json").read_text())
    assert metrics["train_loss"] < 0.5 * metrics["train_loss_first"]
    # A tiny, repetitive dialogue corpus is learned almost by heart: validation perplexity below 10.
    assert math.exp(metrics["best_eval_loss"]) < 10


# The bundled Tang poems through params/tang-poetry.yaml as a user runs it, only smaller and shorter.
SHORTER = {
    "tokenizer": {"block_size": 64},
    "model": {"config": {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 64}},
    "train": {"max_steps": 80, "batch_size": 8, "warmup_steps": 10, "logging_steps": 10, "eval_steps": 40,
              "checkpoint_every": 40},
    "evaluate": {"generation": {"max_new_tokens": 16}},
}  # fmt: skip


def test_the_tang_poetry_params_train_a_model_far_better_than_untrained(tmp_path):
    project = copy_project(tmp_path)
    write_params(project, merge(yaml.safe_load((project / "params/tang-poetry.yaml").read_text()), SHORTER))
    run([str(BIN / "dvc"), "repro", "evaluate"], project)
    evaluation = json.loads((project / "metrics/eval.json").read_text())
    assert evaluation["perplexity"] < untrained_perplexity(project) / 3
    samples = json.loads((project / "reports/samples.json").read_text())
    assert [s["prompt"] for s in samples] == ["春", "月"]
    assert all(len(s["text"]) > len(s["prompt"]) for s in samples)


def test_sigterm_after_the_last_step_stops_the_stage_at_once():
    """During training SIGTERM is noted (the Trainer checkpoints at the step's end); after it, while the model is
    saved and plotted, the stage's own handler is back and stops it at once instead of noting it for no one."""
    from tasks.plumbing import stopping
    from tasks.plumbing.errors import Stopped
    from tasks.training.callbacks import StopOnSignal

    previous = signal.signal(signal.SIGTERM, stopping.raise_stopped)  # what run_cli installs
    try:
        stop = StopOnSignal()
        signal.raise_signal(signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        stop.release()
        with pytest.raises(Stopped):
            signal.raise_signal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
        stopping.clear()
