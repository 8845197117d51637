"""infra/ and prefect.yaml: no Docker engine or cluster runs here, so check that every file parses and that
every service, volume, variable, parameter and template placeholder it names exists."""

from __future__ import annotations

import copy
import inspect
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from flows.deployments import load_deployments, runner_deployments
from tasks.plumbing.params import parse_params
from tests.helpers import ROOT

INFRA = ROOT / "infra"


def compose() -> dict:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


def test_compose_references_only_services_and_volumes_it_defines():
    config = compose()
    services = config["services"]
    for name, service in services.items():
        depends = service.get("depends_on", [])
        assert set(depends) <= set(services), f"{name} depends on an unknown service"
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (INFRA / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in config["volumes"], f"{name} uses undeclared volume {source}"
        if "build" in service:
            assert (ROOT / service["build"]["dockerfile"]).is_file()
    assert {"postgres", "minio", "mlflow", "prefect-server", "worker"} <= set(services)
    assert "--app-name basic-auth" in services["mlflow"]["command"]


def test_compose_credentials_come_only_from_documented_variables():
    text = (INFRA / "docker-compose.yml").read_text()
    used = set(re.findall(r"(?<!\$)\$\{(\w+)", text))
    documented = {line.split("=")[0] for line in (INFRA / ".env.example").read_text().splitlines() if "=" in line}
    assert used == documented
    assert all(line.endswith("=") for line in (INFRA / ".env.example").read_text().splitlines() if "=" in line)
    # $$NAME is expanded inside the container: it must be in that service's environment.
    for name, service in compose()["services"].items():
        command = service.get("command", "") + service.get("entrypoint", "")
        for variable in re.findall(r"\$\$(\w+)", command):
            assert variable in service.get("environment", {}), f"{name}: ${variable} is not in its environment"
    assert "password" not in (INFRA / "mlflow/basic_auth.ini").read_text().split("[mlflow]")[1]


@pytest.mark.skipif(
    shutil.which("docker") is None
    or subprocess.run(["docker", "compose", "version"], capture_output=True, check=False).returncode != 0,
    reason="no docker compose plugin here",
)
def test_docker_compose_config_accepts_the_file():
    names = [line.split("=")[0] for line in (INFRA / ".env.example").read_text().splitlines() if "=" in line]
    env = {**{name: "x" for name in names}, "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        ["docker", "compose", "-f", str(INFRA / "docker-compose.yml"), "config", "--quiet"],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_job_template_placeholders_are_declared_variables_and_it_asks_for_gpus():
    template = json.loads((INFRA / "k8s/base-job-template.json").read_text())
    placeholders = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(template["job_configuration"])))
    assert placeholders == set(template["variables"]["properties"])
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"


def test_deployments_name_real_flows_parameters_and_template_variables():
    variables = json.loads((INFRA / "k8s/base-job-template.json").read_text())["variables"]["properties"]
    for path in (ROOT / "prefect.yaml", INFRA / "prefect.yaml"):
        for entry in load_deployments(path):
            from prefect.flows import load_flow_from_entrypoint

            flow = load_flow_from_entrypoint(str(ROOT / entry["entrypoint"]))
            accepted = set(inspect.signature(flow.fn).parameters)
            assert set(entry.get("parameters", {})) <= accepted, f"{path}: {entry['name']}"
            if entry["work_pool"]["name"] == "gpt2-k8s":
                assert set(entry["work_pool"]["job_variables"]) <= set(variables)
    served = {d.name: d for d in runner_deployments(ROOT / "prefect.yaml")}
    assert served["nightly"].concurrency_limit == 1 and served["nightly"].parameters["promote"] is True


def test_multinode_job_rendezvous_names_its_own_service_and_sizes_agree():
    service, job = yaml.safe_load_all((INFRA / "k8s/train-multinode.yaml").read_text())
    spec = job["spec"]["template"]["spec"]
    container = spec["containers"][0]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert spec["subdomain"] == service["metadata"]["name"] == service["spec"]["selector"]["job-name"]
    assert env["MASTER_ADDR"] == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert env["MASTER_PORT"] == str(service["spec"]["ports"][0]["port"])
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == int(env["NODES"])
    script = container["args"][0]
    assert "python -m tasks.train || status=$?" in script and not re.search(r"^\s*torchrun", script, re.M)
    subprocess.run(["sh", "-n", "-c", script], check=True)  # the pod's shell parses it
    assert re.search(r"^\s+4\) echo", script, re.M)  # a pod without global rank 0 is not a failure
    assert container["resources"]["limits"]["nvidia.com/gpu"] == int(env["GPUS_PER_NODE"])


