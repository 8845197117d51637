"""The deployment as a team runs it: real PostgreSQL, a real MLflow server, a real Prefect server and worker.

PostgreSQL backs both servers; MLflow proxies artifacts (clients upload over HTTP); the training-pipeline
deployment comes from prefect.yaml via `prefect deploy` and runs on a process work pool. Runs are triggered
through Prefect's REST API with overrides. The module's fixture plays a team's day once (deploy, two runs
triggered at once, then `gpt2-pipeline serve` in place of the worker) and records what happened; each test
checks one part of it, so any of them runs alone. Skip locally with `-m "not servers"`.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from tests.helpers import BIN, commit, mlflow_on, run, tool_env, trained_copy
from tests.servers import (
    LOOPBACK,
    PG_PASSWORD,
    free_port,
    mlflow_server,
    postgres,
    process,
    still_running,
    stop_group,
    wait_http,
)

pytestmark = [pytest.mark.slow, pytest.mark.servers]

POOL = "gpt2-local"
PREFECT_AUTH = "admin:test-only-prefect-auth"
TINY_MODEL = {"model.config.n_layer": 1, "train.max_steps": 30}  # the override each deployment run passes
# The study both sweep workers share: three trials of a 30-step training, none pruned (the pruner waits for three
# finished trials), the storage's password from PGPASSWORD rather than the file.
SWEEP = {
    "study": "shared",
    "trials": 3,
    "startup_trials": 3,
    "space": {"train.learning_rate": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True}},
}


class Stack:
    """The servers' addresses, the client environment and the project the worker runs in."""

    def __init__(self, project: Path, mlflow_url: str, prefect_url: str, env: dict[str, str]):
        self.project, self.mlflow_url, self.prefect_url, self.env = project, mlflow_url, prefect_url, env
        user, _, password = env["PREFECT_API_AUTH_STRING"].partition(":")
        self.api = httpx.Client(base_url=prefect_url, timeout=30, auth=(user, password))
        self.outcomes: dict[str, object] = {}

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

    def scheduled_runs(self, name: str, at_least: int, timeout: float = 90) -> list[dict]:
        """The deployment's SCHEDULED flow runs, once the server's scheduler has made at_least of them."""
        body = {
            "deployments": {"id": {"any_": [self.deployment(name)["id"]]}},
            "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
            "sort": "EXPECTED_START_TIME_ASC",
        }
        deadline = time.monotonic() + timeout
        while True:
            found = self.api.post("/flow_runs/filter", json=body).json()
            if len(found) >= at_least or time.monotonic() > deadline:
                return found
            time.sleep(1)

    def version_of(self, flow_run_id: str) -> str:
        (version,) = self.mlflow().search_model_versions(f"name='gpt2-lm' and tags.prefect_flow_run_id='{flow_run_id}'")
        return str(version.version)

    def aliases(self) -> dict[str, str]:
        # The REST store gives versions as strings, the SQL store as ints: compare strings.
        return {alias: str(v) for alias, v in self.mlflow().get_registered_model("gpt2-lm").aliases.items()}

    def mlflow(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.mlflow_url, registry_uri=self.mlflow_url)

    def cli(self, *args: str) -> str:
        return run(list(args), self.project, env=self.env).stdout


