"""Loading only safe formats, no remote code, no pickle from users' data, no credentials in logs or MLflow, runs that
never share a workspace, and infra whose servers ask who is calling, whose pods run unprivileged and whose images are
pinned."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
from urllib.parse import quote, quote_plus

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis.strategies import text

from flows import workspace
from flows.pipeline import failure_line
from tasks.plumbing.errors import PipelineError
from tasks.plumbing.redaction import MIN_SECRET_CHARS
from tasks.plumbing.specials import EOS
from tests.helpers import (
    BIN,
    ROOT,
    copy_project,
    merge,
    run,
    store_copy,
    tiny_params,
    tool_env,
    trained_copy,
    write_params,
)
from tests.servers import LOOPBACK, MLFLOW_SERVER_ENV, free_port, mlflow_server, process, wait_http

SOURCES = sorted([*(ROOT / "tasks").rglob("*.py"), *(ROOT / "flows").rglob("*.py")])  # the packages too


def calls(name: str):
    """Every call to a function or method called name in the project's code, with its file."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called == name:
                    yield path, node


def test_models_load_only_tensors_and_never_run_remote_code():
    model_loads = [
        (path, node) for path, node in calls("from_pretrained")
        if isinstance(node.func, ast.Attribute) and getattr(node.func.value, "id", "") == "GPT2LMHeadModel"
    ]  # fmt: skip
    # One loader (tasks/tracking/loading.py) serves every stage, promotion and the CLI.
    assert [path.name for path, _ in model_loads] == ["loading.py"]
    for path, node in model_loads:
        keywords = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
        assert keywords.get("weights_only") is True and "use_safetensors" not in keywords, f"{path}:{node.lineno}"
    text = "\n".join(path.read_text() for path in SOURCES)
    assert "trust_remote_code" not in text
    assert not re.search(r"^\s*(import dill|import joblib)", text, re.M)
    assert not re.search(r"\b(pickle|_pickle|dill|joblib)\.(loads?|Unpickler)\b", text)  # pickle: its error only
    for path, node in calls("load"):
        if isinstance(node.func, ast.Attribute) and getattr(node.func.value, "id", "") == "torch":
            keywords = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
            assert keywords.get("weights_only") is True, f"{path}:{node.lineno}"


