"""Faults: a tracking server that is down, a full disk, SIGTERM, a loss that explodes. One line each, and what
was already made (data, model, DVC cache, registry) survives; the next run carries on from it."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import BIN, merge, run, stage_processes, store_client, tiny_params, tool_env, write_params
from tests.reliability.conftest import CHECKPOINTED, digest, error_lines, leftovers
from tests.servers import LOOPBACK, free_port, mlflow_server, wait_http
from tools.corpora import MB, write_corpus

pytestmark = pytest.mark.slow


def test_mlflow_down_at_the_start_fails_before_training(trained):
    env = {**tool_env(), "MLFLOW_TRACKING_URI": f"http://{LOOPBACK}:{free_port()}"}
    result = trained.repro({"train": {"seed": 7}}, env=env)  # train is stale: it would retrain
    # ConnectError is the /health pre-check's answer: MLflow's own client would retry with backoff for minutes.
    trained.assert_failed_cleanly(
        result,
        r"MLflow tracking server http://127\.0\.0\.1:\d+ is not reachable \(ConnectError: .*Connection refused\); "
        r"start it",
    )
    assert "train: step" not in result.stdout


def test_a_full_disk_while_saving_keeps_the_previous_model(trained):
    """A file-size limit (RLIMIT_FSIZE) makes the model's weights the write that fails, as a full disk would."""
    bigger = {"model": {"config": {"n_embd": 384, "n_head": 4}}, "train": {"max_steps": 2, "seed": 11}}
    write_params(trained.project, merge(trained.params, bigger))
    limit = max(4 << 20, (trained.project / "mlflow.db").stat().st_size + (2 << 20))

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    try:
        result = subprocess.run(
            [str(BIN / "python"), "-m", "tasks.train"], cwd=trained.project, env=tool_env(),
            capture_output=True, text=True, preexec_fn=limit_file_size, timeout=600, check=False,
        )  # fmt: skip
    finally:
        write_params(trained.project, trained.params)
    # The first write over the limit is the final checkpoint's or the model's; either way one line, nothing lost.
    line = trained.assert_failed_cleanly(result, r"^error: (models/gpt2: )?the disk filled up while writing")
    assert "File too large" in line and "and rerun;" in line


def test_nan_loss_stops_training_and_registers_nothing(trained):
    result = trained.stage("train", {"train": {"learning_rate": 1.0e6, "max_grad_norm": 1.0e9, "warmup_steps": 0}})
    trained.assert_failed_cleanly(
        result, r"^error: train: (eval_)?loss became (nan|inf) at step \d+; lower train\.learning_rate"
    )


@pytest.fixture
def stoppable(trained_project) -> Path:
    """A trained project of the test's own: these tests finish the runs they interrupt, changing its outputs."""
    return trained_project