@pytest.fixture(scope="module")
def stack(golden, tmp_path_factory):
    base = tmp_path_factory.mktemp("servers")
    project = trained_copy(golden, base)  # committed, its prepared and tokenized data in the DVC cache already
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
        "PREFECT_API_AUTH_STRING": PREFECT_AUTH,  # every client: the CLI, deploy, the worker, the flows
        "PGPASSWORD": PG_PASSWORD,  # the sweep's storage URI names no password
    }
    ours = {p.pid for p in psutil.Process().children(recursive=True)}  # e.g. the session's Prefect server
    with postgres(("mlflow", "prefect", "optuna")) as databases:
        backend = databases["mlflow"].replace("postgresql://", "postgresql+psycopg2://")
        prefect_env = {
            **env,
            "PREFECT_API_DATABASE_CONNECTION_URL": databases["prefect"].replace(
                "postgresql://", "postgresql+asyncpg://"
            ),
            "PREFECT_SERVER_API_AUTH_STRING": PREFECT_AUTH,  # API auth on, as infra/ runs it
        }
        prefect_cmd = [str(BIN / "prefect"), "server", "start", "--host", LOOPBACK, "--port", str(prefect_port)]
        with (
            mlflow_server(mlflow_port, backend, base / "artifact-store", base / "mlflow.log", env) as mlflow_proc,
            process(prefect_cmd, base / "prefect.log", prefect_env) as prefect_server,
        ):
            wait_http(f"{env['MLFLOW_TRACKING_URI']}/health", mlflow_proc, base / "mlflow.log")
            wait_http(f"{env['PREFECT_API_URL']}/health", prefect_server, base / "prefect.log")
            stack = Stack(project, env["MLFLOW_TRACKING_URI"], env["PREFECT_API_URL"], env)
            stack.golden = golden  # for a second host's copy of the project
            stack.optuna_url = databases["optuna"].replace(f":{PG_PASSWORD}@", "@")
            stack.cli(str(BIN / "prefect"), "work-pool", "create", POOL, "--type", "process")
            stack.cli(str(BIN / "prefect"), "--no-prompt", "deploy", "--all")
            worker_cmd = [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process"]
            with process(worker_cmd, base / "worker.log", env, cwd=project) as worker:
                a_day_of_work(stack, worker)
                yield stack
                started = [p for p in psutil.Process().children(recursive=True) if p.pid not in ours]
        postgres_port = int(databases["mlflow"].rsplit(":", 1)[1].split("/")[0])
    left = still_running(started, [mlflow_port, prefect_port, postgres_port])
    assert left == [], f"left behind: {left}"


def a_day_of_work(stack: Stack, worker) -> None:
    """What the tests check, in the order a team does it; each outcome recorded in stack.outcomes."""
    seen = stack.outcomes
    anonymous = httpx.Client(base_url=stack.prefect_url, timeout=30)
    seen["without auth"] = [anonymous.get("/deployments/name/training-pipeline/nightly").status_code,
                            anonymous.get("/health").status_code]  # fmt: skip
    seen["nightly"] = stack.deployment("training-pipeline/nightly")
    seen["scheduled"] = stack.scheduled_runs("training-pipeline/nightly", at_least=3)
    seen["checked at"] = datetime.datetime.now(datetime.UTC)

    # Two runs triggered at once: the concurrency limit makes the second wait for the first. The seed-1 run
    # promotes its model (the deployment's default); the other leaves it to the on-demand deployment served below.
    parameters = [{"overrides": {**TINY_MODEL, "train.seed": seed}, "promote": seed == 1} for seed in (1, 2)]
    ids = [stack.trigger("training-pipeline/nightly", p) for p in parameters]
    # Meanwhile another host (a second copy of the project) trains the project's own bigger model (2 layers, 60
    # steps) against the same servers and promotes it: two promotions, each of its own pipeline's version, take
    # turns on the server's limit.
    other = stack.project.parent / "host-b"
    other.mkdir()
    host_b = trained_copy(stack.golden, other)
    overrides = ["--set=train.seed=3", "--set=train.max_steps=60"]
    log, command = other / "run.log", [str(BIN / "gpt2-pipeline"), "run", *overrides, "--promote"]
    with process(command, log, stack.env, cwd=host_b) as host:
        runs = sorted((stack.wait_completed(i, timeout=1200) for i in ids), key=lambda r: r["start_time"])
        seen["host b exit"] = host.wait(timeout=1200)
    seen["host b log"] = log.read_text()
    seen["host b version"] = json.loads(next((host_b / ".runs").glob("*/registered.json")).read_text())["version"]
    seen["aliases after both"] = stack.aliases()
    seen["triggered"], seen["waited"] = runs
    seen["seed"] = parameters[ids.index(runs[0]["id"])]["overrides"]["train.seed"]
    seen["waited states"] = stack.state_names(runs[1]["id"])
    seen["versions"] = [stack.version_of(r["id"]) for r in runs]
    seen["promoting version"] = stack.version_of(ids[0])

    sweep_on_two_hosts(stack)

    # Serving and a work pool are two ways to run the same deployments; switch from one to the other.
    stop_group(worker)
    for name in ("training-pipeline/nightly", "promote-model/on-demand"):
        stack.api.delete(f"/deployments/{stack.deployment(name)['id']}").raise_for_status()
    log = stack.project.parent / "serve.log"
    with process([str(BIN / "gpt2-pipeline"), "serve"], log, stack.env, cwd=stack.project):
        deadline = time.monotonic() + 120
        while "being served" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        seen["served nightly"] = stack.deployment("training-pipeline/nightly")
        promoted = stack.trigger("promote-model/on-demand", {"workdir": "."})
        seen["served promotion"] = stack.wait_completed(promoted, timeout=180)
    seen["serve log"], seen["aliases after serve"] = log.read_text(), stack.aliases()


def sweep_on_two_hosts(stack: Stack) -> None:
    """One study in PostgreSQL, two workers: the sweep deployment on the work pool (this project) and `gpt2-pipeline
    sweep --resume` on host c, killed with SIGKILL once its first trial runs and started again with --resume."""
    seen = stack.outcomes
    host_c = trained_copy(stack.golden, stack.project.parent / "host-c")
    for host in (stack.project, host_c):
        params = yaml.safe_load((host / "params.yaml").read_text())
        params["sweep"].update(SWEEP, storage=stack.optuna_url)
        params["train"].update(max_steps=30, eval_steps=10)
        if host == host_c:  # its best trial is registered: under a name of its own, gpt2-lm's aliases stay as they are
            params["register"]["model_name"] = "gpt2-sweep"
        (host / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        commit(host, "sweep settings")
    flow_run = stack.trigger("sweep/worker", {})
    command, log = [str(BIN / "gpt2-pipeline"), "sweep", "--resume"], host_c / "sweep.log"
    with process(command, log, stack.env, cwd=host_c) as worker:
        deadline = time.monotonic() + 600
        while not re.search(r"Task run 'trial \d+' - trial \d+: ", log.read_text()):  # its trial's dvc exp run
            assert worker.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
    seen["sweep killed log"] = log.read_text()
    seen["sweep resumed"] = run([*command, "--register-best"], host_c, env=stack.env, check=False)
    seen["sweep best file"] = yaml.safe_load((host_c / "params/shared-best.yaml").read_text())
    seen["sweep flow run"] = stack.wait_completed(flow_run, timeout=1200)
    import optuna

    # This process has no PGPASSWORD: the password in the URL; psycopg2 named (SQLAlchemy 2.1 takes psycopg 3)
    storage = stack.optuna_url.replace("postgresql://", "postgresql+psycopg2://").replace("@", f":{PG_PASSWORD}@")
    study = optuna.load_study(study_name=SWEEP["study"], storage=storage)
    seen["sweep trials"] = [(t.number, t.state.name, t.params, t.user_attrs.get("retry_of")) for t in study.trials]
    seen["sweep parent"] = study.user_attrs["mlflow_run_id"]
    seen["sweep runs"] = stack.mlflow().search_runs(
        [stack.mlflow().get_experiment_by_name("gpt2-pipeline").experiment_id], "tags.sweep_study = 'shared'"
    )
    seen["sweep experiments"] = [
        run([str(BIN / "dvc"), "exp", "ls", "--name-only"], h).stdout.split() for h in (stack.project, host_c)
    ]


def next_three_am(after: datetime.datetime, count: int) -> list[datetime.datetime]:
    day = after.replace(hour=3, minute=0, second=0, microsecond=0)
    day += datetime.timedelta(days=1) if day <= after else datetime.timedelta(0)
    return [day + datetime.timedelta(days=n) for n in range(count)]


def test_the_prefect_api_refuses_a_caller_without_the_auth_string(stack):
    assert stack.outcomes["without auth"] == [401, 200]  # the health probe stays open, as Kubernetes needs


def test_nightly_deployment_schedules_runs_at_3_utc_one_at_a_time(stack):
    deployment = stack.outcomes["nightly"]
    assert deployment["work_pool_name"] == POOL
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * *"]
    assert deployment["global_concurrency_limit"]["limit"] == 1
    assert deployment["parameters"] == {"overrides": {}, "promote": True}
    # The server's scheduler has put the next nights' runs in the queue, each at 03:00 UTC.
    starts = [datetime.datetime.fromisoformat(r["expected_start_time"]) for r in stack.outcomes["scheduled"]]
    assert len(starts) >= 3
    assert starts[:3] == next_three_am(stack.outcomes["checked at"] - datetime.timedelta(minutes=5), 3)
    assert {r["deployment_id"] for r in stack.outcomes["scheduled"]} == {deployment["id"]}


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
    flow_run, version_id = stack.outcomes["triggered"], stack.version_of(stack.outcomes["triggered"]["id"])
    client = stack.mlflow()
    version = client.get_model_version("gpt2-lm", version_id)
    assert version.tags["prefect_flow_run_id"] == flow_run["id"]
    params = client.get_run(version.run_id).data.params
    assert (params["train.max_steps"], params["model.config.n_layer"]) == ("30", "1")
    assert json.loads(params["overrides"]) == {**TINY_MODEL, "train.seed": stack.outcomes["seed"]}
    assert client.get_run(version.run_id).info.artifact_uri.startswith("mlflow-artifacts:/")  # uploaded over HTTP

    with mlflow_on(stack.mlflow_url) as mlflow:
        pipe = mlflow.transformers.load_model(f"models:/gpt2-lm/{version_id}")
    assert pipe.model.config.n_layer == 1
    text = pipe("ROMEO:", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")
    # The project's own params.yaml is untouched by the override.
    assert run(["git", "status", "--porcelain", "params.yaml"], stack.project).stdout == ""


def test_two_runs_at_once_serialize_and_register_two_versions(stack):
    first, second = stack.outcomes["triggered"], stack.outcomes["waited"]
    assert first["end_time"] <= second["start_time"], "the two runs trained at the same time"
    assert "AwaitingConcurrencySlot" in stack.outcomes["waited states"]
    versions = [int(v) for v in stack.outcomes["versions"]]
    assert versions[0] < versions[1]  # host b's version may come between them


def test_serve_serves_the_same_deployments(stack):
    nightly = stack.outcomes["served nightly"]
    assert nightly["work_pool_name"] is None and nightly["parameters"] == {"overrides": {}, "promote": True}
    assert nightly["global_concurrency_limit"]["limit"] == 1
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 3 * * *"]
    assert stack.outcomes["served promotion"]["name"] in stack.outcomes["serve log"]
    # The served promotion judged @challenger (the last version registered) against the better host-b champion.
    assert stack.outcomes["aliases after serve"]["champion"] == stack.outcomes["host b version"]
    assert "not promoted" in stack.outcomes["serve log"]


def test_two_hosts_promote_their_own_versions_in_turn_and_the_better_one_is_champion(stack):
    """A deployment run and a run on another host's copy, against the same servers, each with its promotion: each
    judged the version its pipeline registered, under the server's limit, and @champion is the better model."""
    ours, theirs = stack.outcomes["promoting version"], stack.outcomes["host b version"]
    assert stack.outcomes["host b exit"] == 0, stack.outcomes["host b log"][-3000:]  # 0: its version is @champion
    assert stack.outcomes["aliases after both"]["champion"] == theirs != ours
    client = stack.mlflow()
    tags = {v: client.get_model_version("gpt2-lm", v).tags for v in (ours, theirs)}
    assert float(tags[theirs]["eval_bits_per_byte"]) < float(tags[ours]["eval_bits_per_byte"])
    # Whichever promotion came second judged its own version against the first's champion.
    judged = {v: tags[v]["promotion_promoted"] for v in (ours, theirs)}
    assert judged[theirs] == "True" and judged[ours] in ("True", "False")
    limit = stack.api.get("/v2/concurrency_limits/promote-gpt2-lm").json()
    assert (limit["limit"], limit["active_slots"]) == (1, 0)


def test_a_card_over_the_registry_limit_is_cut_to_fit_postgresql(stack):
    """PostgreSQL keeps at most 5,000 characters of a description (SQLite keeps any): a card past that fails
    registration as it is, and is stored whole once cut to the limit, its note saying where the full card is."""
    from mlflow.exceptions import MlflowException

    from tasks.tracking.registry import CUT_NOTE, MAX_DESCRIPTION, within_limit

    client = stack.mlflow()
    card = "# long-card\n\n" + "\n\n".join(f"```text\n{'x' * 700}\n```" for _ in range(9))
    client.create_registered_model("long-card")
    run_id = client.create_run(client.get_experiment_by_name("Default").experiment_id).info.run_id
    made = {"source": f"runs:/{run_id}/model", "run_id": run_id}
    with pytest.raises(MlflowException):
        client.create_model_version("long-card", description=card, **made)
    version = client.create_model_version("long-card", description=within_limit(card), **made)
    stored = client.get_model_version("long-card", version.version).description
    assert len(card) > MAX_DESCRIPTION >= len(stored) and stored == within_limit(card) and stored.endswith(CUT_NOTE)
    client.update_registered_model("long-card", description=within_limit(f"@champion is version 1.\n\n{card}"))
    assert client.get_registered_model("long-card").description.endswith(CUT_NOTE)


def test_two_sweep_workers_share_one_postgresql_study_through_a_kill(stack):
    """Two workers (the sweep deployment, and the CLI on another host killed with SIGKILL mid-trial, then resumed)
    fill one PostgreSQL study with exactly sweep.trials finished trials: distinct, none lost or run twice; the
    killed trial failed in Optuna and MLflow and run again once with its params; one parent run over all."""
    seen = stack.outcomes
    assert seen["sweep resumed"].returncode == 0, seen["sweep resumed"].stdout[-3000:] + seen["sweep resumed"].stderr
    trials = seen["sweep trials"]
    assert sorted(state for _, state, _, _ in trials) == ["COMPLETE"] * 3 + ["FAIL"]
    (failed,) = [t for t in trials if t[1] == "FAIL"]
    (retry,) = [t for t in trials if t[3] is not None]
    assert retry[3] == failed[0] and retry[2] == failed[2] and retry[1] == "COMPLETE"
    runs = seen["sweep runs"]
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.run_id for p in parents] == [seen["sweep parent"]] and parents[0].info.status == "FINISHED"
    children = {}
    for r in runs:
        if r.data.tags.get("mlflow.parentRunId") == seen["sweep parent"]:
            children.setdefault(int(r.data.tags["sweep_trial"]), []).append(r)
    finished = {number for number, state, _, _ in trials if state == "COMPLETE"}
    assert finished <= set(children) and len(children[failed[0]]) >= 1
    for number, made in children.items():
        statuses = {(r.info.status, r.data.tags.get("sweep_state")) for r in made}
        assert statuses == ({("FINISHED", "complete")} if number in finished else {("FAILED", "failed")}), number
    # Every finished trial is a DVC experiment on the host that ran it; the killed one left none.
    experiments = [name for names in seen["sweep experiments"] for name in names]
    assert sorted(experiments) == sorted(f"shared-{n}" for n in finished)
    assert PG_PASSWORD not in seen["sweep killed log"] + seen["sweep resumed"].stdout + seen["sweep resumed"].stderr


def test_the_resumed_sweep_worker_registers_its_best_trial_through_the_pipeline(stack):
    """--register-best: the best trial's params (printed, and written as a params file) go through the pipeline flow,
    whose register stage makes the version: its run trained with those params."""
    output = stack.outcomes["sweep resumed"].stdout + stack.outcomes["sweep resumed"].stderr  # Prefect's log lines
    best = re.search(r"best: trial (\d+), bits_per_byte ([\d.]+), params (\{.*\})$", output, re.M)
    assert best, output[-3000:]
    learning_rate = float(re.search(r"'train.learning_rate': ([\d.e-]+)", best.group(3)).group(1))
    assert stack.outcomes["sweep best file"]["train"]["learning_rate"] == pytest.approx(learning_rate)
    client = stack.mlflow()
    (version,) = client.search_model_versions("name='gpt2-sweep'")
    trained = client.get_run(version.run_id)
    assert float(trained.data.params["train.learning_rate"]) == pytest.approx(learning_rate)
    assert trained.info.status == "FINISHED" and version.description.startswith("# gpt2-sweep")
    assert client.get_model_version_by_alias("gpt2-sweep", "challenger").version == version.version