def char_tokenizer(size: int):
    """A tokenizer of `size` single characters, the first one end-of-text."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(0x21 + index) if index else EOS: index for index in range(size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS)


def test_a_pickled_model_loads_its_tensors_and_nothing_else(tmp_path):
    """A folder with only pytorch_model.bin (as many Chinese GPT-2s ship) loads through torch's weights_only
    loader; one whose pickle holds an object besides tensors is refused with one line naming it."""
    import datetime

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300, n_positions=32))
    command = [str(BIN / "gpt2-pipeline"), "generate", "--prompt", "a", "--max-new-tokens", "3", "--model"]
    outcomes = {}
    for name, extra in (("tensors", {}), ("object", {"saved_on": datetime.date(2026, 11, 27)})):
        folder = tmp_path / name
        model.config.save_pretrained(folder)
        torch.save({**model.state_dict(), **extra}, folder / "pytorch_model.bin")
        char_tokenizer(300).save_pretrained(folder)
        outcomes[name] = run([*command, str(folder)], ROOT, check=False)
    assert outcomes["tensors"].returncode == 0, outcomes["tensors"].stderr[-2000:]
    assert outcomes["tensors"].stdout.startswith("a")
    refused = outcomes["object"]
    lines = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr[-2000:]
    assert "holds more than tensors (datetime.date)" in lines[0] and "Traceback" not in refused.stderr


@pytest.mark.slow
def test_two_workspaces_one_server_at_once_and_no_password_anywhere(golden, tmp_path):
    """Two projects run `dvc repro` at the same time against one MLflow server, whose URI carries a password:
    two runs, two versions, every metric step, and the password in no output, param or tag."""
    port = free_port()
    secret = "s3cret-pw"
    uri = f"http://alice:{secret}@{LOOPBACK}:{port}"
    projects = []
    for index in (1, 2):
        project = trained_copy(golden, tmp_path / f"team-{index}")
        write_params(project, merge(tiny_params(), {"train": {"seed": index, "max_steps": 10}}))
        projects.append(project)
    env = {**tool_env(), "MLFLOW_TRACKING_URI": uri}
    backend, log = f"sqlite:///{tmp_path}/server.db", tmp_path / "mlflow.log"
    with mlflow_server(port, backend, tmp_path / "store", log, tool_env(), workers=2) as proc:
        wait_http(f"http://{LOOPBACK}:{port}/health", proc, tmp_path / "mlflow.log")
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
        both = [subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=p, env=env, **pipes) for p in projects]
        outputs = [p.communicate(timeout=900)[0] for p in both]
        assert [p.returncode for p in both] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        registered = [json.loads((p / "registered.json").read_text()) for p in projects]
        assert sorted(r["version"] for r in registered) == ["1", "2"]
        steps = 10 // tiny_params()["train"]["logging_steps"]
        for record in registered:
            run_data = client.get_run(record["run_id"]).data
            assert len(client.get_metric_history(record["run_id"], "train/loss")) == steps
            assert "eval/perplexity" in run_data.metrics
            assert secret not in json.dumps([run_data.params, run_data.tags])
    for output in outputs:
        assert secret not in output
    for project in projects:
        assert secret not in (project / "models/gpt2/mlflow_run.json").read_text()


SECRET = "Zq9xPw7unique"
# Each shape of a URI with credentials in it, as users write them (the password with `@` or `/` unescaped, a
# bare token), with what the user sees instead.
URI_SHAPES = {
    f"http://user:{SECRET}@127.0.0.1:9/": "http://user:***@127.0.0.1:9/",
    f"http://user:p@ss{SECRET}@127.0.0.1:9/": "http://user:***@127.0.0.1:9/",
    f"http://user:a/b{SECRET}@127.0.0.1:9/": "http://user:***@127.0.0.1:9/",
    f"http://{SECRET}@127.0.0.1:9/": "http://***@127.0.0.1:9/",
}


@pytest.mark.parametrize("uri", URI_SHAPES)
def test_one_redaction_hides_every_shape_of_credentials_wherever_they_stand(uri):
    from tasks.plumbing.redaction import redact
    from tasks.tracking.store import shown_uri

    assert shown_uri(uri) == URI_SHAPES[uri]
    request = "/api/2.0/mlflow/runs/get?run_id=1"
    line = f"error: MlflowException: API request to {uri.rstrip('/')}{request} failed"
    assert redact(line) == f"error: MlflowException: API request to {URI_SHAPES[uri].rstrip('/')}{request} failed"
    assert shown_uri("postgresql://u:p%40ss@db/mlflow") == "postgresql://u:***@db/mlflow"
    for plain in ("sqlite:////tmp/mlflow.db", "http://host:5000/a?mail=a@b", "models:/gpt2-lm@champion"):
        assert redact(plain) == plain


PRINTABLE = "".join(map(chr, range(0x20, 0x7F)))  # the full printable ASCII range, space included


def configured_shapes(password: str) -> dict[str, str]:
    """Where a password may be configured: each a set of environment variables."""
    encoded = quote(password, safe="")
    return {
        "raw in the tracking URI": {"MLFLOW_TRACKING_URI": f"http://user:{password}@127.0.0.1:9/"},
        "encoded in the tracking URI": {"MLFLOW_TRACKING_URI": f"https://user:{encoded}@mlflow.example:443/"},
        "encoded in a database URI": {"DATABASE_URL": f"postgresql+psycopg2://mlflow:{encoded}@db:5432/mlflow"},
        "MLflow's basic auth": {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "MLFLOW_TRACKING_PASSWORD": password},
        "a token in the query": {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:9/?access_token={encoded}"},
        "a cloud key": {"AWS_SECRET_ACCESS_KEY": password, "HF_TOKEN": password[::-1]},
    }


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(password=text(alphabet=PRINTABLE, min_size=MIN_SECRET_CHARS, max_size=40))
def test_a_password_of_any_printable_characters_is_hidden_wherever_it_is_configured(password, monkeypatch):
    """Redaction by value: whatever characters a password holds (brackets, quotes, `@`, `/`, spaces), and however
    it is configured, it is hidden, as typed and percent-encoded, from the lines the CLI and the stages print,
    the tracking URI they show, and what goes to MLflow."""
    from tasks.plumbing.redaction import redact
    from tasks.tracking.store import shown_uri

    assume("*" not in password)  # the mask itself
    forms = {password, quote(password, safe=""), quote(password), quote_plus(password)}
    for shape, variables in configured_shapes(password).items():
        for name in ("MLFLOW_TRACKING_URI", "DATABASE_URL", "MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(name, raising=False)
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        lines = [
            f"error: MLflow tracking server {shown_uri()} is not reachable (ConnectionError: {variables})",
            f"MLflow UI:  mlflow ui --backend-store-uri {shown_uri()}",
            *(f"warning: {value} answered 401" for value in variables.values()),
        ]
        for line in map(redact, lines):
            assert not any(form in line for form in forms), (shape, line)


def test_only_secret_variables_are_hidden_by_value():
    """A variable is a secret by the whole words of its name: TOKENIZERS_PARALLELISM=false and the hub's settings
    hide nothing (a "false" printed in a decision stays), HF_TOKEN and the Prefect auth string do."""
    from tasks.plumbing.redaction import known_secrets

    environ = {
        "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1", "PREFECT_UI_ENABLED": "false",
        "HF_TOKEN": "hf_Zq9xPw7unique", "PREFECT_API_AUTH_STRING": "admin:Zq9xPw7other",
    }  # fmt: skip
    assert set(known_secrets(environ)) == {"hf_Zq9xPw7unique", "admin:Zq9xPw7other", "admin%3AZq9xPw7other"}


SECRET_NAMES = [
    "PGPASSWORD", "MYSQL_PWD", "DB_PASS", "MLFLOW_TRACKING_PASSWORD", "DATABASE_PASSWD", "AWS_SECRET_ACCESS_KEY",
    "OPENAI_API_KEY", "OPENAI_APIKEY", "AZURE_STORAGE_KEY", "HF_TOKEN", "GITHUB_TOKEN", "AWS_SESSION_TOKEN",
    "MY_SERVICE_CREDENTIALS", "CREDENTIAL", "PREFECT_API_AUTH_STRING", "secret", "Db_Password",
]  # fmt: skip
SETTING_NAMES = [
    "PWD", "OLDPWD", "TOKENIZERS_PARALLELISM", "KEYRING_PROVIDER", "PASSTHROUGH_MODE", "HF_HUB_DISABLE_IMPLICIT_TOKEN",
    "PREFECT_UI_ENABLED", "SSH_KEY_PATH", "TOKEN_TTL", "AWS_SHARED_CREDENTIALS_FILE", "PATH", "HOME", "LANG",
]  # fmt: skip


@pytest.mark.parametrize("name", SECRET_NAMES)
def test_a_variable_named_like_a_secret_is_hidden_by_value(name):
    from tasks.plumbing.redaction import known_secrets

    assert known_secrets({name: "Zq9xPw7-not-a-path"}) == ("Zq9xPw7-not-a-path",)


@pytest.mark.parametrize("name", SETTING_NAMES)
def test_an_ordinary_setting_is_not_hidden(name):
    from tasks.plumbing.redaction import known_secrets

    assert known_secrets({name: "Zq9xPw7-an-ordinary-value"}) == ()


def test_a_secret_named_variable_holding_an_existing_files_path_is_not_hidden(tmp_path):
    """GOOGLE_APPLICATION_CREDENTIALS names a key file: the path is printed, the file is not read."""
    from tasks.plumbing.redaction import known_secrets

    key = tmp_path / "key.json"
    key.write_text("{}")
    assert known_secrets({"GOOGLE_APPLICATION_CREDENTIALS": str(key)}) == ()
    assert known_secrets({"GOOGLE_APPLICATION_CREDENTIALS": "Zq9xPw7inline"}) == ("Zq9xPw7inline",)


def test_params_and_tags_reach_mlflow_without_credentials(tmp_path, monkeypatch, empty_store):
    """A URI with credentials in params (a model's address) or in a tag is written to MLflow redacted: the run's
    params and tags, and a registered version's tags (the redaction's shapes are the test above's)."""
    from tasks.plumbing.params import parse_params
    from tasks.tracking import mlflow_runs, registry, store

    uri = f"http://user:p@ss{SECRET}@127.0.0.1:9/"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_copy(empty_store, tmp_path / "mlflow.db"))
    monkeypatch.chdir(tmp_path)  # lineage tags read params.yaml here, and find no git or dvc.lock
    raw = merge(tiny_params(), {"model": {"init": "pretrained", "name_or_path": f"{uri}gpt2"}})
    write_params(tmp_path, raw)
    params = parse_params(raw)
    run_id = mlflow_runs.create_run(params, tags={"source": uri})
    mlflow_runs.set_tags(run_id, {"address": f"model at {uri}"})
    client = store.client()
    client.create_registered_model("m")
    version = client.create_model_version("m", (tmp_path / "model").as_uri(), run_id).version
    registry.tag_version("m", str(version), {"source": uri})

    logged = client.get_run(run_id).data
    written = [*logged.params.values(), *logged.tags.values(), *client.get_model_version("m", version).tags.values()]
    assert SECRET not in "\n".join(written)
    assert logged.params["model.name_or_path"] == f"{URI_SHAPES[uri]}gpt2"
    assert logged.tags["address"] == f"model at {URI_SHAPES[uri]}"


