"""The training-pipeline flow's retries, observed in Prefect's own task run states on a real server: a training
killed by a fault is retried and the run completes; a training refused for bad input is not retried."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import httpx
import pytest

from tests.helpers import BIN, merge, stage_processes, tiny_params, write_params

pytestmark = pytest.mark.slow

# The flow as `python -m flows.pipeline` runs it, with the product's retries and retry condition; only the delay
# between attempts is shortened (30 s in the product) so the test does not wait for it.
DRIVER = """
from flows import pipeline
pipeline.run_train_stage = pipeline.run_train_stage.with_options(retry_delay_seconds=1)
state = pipeline.training_pipeline(return_state=True)
print("flow run", state.state_details.flow_run_id, state.type.value)
"""


def start_flow(project, env) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "python"), "-c", DRIVER], cwd=project, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def finished(flow: subprocess.Popen) -> tuple[str, str, str]:
    """The flow's output, its flow run id and its final state type."""
    output = flow.communicate(timeout=600)[0]
    last = [line for line in output.splitlines() if line.startswith("flow run ")][-1].split()
    return output, last[2], last[3]


def train_states(env, flow_run_id: str) -> list[list[str]]:
    """The state names of each run of the flow's `train` task (one list per task run, oldest state first)."""
    api = httpx.Client(base_url=env["PREFECT_API_URL"], timeout=30)
    body = {"flow_runs": {"id": {"any_": [flow_run_id]}}, "task_runs": {"name": {"any_": ["train"]}}}
    task_runs = api.post("/task_runs/filter", json=body).json()
    states = []
    for task_run in task_runs:
        history = api.get("/task_run_states/", params={"task_run_id": task_run["id"]}).json()
        states.append([s["name"] for s in sorted(history, key=lambda s: s["timestamp"])])
    return states


def kill_training_once(flow: subprocess.Popen, timeout: float = 300) -> None:
    """SIGKILL the train stage's python as soon as it runs, as the kernel's OOM killer or a lost node would."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert flow.poll() is None, "the flow ended before training started"
        stages = stage_processes(flow.pid, "train")
        if stages:
            stages[0].send_signal(signal.SIGKILL)
            return
        time.sleep(0.05)
    pytest.fail("the train stage never started")


def test_a_killed_training_is_retried_and_the_run_completes(trained_project, prefect_env):
    version_before = int(json.loads((trained_project / "registered.json").read_text())["version"])
    write_params(trained_project, merge(tiny_params(), {"train": {"seed": 3, "max_steps": 30}}))  # a new model
    flow = start_flow(trained_project, prefect_env)
    kill_training_once(flow)
    output, flow_run_id, final = finished(flow)
    assert final == "COMPLETED", output[-3000:]
    (states,) = train_states(prefect_env, flow_run_id)
    assert states[-1] == "Completed" and states.count("AwaitingRetry") == 1, states
    # The kill, reported by DVC, then retried: -9 where the stage's shell exec'd python (bash), 137 where the shell
    # outlived it and exited 128 + SIGKILL (dash, DVC's shell when $SHELL is unset, as in CI).
    assert re.search(r"exited with (-9|137)$", output, re.MULTILINE), output[-6000:]
    assert int(json.loads((trained_project / "registered.json").read_text())["version"]) == version_before + 1


def test_bad_input_is_not_retried(trained_project, prefect_env):
    write_params(trained_project, merge(tiny_params(), {"train": {"learning_rate": 0}}))
    output, flow_run_id, final = finished(start_flow(trained_project, prefect_env))
    assert final == "FAILED"
    (states,) = train_states(prefect_env, flow_run_id)
    assert states[-1] == "Failed" and "AwaitingRetry" not in states, states
    assert "error: params.yaml: train.learning_rate: input should be greater than 0 (got 0)" in output
