"""The deployment as a team runs it: real PostgreSQL, a real MLflow server, a real Prefect server and worker.

PostgreSQL backs both servers; MLflow proxies artifacts (clients upload over HTTP); the training-pipeline
deployment comes from prefect.yaml via `prefect deploy` and runs on a process work pool. Runs are triggered
through Prefect's REST API with overrides. Skip locally with `-m "not servers"`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import BIN, copy_project, merge, run, tiny_params, tool_env, write_params
from tests.servers import LOOPBACK, free_port, postgres, process, still_running, stop_group, wait_http

pytestmark = [pytest.mark.slow, pytest.mark.servers]

POOL = "gpt2-local"
COMMITTED_STEPS = 40
TINY_MODEL = {"model.config.n_layer": 1, "train.max_steps": 30}  # the override each deployment run passes


class Stack:
    """The servers' addresses, the client environment and the project the worker runs in."""

    def __init__(self, project: Path, mlflow_url: str, prefect_url: str, env: dict[str, str]):
        self.project, self.mlflow_url, self.prefect_url, self.env = project, mlflow_url, prefect_url, env
        self.api = httpx.Client(base_url=prefect_url, timeout=30)

    def deployment(self, name: str) -> dict:
        response = self.api.get(f"/deployments/name/{name}")
        response.raise_for_status()
        return response.json()

    def trigger(self, name: str, parameters: dict) -> str:
        deployment = self.deployment(name)["id"]
        response = self.api.post(f"/deployments/{deployment}/create_flow_run", json={"parameters": parameters})
        response.raise_for_status()
        return response.json()["id"]

    def wait_completed(self, flow_run_id: str, timeout: float = 900) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            flow_run = self.api.get(f"/flow_runs/{flow_run_id}").json()
            state = flow_run["state"]["type"]
            if state == "COMPLETED":
                return flow_run
            if state in ("FAILED", "CRASHED", "CANCELLED"):
                pytest.fail(f"flow run {flow_run['name']} ended {state}: {flow_run['state']['message']}")
            time.sleep(2)
        pytest.fail(f"flow run {flow_run_id} not completed in {timeout:.0f} s")

    def state_names(self, flow_run_id: str) -> list[str]:
        states = self.api.get("/flow_run_states/", params={"flow_run_id": flow_run_id}).json()
        return [state["name"] for state in sorted(states, key=lambda s: s["timestamp"])]

    def aliases(self) -> dict[str, str]:
        # The REST store gives versions as strings, the SQL store as ints: compare strings.
        return {alias: str(v) for alias, v in self.mlflow().get_registered_model("gpt2-lm").aliases.items()}

    def mlflow(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.mlflow_url, registry_uri=self.mlflow_url)

    def cli(self, *args: str) -> str:
        return run(list(args), self.project, env=self.env).stdout


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    base = tmp_path_factory.mktemp("servers")
    project = copy_project(base)
    write_params(
        project,
        merge(tiny_params(), {"train": {"max_steps": COMMITTED_STEPS, "eval_steps": 20, "checkpoint_every": 20}}),
    )
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "tiny params"], project)
    mlflow_port, prefect_port = free_port(), free_port()
    env = {
        **tool_env(),
        "MLFLOW_TRACKING_URI": f"http://{LOOPBACK}:{mlflow_port}",
        "PREFECT_API_URL": f"http://{LOOPBACK}:{prefect_port}/api",
        "PREFECT_HOME": str(base / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    with postgres(("mlflow", "prefect")) as databases:
        mlflow_cmd = [
            str(BIN / "mlflow"), "server", "--host", LOOPBACK, "--port", str(mlflow_port), "--workers", "1",
            "--backend-store-uri", databases["mlflow"].replace("postgresql://", "postgresql+psycopg2://"),
            "--artifacts-destination", str(base / "artifact-store"),
        ]  # fmt: skip
        prefect_env = {
            **env,
            "PREFECT_API_DATABASE_CONNECTION_URL": databases["prefect"].replace(
                "postgresql://", "postgresql+asyncpg://"
            ),
        }
        prefect_cmd = [str(BIN / "prefect"), "server", "start", "--host", LOOPBACK, "--port", str(prefect_port)]
        with (
            process(mlflow_cmd, base / "mlflow.log", env) as mlflow_server,
            process(prefect_cmd, base / "prefect.log", prefect_env) as prefect_server,
        ):
            wait_http(f"{env['MLFLOW_TRACKING_URI']}/health", mlflow_server, base / "mlflow.log")
            wait_http(f"{env['PREFECT_API_URL']}/health", prefect_server, base / "prefect.log")
            stack = Stack(project, env["MLFLOW_TRACKING_URI"], env["PREFECT_API_URL"], env)
            stack.cli(str(BIN / "prefect"), "work-pool", "create", POOL, "--type", "process")
            stack.cli(str(BIN / "prefect"), "--no-prompt", "deploy", "--all")
            worker_cmd = [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process"]
            with process(worker_cmd, base / "worker.log", env, cwd=project) as worker:
                stack.worker = worker
                yield stack
                started = psutil.Process().children(recursive=True)  # servers, worker, flow runs, stages
        postgres_port = int(databases["mlflow"].rsplit(":", 1)[1].split("/")[0])
    left = still_running(started, [mlflow_port, prefect_port, postgres_port])
    assert left == [], f"left behind: {left}"


def test_deployment_is_scheduled_with_a_concurrency_limit(stack):
    deployment = stack.deployment("training-pipeline/nightly")
    assert deployment["work_pool_name"] == POOL
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * *"]
    assert deployment["global_concurrency_limit"]["limit"] == 1
    assert deployment["parameters"] == {"overrides": {}, "promote": True}


def test_kubernetes_pool_accepts_the_job_template_and_the_gpu_deployment(stack):
    template = stack.project / "infra/k8s/base-job-template.json"
    stack.cli(str(BIN / "prefect"), "work-pool", "create", "gpt2-k8s", "--type", "kubernetes",
              "--base-job-template", str(template))  # fmt: skip
    env = {**stack.env, "GPT2_PIPELINE_IMAGE": "registry.example/gpt2-pipeline:1"}
    deploy = [
        str(BIN / "prefect"),
        "--no-prompt",
        "deploy",
        "--prefect-file",
        "infra/prefect.yaml",
        "-n",
        "nightly-k8s",
    ]
    run(deploy, stack.project, env=env)
    deployment = stack.deployment("training-pipeline/nightly-k8s")
    assert deployment["work_pool_name"] == "gpt2-k8s"
    assert deployment["job_variables"]["gpus"] == 8
    assert deployment["job_variables"]["image"] == "registry.example/gpt2-pipeline:1"
    assert deployment["parameters"]["overrides"] == {"train.num_processes": 8}


def test_a_triggered_run_registers_a_model_that_loads_from_the_server(stack):
    flow_run = stack.wait_completed(
        stack.trigger("training-pipeline/nightly", {"overrides": {**TINY_MODEL, "train.seed": 1}})
    )

    client = stack.mlflow()
    (version,) = client.search_model_versions("name='gpt2-lm'")
    assert stack.aliases() == {"challenger": "1", "champion": "1"}
    assert version.tags["prefect_flow_run_id"] == flow_run["id"]
    params = client.get_run(version.run_id).data.params
    assert (params["train.max_steps"], params["model.config.n_layer"]) == ("30", "1")
    assert json.loads(params["overrides"]) == {**TINY_MODEL, "train.seed": 1}
    assert client.get_run(version.run_id).info.artifact_uri.startswith("mlflow-artifacts:/")  # uploaded over HTTP

    import mlflow

    # Earlier tests in this process may have set MLflow's global URIs; this load must go to the server.
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(stack.mlflow_url)
    mlflow.set_registry_uri(stack.mlflow_url)
    try:
        pipe = mlflow.transformers.load_model("models:/gpt2-lm@champion")
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
    assert pipe.model.config.n_layer == 1
    text = pipe("ROMEO:", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")
    # The project's own params.yaml is untouched by the override.
    assert run(["git", "status", "--porcelain", "params.yaml"], stack.project).stdout == ""


def test_two_runs_at_once_serialize_and_register_two_versions(stack):
    ids = [
        stack.trigger("training-pipeline/nightly", {"overrides": {**TINY_MODEL, "train.seed": seed}}) for seed in (2, 3)
    ]
    runs = sorted((stack.wait_completed(i, timeout=1200) for i in ids), key=lambda r: r["start_time"])
    assert runs[0]["end_time"] <= runs[1]["start_time"], "the two runs trained at the same time"
    assert "AwaitingConcurrencySlot" in stack.state_names(runs[1]["id"])

    client = stack.mlflow()
    by_run = {v.tags["prefect_flow_run_id"]: str(v.version) for v in client.search_model_versions("name='gpt2-lm'")}
    assert sorted(by_run[i] for i in ids) == ["2", "3"]


def test_plain_dvc_repro_afterwards_uses_the_committed_params(stack):
    stack.cli(str(BIN / "dvc"), "repro")
    registered = json.loads((stack.project / "registered.json").read_text())
    params = stack.mlflow().get_run(registered["run_id"]).data.params
    assert (params["train.max_steps"], params["overrides"]) == (str(COMMITTED_STEPS), "{}")
    assert registered["version"] == "4"


def test_serve_serves_the_same_deployments(stack):
    # Serving and a work pool are two ways to run the same deployments; switch from one to the other.
    stop_group(stack.worker)
    for name in ("training-pipeline/nightly", "promote-model/on-demand"):
        stack.api.delete(f"/deployments/{stack.deployment(name)['id']}").raise_for_status()
    log = stack.project.parent / "serve.log"
    with process([str(BIN / "gpt2-pipeline"), "serve"], log, stack.env, cwd=stack.project):
        deadline = time.monotonic() + 120
        while "being served" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        nightly = stack.deployment("training-pipeline/nightly")
        assert nightly["work_pool_name"] is None and nightly["parameters"] == {"overrides": {}, "promote": True}
        assert nightly["global_concurrency_limit"]["limit"] == 1
        assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 3 * * *"]
        flow_run = stack.wait_completed(stack.trigger("promote-model/on-demand", {"workdir": "."}), timeout=180)
    assert flow_run["name"] in log.read_text()
    aliases = stack.aliases()
    assert aliases["challenger"] == "4" and "champion" in aliases