@pytest.mark.slow  # four CLI processes: kept out of the edit-test loop
def test_a_password_in_the_tracking_uri_is_printed_nowhere_when_the_server_is_down():
    """With each shape of credentials in MLFLOW_TRACKING_URI and nothing listening there, the CLI (loading a
    registered model) fails with one line, and no output line holds the secret."""
    command = [str(BIN / "gpt2-pipeline"), "generate", "--model", "models:/gpt2-lm@champion", "--prompt", "a"]
    for uri, shown in URI_SHAPES.items():
        result = run(command, ROOT, check=False, env=tool_env(MLFLOW_TRACKING_URI=uri))
        output = result.stdout + result.stderr
        assert result.returncode != 0 and SECRET not in output, output[-2000:]
        assert shown.rstrip("/") in output


@pytest.mark.servers
def test_a_password_refused_by_the_server_is_printed_nowhere(tmp_path, monkeypatch):
    """A real MLflow server with basic auth (infra's settings) answers 401 to a wrong password: the stage that logs
    to it fails with one line, and neither its output nor the files it leaves hold the password. A new user sees
    nothing until the admin grants it, as docs/infrastructure.md shows."""
    port = free_port()
    auth = tmp_path / "basic_auth.ini"
    shipped = (ROOT / "infra/mlflow/basic_auth.ini").read_text()
    auth.write_text(
        re.sub(r"^database_uri = .*$", f"database_uri = sqlite:///{tmp_path}/auth.db", shipped, flags=re.M)
        + "admin_username = admin\nadmin_password = admin-password-for-the-test\n"
    )
    csrf = {"MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-key-for-the-test"}  # the basic-auth app refuses to start without
    env = tool_env(MLFLOW_AUTH_CONFIG_PATH=str(auth), **csrf)
    command = [
        str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--host", LOOPBACK, "--port", str(port),
        "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "store"),
    ]  # fmt: skip
    with process(command, tmp_path / "mlflow.log", {**env, **MLFLOW_SERVER_ENV}) as server:
        wait_http(f"http://{LOOPBACK}:{port}/health", server, tmp_path / "mlflow.log")
        uri = f"http://admin:wrong{SECRET}@{LOOPBACK}:{port}"
        generate = [str(BIN / "gpt2-pipeline"), "generate", "--model", "models:/gpt2-lm/1", "--prompt", "a"]
        result = run(generate, ROOT, check=False, env=tool_env(MLFLOW_TRACKING_URI=uri))
        granted = _grant_as_infra_readme_shows(f"http://{LOOPBACK}:{port}", monkeypatch)
    assert granted == {"before": 403, "after": "shared"}
    output = result.stdout + result.stderr
    assert result.returncode != 0 and SECRET not in output, output[-2000:]
    assert "401" in output or "Unauthorized" in output or "credentials" in output.lower(), output[-2000:]