def start_repro(project: Path) -> subprocess.Popen:
    # DVC runs each stage through $SHELL, else /bin/sh: dash forks the stage's python (bash execs it), so the
    # tree below dvc differs by machine. Take dash, the deeper one, which is what CI without $SHELL sees.
    return subprocess.Popen(
        [str(BIN / "dvc"), "repro"], cwd=project, env={**tool_env(), "SHELL": "/bin/sh"}, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def terminate_when(proc: subprocess.Popen, stage: str, ready, timeout: float = 300) -> str:
    """SIGTERM the stage's process (`kill PID`, a scheduler stopping it) at a moment when ready() holds; dvc
    reports its exit.

    ready() is judged while the stage is frozen (SIGSTOP) and the signal is sent before it is thawed (SIGCONT):
    a stage seen mid-work is still mid-work when the signal lands, however busy the machine.
    """
    deadline = time.monotonic() + timeout
    try:
        target = None
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the stage finished or never got there"
            target = target or next(iter(stage_processes(proc.pid, stage)), None)
            if target is not None and frozen_signal(target, ready):
                break
            time.sleep(0.02)
        return proc.communicate(timeout=300)[0]
    finally:  # a failed test must not leave a dvc repro holding the project's lock for the next one
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def frozen_signal(target, ready) -> bool:
    """SIGTERM target if ready() holds while it is frozen; whether it was sent."""
    target.suspend()
    try:
        if not ready():
            return False
        target.send_signal(signal.SIGTERM)
        return True
    finally:
        target.resume()


def untouched(folder: Path):
    """Whether folder is still the one there now: an output swapped in is a new folder (another inode)."""
    inode = folder.stat().st_ino

    def check() -> bool:
        try:
            return folder.stat().st_ino == inode
        except FileNotFoundError:  # between the two renames of a swap
            return False

    return check


def test_sigterm_during_tokenize_keeps_the_old_outputs_and_a_rerun_finishes(stoppable):
    # A corpus big enough (8 MB) that tokenizing it takes seconds: the SIGTERM lands while it works.
    write_corpus(stoppable / "data/corpora/bad/corpus.jsonl", 8 * MB)
    write_params(stoppable, merge(tiny_params(), {"data": {"sources": ["data/corpora/bad/corpus.jsonl"]}}))
    run([str(BIN / "dvc"), "repro", "ingest"], stoppable)
    before, data, kept = digest(stoppable), stoppable / "data", untouched(stoppable / "data/tokenized")

    def encoding() -> bool:  # the train blocks are being written into the new output, not yet complete
        writing = [folder for folder in data.glob(".tokenized.tmp-*") if any(folder.glob("train/*.arrow"))]
        return any(writing) and not any((folder / "dataset_dict.json").exists() for folder in writing) and kept()

    output = terminate_when(start_repro(stoppable), "tokenize", encoding)
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert lines == ["error: stopped by SIGTERM before it finished; its previous outputs are kept; "
                     "rerun `dvc repro` to continue"], output[-2000:]  # fmt: skip
    assert digest(stoppable) == before and leftovers(stoppable) == []
    run([str(BIN / "dvc"), "repro", "tokenize"], stoppable)
    assert digest(stoppable)["data/tokenized"] != before["data/tokenized"]  # the rerun finished the new blocks


def test_sigterm_during_training_saves_a_checkpoint_that_the_rerun_resumes(stoppable):
    write_params(stoppable, merge(tiny_params(), CHECKPOINTED))
    model_before = digest(stoppable)["models/gpt2"]
    checkpoints, kept = stoppable / "checkpoints/train", untouched(stoppable / "models/gpt2")

    def early() -> bool:  # a checkpoint saved, at most 60 of the 100 steps done: the stop lands mid-training
        steps = [int(path.name.rsplit("-", 1)[1]) for path in checkpoints.glob("checkpoint-*")]
        return bool(steps) and max(steps) <= 60 and kept()

    output = terminate_when(start_repro(stoppable), "train", early)
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: train stopped by SIGTERM at step "), output[-2000:]
    stopped_at = int(lines[0].split("at step ")[1].split(";")[0])
    assert (stoppable / f"checkpoints/train/checkpoint-{stopped_at}").is_dir()
    assert digest(stoppable)["models/gpt2"] == model_before and "Traceback" not in output
    stopped_run = json.loads((stoppable / "checkpoints/train/mlflow_run.json").read_text())["run_id"]
    assert run_status(stoppable, stopped_run) == "KILLED"
    rerun = run([str(BIN / "dvc"), "repro", "train"], stoppable)
    assert f"resuming from checkpoints/train/checkpoint-{stopped_at}" in rerun.stdout
    assert json.loads((stoppable / "metrics/train.json").read_text())["steps"] == CHECKPOINTED["train"]["max_steps"]
    # The resumed training continues the run it was stopped in, and closes it.
    assert json.loads((stoppable / "models/gpt2/mlflow_run.json").read_text())["run_id"] == stopped_run
    assert run_status(stoppable, stopped_run) == "FINISHED"


def run_status(project: Path, run_id: str) -> str:
    return store_client(project).get_run(run_id).info.status


def test_mlflow_down_at_registration_keeps_the_model_and_registers_it_later(trained_project, tmp_path):
    """The team's server is down when a trained model is to be registered (under a new name: only register has
    work to do): one line, the model and the last registration kept; once the server is back, `dvc repro` runs
    register alone."""
    project = trained_project
    write_params(project, merge(tiny_params(), {"register": {"model_name": "gpt2-team"}}))
    registered_before, model = (project / "registered.json").read_text(), digest(project)["models/gpt2"]
    port = free_port()
    env = {**tool_env(), "MLFLOW_TRACKING_URI": f"http://{LOOPBACK}:{port}"}
    down = run([str(BIN / "dvc"), "repro"], project, check=False, env=env)
    assert down.returncode != 0 and len(error_lines(down)) == 1, down.stderr[-2000:]
    assert "MLflow tracking server http://127.0.0.1" in error_lines(down)[0]
    assert "Running stage 'train'" not in down.stdout
    assert digest(project)["models/gpt2"] == model
    assert (project / "registered.json").read_text() == registered_before
    with mlflow_server(
        port, f"sqlite:///{tmp_path}/server.db", tmp_path / "store", tmp_path / "mlflow.log", env
    ) as proc:
        wait_http(f"{env['MLFLOW_TRACKING_URI']}/health", proc, tmp_path / "mlflow.log")
        later = run([str(BIN / "dvc"), "repro"], project, env=env).stdout
    assert "Running stage 'register'" in later and "Running stage 'evaluate'" not in later
    registered = json.loads((project / "registered.json").read_text())
    assert (registered["name"], registered["version"]) == ("gpt2-team", "1")
    assert digest(project)["models/gpt2"] == model