def test_the_image_installs_every_package_by_hash_torch_first_then_the_lock_without_its_cpu_torch():
    dockerfile = (INFRA / "Dockerfile").read_text()
    pin = re.search(r"^TORCH := (\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    gpu_lock = (INFRA / "requirements-gpu.lock").read_text()
    entries = re.findall(r"^([\w.-]+==\S+) \\\n    --hash=sha256:([0-9a-f]{64})$", gpu_lock, re.M)
    assert pin in dict(entries) and len(entries) == len(re.findall(r"^[\w.-]+==", gpu_lock, re.M))
    installs = re.findall(r"pip install ([^\n&]+)", dockerfile)
    assert installs and all("--require-hashes" in args or args.strip() == "--no-deps -e ." for args in installs)
    order = [dockerfile.index(step) for step in ("-r infra/requirements-gpu.lock", "COPY pyproject.toml", "-e .")]
    assert order == sorted(order)
    # The image's filter, run on the lock: every package but torch, each with its hashes.
    program = re.search(r"awk '([^']+)' requirements\.lock", dockerfile).group(1)
    kept = subprocess.run(["awk", program, str(ROOT / "requirements.lock")], capture_output=True, text=True, check=True)
    pins = re.findall(r"^([\w.-]+)==\S+(?: ; [^\n]+)? \\\n(?:    --hash=sha256:\w+(?: \\)?\n)+", kept.stdout, re.M)
    locked = re.findall(r"^([\w.-]+)==", (ROOT / "requirements.lock").read_text(), re.M)
    assert "torch" in locked and sorted(pins) == sorted(name for name in locked if name != "torch")
    for source in re.findall(r"^COPY (\S+) ", dockerfile, re.M):
        assert source == "." or (ROOT / source).exists(), source
    # The mlflow-auth volume takes its owner from the image's folder: the user the server runs as.
    assert re.search(r"mkdir -p [^\n]*/mlflow-auth", dockerfile) and re.search(
        r"chown -R pipeline [^\n]*/mlflow-auth", dockerfile
    )


# The python3 a distribution's own package gives, for a base image that installs it with apt.
DISTRIBUTION_PYTHON = {"ubuntu22.04": "3.10", "ubuntu24.04": "3.12", "bookworm": "3.11"}


def test_the_image_runs_the_python_its_locks_are_written_for():
    """requirements.lock is compiled for one Python (pip-compile's header), and the GPU lock's torch, triton and
    cuda-bindings are wheels for one Python too: the image's must be that one, or its installs fail."""
    from tools import gpu_lock

    base = re.search(r"^FROM (\S+)", (INFRA / "Dockerfile").read_text(), re.M).group(1)
    tagged = re.match(r"python:(\d+\.\d+)", base)
    distribution = [python for name, python in DISTRIBUTION_PYTHON.items() if base.endswith(name)]
    image = tagged.group(1) if tagged else (distribution or [f"unknown ({base})"])[0]
    lock = re.search(r"autogenerated by pip-compile with Python (\d+\.\d+)", (ROOT / "requirements.lock").read_text())
    gpu = re.search(
        r"^# Written by tools/gpu_lock\.py for Python (\d+\.\d+)", (INFRA / "requirements-gpu.lock").read_text()
    )
    assert lock and gpu
    assert (image, gpu.group(1), gpu_lock.IMAGE_PYTHON) == (lock.group(1),) * 3, f"the image's base: {base}"


ADMIN_SECRETS = {
    "MINIO_ROOT_USER",
    "MINIO_ROOT_PASSWORD",
    "MLFLOW_ADMIN_USER",
    "MLFLOW_ADMIN_PASSWORD",
    "POSTGRES_PASSWORD",
}


def test_compose_gives_each_service_only_its_own_credentials_and_limits():
    """Least privilege: the admin and root credentials reach only the servers that own them and the one-shot jobs
    that make the pipeline's users; the worker holds the pipeline's users alone. No password is on a command line,
    and every service has memory, CPU and process limits."""
    text = (INFRA / "docker-compose.yml").read_text()
    services = compose()["services"]
    holders = {
        name for name, service in services.items()
        if ADMIN_SECRETS & set(re.findall(r"\$\{(\w+)", yaml.safe_dump(service.get("environment", {}))))
    }  # fmt: skip
    assert holders == {"postgres", "minio", "minio-buckets", "mlflow", "mlflow-users"}
    worker = yaml.safe_dump(services["worker"]["environment"])
    assert "MLFLOW_PIPELINE_PASSWORD" in worker and "MINIO_PIPELINE_PASSWORD" in worker
    for name, service in services.items():
        command = str(service.get("command", "")) + str(service.get("entrypoint", ""))
        # A secret reaches a program through its environment or its input (the shell's printf is no process).
        programs = [part.strip() for part in re.split(r"&&|\|\|?|;", command)]
        leaks = [
            part for part in programs if re.search(r"PASSWORD|_URI\b|://\S*@", part) and not part.startswith("printf")
        ]
        assert leaks == [], f"{name}: a secret on a command line"
        limits = service["deploy"]["resources"]["limits"]
        assert {"cpus", "memory", "pids"} <= set(limits), f"{name}: no resource limits"
    assert services["worker"]["shm_size"] and "MLFLOW_BACKEND_STORE_URI" in services["mlflow"]["environment"]
    assert "${POSTGRES_PASSWORD" not in yaml.safe_dump(services["mlflow"]) + yaml.safe_dump(services["prefect-server"])
    assert "MC_HOST_local" in services["minio-buckets"]["environment"] and "mc alias set" not in text


def test_postgres_init_gives_each_server_a_database_of_its_own(tmp_path):
    """infra/postgres/init.sh on a real PostgreSQL, with passwords that need quoting: mlflow and prefect each log
    in to their own database and not to the other's."""
    from tests.servers import PG_PASSWORD, PG_USER, postgres, postgres_bin

    passwords = {"mlflow": "it's a 'quoted' pw", "prefect": 'p"r\\e $HOME ;'}
    with postgres(("scratch",)) as databases:
        port = databases["scratch"].rsplit(":", 1)[1].split("/")[0]
        psql_dir = str(postgres_bin())
        env = {"PATH": f"{psql_dir}:/usr/bin:/bin", "PGHOST": "127.0.0.1", "PGPORT": port,
               "PGPASSWORD": PG_PASSWORD, "POSTGRES_USER": PG_USER,
               "MLFLOW_DB_PASSWORD": passwords["mlflow"], "PREFECT_DB_PASSWORD": passwords["prefect"]}  # fmt: skip
        subprocess.run(["sh", str(INFRA / "postgres/init.sh")], env=env, check=True, capture_output=True)

        def connects(user: str, database: str) -> bool:
            login = {**env, "PGPASSWORD": passwords[user]}
            command = [f"{psql_dir}/psql", "-U", user, "-d", database, "-tAc", "select current_user"]
            result = subprocess.run(command, env=login, capture_output=True, text=True, check=False)
            return result.returncode == 0 and result.stdout.strip() == user

        assert connects("mlflow", "mlflow") and connects("prefect", "prefect")
        assert not connects("mlflow", "prefect") and not connects("prefect", "mlflow")


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector (matchLabels and matchExpressions) selects a pod with these labels."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    tests = {
        "In": lambda key, values: labels.get(key) in values,
        "NotIn": lambda key, values: labels.get(key) not in values,
        "Exists": lambda key, values: key in labels,
        "DoesNotExist": lambda key, values: key not in labels,
    }
    return all(
        tests[rule["operator"]](rule["key"], rule.get("values", [])) for rule in selector.get("matchExpressions", [])
    )