def _grant_as_infra_readme_shows(url: str, monkeypatch) -> dict[str, object]:
    """The admin creates an experiment and a user; what the user gets for it before and after the grant."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "admin-password-for-the-test")
    experiment = MlflowClient(url).create_experiment("shared")
    admin = get_app_client("basic-auth", tracking_uri=url)
    admin.create_user("ci", "a-long-password-for-ci")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ci")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "a-long-password-for-ci")
    seen: dict[str, object] = {}
    try:
        MlflowClient(url).get_experiment(experiment)
        seen["before"] = "shared"
    except MlflowException as exc:
        seen["before"] = exc.get_http_status_code()
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "admin-password-for-the-test")
    admin.grant_user_permission("ci", "experiment", experiment, "EDIT")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ci")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "a-long-password-for-ci")
    seen["after"] = MlflowClient(url).get_experiment(experiment).name
    return seen


def test_bandit_finds_nothing_of_medium_or_high_severity():
    result = subprocess.run(
        [str(BIN / "bandit"), "-q", "-ll", "-f", "json", "-r", "tasks", "flows"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    findings = json.loads(result.stdout)["results"]
    assert findings == [], [(f["filename"], f["line_number"], f["test_id"]) for f in findings]


def test_two_runs_with_the_same_overrides_never_share_a_workspace(tmp_path):
    project = copy_project(tmp_path)
    overrides = {"train.seed": 11}
    with workspace.claimed(project, overrides) as folder:
        assert folder == project / ".runs" / workspace.overrides_key(overrides)
        with pytest.raises(PipelineError) as busy, workspace.claimed(project, overrides):
            pass
        with workspace.claimed(project, {"train.seed": 12}):  # other overrides, another workspace: no wait
            pass
    assert str(busy.value) == (
        f"{folder}: another run with the same overrides is using this workspace (PID {os.getpid()}); "
        "wait for it to finish, or run with other overrides"
    )
    with workspace.claimed(project, overrides):  # released when the first run ended
        pass


DVC_BUSY = [
    "Running stage 'ingest':",
    "ERROR: failed to reproduce 'ingest': '/p/data/prepared' is busy, it is being blocked by:",
    "  (PID 4242): /p/.venv/bin/python -m dvc repro",
    "",
    "If there are no processes with such PIDs, you can manually remove '.dvc/tmp/rwlock' and try again.",
]


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["Running stage 'train':", "error: train.learning_rate: bad", "ERROR: failed to reproduce 'train'"],
         "error: train.learning_rate: bad"),
        (DVC_BUSY, DVC_BUSY[1]),
        (["Running stage 'train':", "Killed"], "Killed"),
        ([], "no output"),
    ],
)  # fmt: skip
def test_a_failed_stage_is_explained_by_its_own_line_else_dvc_s(lines, expected):
    assert failure_line(lines) == expected


def compose() -> dict:
    return yaml.safe_load((ROOT / "infra/docker-compose.yml").read_text())


def pod_specs() -> list[tuple[str, dict]]:
    """The pod specs the pipeline runs in on Kubernetes: the work pool's jobs and the multinode training job."""
    template = json.loads((ROOT / "infra/k8s/base-job-template.json").read_text())
    _, job = yaml.safe_load_all((ROOT / "infra/k8s/train-multinode.yaml").read_text())
    return [
        ("base-job-template.json", template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]),
        ("train-multinode.yaml", job["spec"]["template"]["spec"]),
    ]


def test_pods_run_unprivileged_under_a_dedicated_account_without_its_token():
    account = yaml.safe_load((ROOT / "infra/k8s/serviceaccount.yaml").read_text())
    assert account["kind"] == "ServiceAccount" and account["automountServiceAccountToken"] is False
    template = json.loads((ROOT / "infra/k8s/base-job-template.json").read_text())
    assert template["variables"]["properties"]["service_account_name"]["default"] == account["metadata"]["name"]
    for name, spec in pod_specs():
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["serviceAccountName"] in (account["metadata"]["name"], "{{ service_account_name }}"), name
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0, name
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["privileged"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
    assert "USER pipeline" in (ROOT / "infra/Dockerfile").read_text()  # uid 1000, as runAsUser says


def test_images_are_pinned_by_version():
    images = [service["image"] for service in compose()["services"].values()]
    template = json.loads((ROOT / "infra/k8s/base-job-template.json").read_text())
    images.append(template["variables"]["properties"]["image"]["default"])
    images += [c["image"] for _, spec in pod_specs() for c in spec["containers"] if "{{" not in c["image"]]
    images += re.findall(r"^FROM (\S+)", (ROOT / "infra/Dockerfile").read_text(), re.M)
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and re.search(r"\d", tag), image
    project_version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert {i.rpartition(":")[2] for i in images if i.startswith("gpt2-pipeline:")} == {project_version}


def test_servers_ask_who_is_calling_and_listen_on_the_loopback_unless_told():
    services = compose()["services"]
    server = services["prefect-server"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"]
    assert (
        server
        == services["worker"]["environment"]["PREFECT_API_AUTH_STRING"]
        == "${PREFECT_AUTH_STRING:?set PREFECT_AUTH_STRING}"
    )
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond the loopback"
    auth = (ROOT / "infra/mlflow/basic_auth.ini").read_text()
    assert re.search(r"^default_permission = NO_PERMISSIONS$", auth, re.M)
    manual = (ROOT / "docs/infrastructure.md").read_text()
    for command in re.findall(r"(?:mlflow|prefect) server [^`]*?--host (\S+)", manual):
        assert command == "127.0.0.1", command
    assert "--app-name basic-auth" in manual and "PREFECT_SERVER_API_AUTH_STRING=" in manual