def admits(policies: list[dict], to: dict[str, str], source: dict[str, str], port: int) -> bool:
    """Whether a pod labelled `to` takes a TCP connection on `port` from a pod labelled `source` in its namespace,
    under these NetworkPolicies: isolated by every policy that selects it, admitted by any rule of those."""
    chosen = [
        p["spec"] for p in policies if "Ingress" in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"], to)
    ]
    rules = [rule for spec in chosen for rule in spec.get("ingress", [])]
    return not chosen or any(
        (
            "from" not in rule
            or any("podSelector" in peer and selects(peer["podSelector"], source) for peer in rule["from"])
        )
        and ("ports" not in rule or any(entry.get("port") in (None, port) for entry in rule["ports"]))
        for rule in rules
    )


def indexed_job_pods(job: dict) -> list[dict[str, str]]:
    """The labels of an Indexed Job's pods: its template's and the Job controller's (job-name: the Job's name)."""
    name, template = job["metadata"]["name"], job["spec"]["template"]["metadata"].get("labels", {})
    return [
        {**template, "job-name": name, "batch.kubernetes.io/job-name": name,
         "batch.kubernetes.io/job-completion-index": str(index)}
        for index in range(job["spec"]["completions"])
    ]  # fmt: skip


def trainjob_pods(trainjob: dict) -> list[dict[str, str]]:
    """The labels of a TrainJob's node pods, by Kubeflow Trainer's and JobSet's rules.

    Trainer builds a JobSet named as the TrainJob from the runtime (torch-distributed: one replicated job, `node`,
    numNodes pods); the JobSet controller labels every child Job and pod with jobset.sigs.k8s.io/jobset-name and
    replicatedjob-name, and names the child Job <jobset>-<replicated job>-<index>, which the Job controller puts in
    each pod's job-name."""
    name = trainjob["metadata"]["name"]
    (node,) = trainjob["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    child = f"{name}-{node['name']}-0"
    return [
        {**node["template"]["spec"]["template"]["metadata"].get("labels", {}),
         "jobset.sigs.k8s.io/jobset-name": name, "jobset.sigs.k8s.io/replicatedjob-name": node["name"],
         "jobset.sigs.k8s.io/job-index": "0", "job-name": child, "batch.kubernetes.io/job-name": child,
         "batch.kubernetes.io/job-completion-index": str(index)}
        for index in range(trainjob["spec"]["trainer"]["numNodes"])
    ]  # fmt: skip


RENDEZVOUS, NCCL = 29500, 43211  # c10d's port, and one of the ports NCCL picks for itself


def test_kubernetes_training_and_servers_take_connections_only_from_their_peers():
    """network-policy.yaml against the pods that the Indexed Job (train-multinode.yaml), the TrainJob (trainjob.yaml)
    and the work pool (base-job-template.json) make: under the default deny, the nodes of each training reach each
    other on any port, nobody else reaches them, and every pod that uses the servers reaches them on their ports."""
    policies = list(yaml.safe_load_all((INFRA / "k8s/network-policy.yaml").read_text()))
    by_name = {policy["metadata"]["name"]: policy["spec"] for policy in policies}
    assert by_name["default-deny-ingress"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    _, job = yaml.safe_load_all((INFRA / "k8s/train-multinode.yaml").read_text())
    trainjob = yaml.safe_load((INFRA / "k8s/trainjob.yaml").read_text())
    template = json.loads((INFRA / "k8s/base-job-template.json").read_text())
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]
    flow_run = pod["metadata"]["labels"]
    trainings = {"Indexed Job": indexed_job_pods(job), "TrainJob": trainjob_pods(trainjob)}
    for kind, nodes in trainings.items():
        assert len(nodes) == 2, kind
        for to in nodes:
            for source in nodes:
                assert admits(policies, to, source, RENDEZVOUS) and admits(policies, to, source, NCCL), kind
            assert not admits(policies, to, flow_run, RENDEZVOUS), f"{kind}: a flow run reaches a training node"
            others = [node for other, pods in trainings.items() if other != kind for node in pods]
            assert not any(admits(policies, to, other, RENDEZVOUS) for other in others), f"{kind}: the other one"
    servers = {"mlflow": 5000, "prefect-server": 4200, "minio": 9000}
    for name, port in servers.items():
        server = {"app.kubernetes.io/name": name}
        for source in (flow_run, *trainings["Indexed Job"], *trainings["TrainJob"]):
            assert admits(policies, server, source, port) and not admits(policies, server, source, port + 1), name
        assert not admits(policies, server, {"app": "else"}, port), name
    assert flow_run == job["spec"]["template"]["metadata"]["labels"] == {"gpt2-pipeline/client": "true"}
    assert admits(policies, {"app.kubernetes.io/name": "postgres"}, {"app.kubernetes.io/name": "mlflow"}, 5432)
    assert not admits(policies, {"app.kubernetes.io/name": "postgres"}, flow_run, 5432)
    # /dev/shm is RAM: bounded in both templates.
    for volumes in (job["spec"]["template"]["spec"]["volumes"], pod["spec"]["volumes"]):
        (dshm,) = [v for v in volumes if v["name"] == "dshm"]
        assert dshm["emptyDir"]["medium"] == "Memory" and dshm["emptyDir"]["sizeLimit"] == "16Gi"


def test_sweep_workers_reach_the_study_database_and_run_the_shared_study():
    """sweep-workers.yaml's pods (an Indexed Job) reach PostgreSQL, MLflow and MinIO and nothing reaches them; each
    one joins the study (--resume) with sweep.storage from the Job's env, and its script parses."""
    policies = list(yaml.safe_load_all((INFRA / "k8s/network-policy.yaml").read_text()))
    job = yaml.safe_load((INFRA / "k8s/sweep-workers.yaml").read_text())
    workers = indexed_job_pods(job)
    assert len(workers) == job["spec"]["parallelism"] == 4
    for worker in workers:
        for server, port in {"postgres": 5432, "mlflow": 5000, "minio": 9000}.items():
            assert admits(policies, {"app.kubernetes.io/name": server}, worker, port), server
        assert not any(admits(policies, worker, other, 29500) for other in workers if other != worker)
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["SWEEP_STORAGE"].startswith("postgresql://") and "@" in env["SWEEP_STORAGE"]
    assert ":" not in env["SWEEP_STORAGE"].split("//")[1].split("@")[0]  # no password in the URI: PGPASSWORD
    script = container["args"][0]
    assert re.search(r"^exec gpt2-pipeline sweep --resume$", script, re.M) and '"$SWEEP_STORAGE"' in script
    subprocess.run(["sh", "-n", "-c", script], check=True)
    program = re.search(r"python -c '([^']+)'", script).group(1)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    folder = Path(tempfile.mkdtemp())
    try:
        (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        subprocess.run([sys.executable, "-c", program, env["SWEEP_STORAGE"]], cwd=folder, check=True)
        written = parse_params(yaml.safe_load((folder / "params.yaml").read_text()))
    finally:
        shutil.rmtree(folder)
    assert (
        written.sweep.storage == env["SWEEP_STORAGE"]
        and written.model_dump()
        == parse_params({**params, "sweep": {**params["sweep"], "storage": env["SWEEP_STORAGE"]}}).model_dump()
    )


def test_the_lock_has_what_its_packages_need_on_the_oldest_python_the_project_allows():
    """pip-compile locks for the Python it runs on; a package that something locked needs only on an earlier 3.11
    (redis: async-timeout below 3.11.3, and Debian 12's python3 is 3.11.2) must be in the lock all the same."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    floor = re.search(r'^requires-python = ">=(\d+)\.(\d+)"', (ROOT / "pyproject.toml").read_text(), re.M).groups()
    oldest = {"python_version": ".".join(floor), "python_full_version": ".".join(floor) + ".0", "extra": ""}
    lock = (ROOT / "requirements.lock").read_text()
    locked = {canonicalize_name(name) for name in re.findall(r"^([\w.-]+)==", lock, re.M)}
    installed = {canonicalize_name(dist.metadata["Name"]): dist for dist in metadata.distributions()}
    missing = sorted(
        f"{needed.name} (for {name})"
        for name in locked & installed.keys()  # the others' markers leave them out on this Python
        for needed in map(Requirement, installed[name].requires or [])
        if (needed.marker is None or needed.marker.evaluate(oldest)) and canonicalize_name(needed.name) not in locked
    )
    assert missing == [], f"requirements.lock lacks what these need on Python {oldest['python_full_version']}"


def test_dvc_reads_the_projects_remote_config_with_the_default_install():
    """.dvc/config names the MinIO remote: a plain install must still run `dvc version`, `dvc remote list`."""
    dvc = str(Path(sys.executable).parent / "dvc")
    version = subprocess.run([dvc, "version"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert version.returncode == 0, version.stderr[-1000:]
    assert re.search(r"Supports:[\s\S]*\bs3\b", version.stdout), version.stdout
    remotes = subprocess.run([dvc, "remote", "list"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert re.match(r"minio\s+s3://dvc", remotes), remotes


def test_the_trainjob_is_a_kubeflow_trainer_v2_trainjob_whose_sizes_and_script_agree():
    """Validated by the Kubeflow Trainer API's own models (kubeflow-trainer-api, generated from the CRDs' OpenAPI
    schema): a wrong type fails, and a key the schema does not have is caught by the round trip."""
    import pydantic
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    def plain(value):
        return json.loads(json.dumps(value, default=str))

    doc = yaml.safe_load((INFRA / "k8s/trainjob.yaml").read_text())
    assert plain(TrainerV1alpha1TrainJob.from_dict(doc).to_dict()) == plain(doc)
    typo = copy.deepcopy(doc)
    typo["spec"]["trainer"]["numNode"] = typo["spec"]["trainer"].pop("numNodes")
    assert plain(TrainerV1alpha1TrainJob.from_dict(typo).to_dict()) != plain(typo)
    wrong = copy.deepcopy(doc)
    wrong["spec"]["trainer"]["numNodes"] = "2"  # a count is an integer
    with pytest.raises(pydantic.ValidationError):
        TrainerV1alpha1TrainJob.from_dict(wrong)
    trainer = doc["spec"]["trainer"]
    assert doc["spec"]["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime", "name": "torch-distributed"
    }  # fmt: skip
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == str(trainer["numProcPerNode"])
    script = trainer["args"][0]
    subprocess.run(["sh", "-n", "-c", script], check=True)
    assert '"$PET_NNODES" "$PET_NPROC_PER_NODE"' in script and 'MASTER_ADDR="$PET_MASTER_ADDR"' in script
    assert "python -m tasks.train || status=$?" in script and re.search(r"^\s+4\) echo", script, re.M)
    assert "dvc pull -r minio tokenize" in script
    node = doc["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod = node["template"]["spec"]["template"]
    assert node["name"] == pod["spec"]["containers"][0]["name"] == "node"  # the torch runtime's job and container
    assert pod["metadata"]["labels"] == {"gpt2-pipeline/client": "true"}  # network-policy.yaml's client label


def system_packages(tmp_path: Path, uid: int, *args: str) -> subprocess.CompletedProcess:
    """tools/system-packages with only a stand-in `id` on PATH: no sudo, no apt-get, a user of our choosing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    (bin_dir / "id").chmod(0o755)
    script = ROOT / "tools/system-packages"
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    return subprocess.run(["/bin/bash", str(script), *args], capture_output=True, text=True, env=env, timeout=60)


def test_make_installs_what_it_needs_or_names_the_packages_in_one_line(tmp_path):
    """make install and make test set up the system packages they need; where they cannot (no root, no sudo, no
    apt-get), one line names the packages and what to do, exit 2."""
    plan = subprocess.run(["make", "-n", "-W", "pyproject.toml", "test"], cwd=ROOT, capture_output=True, text=True)
    assert "tools/system-packages venv" in plan.stdout and "tools/system-packages tests" in plan.stdout
    user = system_packages(tmp_path, 1000, "venv", "/no/python3")
    assert (user.returncode, user.stdout) == (2, "")
    assert user.stderr == (
        "error: make install needs the system packages python3-venv: install them as root (apt-get install "
        "python3-venv) or give this user sudo, then run make install again\n"
    )
    root = system_packages(tmp_path, 0, "venv", "/no/python3")
    assert (root.returncode, root.stderr.count("\n")) == (2, 1)
    assert "python3-venv and this machine has no apt-get" in root.stderr
    assert system_packages(tmp_path, 1000, "venv", sys.executable).returncode == 0  # nothing missing: nothing to do


def test_serving_pods_take_traffic_once_their_model_answers_and_scale_on_waiting_requests():
    """serving.yaml: serve-model on every address at the port the probes, the Service and the network policy name;
    ready when /health answers; the autoscaler on a series the server exports; the pods reach MLflow."""
    from typer.main import get_command

    from flows.cli import app
    from flows.completions import Metrics

    deployment, service, autoscaler = yaml.safe_load_all((INFRA / "k8s/serving.yaml").read_text())
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    command = get_command(app).commands["serve-model"]
    options = command.make_context("serve-model", container["command"][2:]).params
    assert container["command"][:2] == ["gpt2-pipeline", "serve-model"] and options["host"] == "0.0.0.0"  # noqa: S104 (a pod answers its Service)
    assert container["ports"] == [{"name": "http", "containerPort": options["port"]}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert autoscaler["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    series = autoscaler["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert re.search(rf"^{series} ", Metrics().text().decode(), re.M), series
    policies = list(yaml.safe_load_all((INFRA / "k8s/network-policy.yaml").read_text()))
    labels = pod["metadata"]["labels"]
    assert admits(policies, labels, {"app": "else"}, options["port"])
    assert not admits(policies, labels, {"app": "else"}, options["port"] + 1)
    assert admits(policies, {"app.kubernetes.io/name": "mlflow"}, labels, 5000)
