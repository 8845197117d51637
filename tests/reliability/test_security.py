"""Loading only safe formats, no remote code, no pickle from users' data, and no credentials in logs or MLflow."""

from __future__ import annotations

import ast
import json
import re
import subprocess

import pytest

from tests.conftest import BIN, ROOT, merge, run, tiny_params, tool_env, trained_copy, write_params
from tests.servers import LOOPBACK, free_port, mlflow_server, wait_http

SOURCES = sorted([*(ROOT / "tasks").glob("*.py"), *(ROOT / "flows").glob("*.py")])


def calls(name: str):
    """Every call to a function or method called name in the project's code, with its file."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called == name:
                    yield path, node


def test_models_load_only_as_safetensors_and_never_run_remote_code():
    model_loads = [
        (path, node) for path, node in calls("from_pretrained")
        if isinstance(node.func, ast.Attribute) and getattr(node.func.value, "id", "") == "GPT2LMHeadModel"
    ]  # fmt: skip
    # One loader (tasks/loading.py) serves every stage, promotion and the CLI.
    assert [path.name for path, _ in model_loads] == ["loading.py"]
    for path, node in model_loads:
        keywords = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
        assert keywords.get("use_safetensors") is True, f"{path}:{node.lineno}"
    text = "\n".join(path.read_text() for path in SOURCES)
    assert "trust_remote_code" not in text
    assert not re.search(r"^\s*(import pickle|from pickle|import dill|import joblib)", text, re.M)
    for path, node in calls("load"):
        if isinstance(node.func, ast.Attribute) and getattr(node.func.value, "id", "") == "torch":
            keywords = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
            assert keywords.get("weights_only") is True, f"{path}:{node.lineno}"


def test_a_pickled_model_folder_is_refused(tmp_path):
    """A folder with pytorch_model.bin (a pickle) and no safetensors is not loaded."""
    import torch
    from transformers import GPT2Config

    folder = tmp_path / "pickled"
    folder.mkdir()
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300, n_positions=32).save_pretrained(folder)
    torch.save({"transformer.wte.weight": torch.zeros(300, 32)}, folder / "pytorch_model.bin")
    result = run([str(BIN / "gpt2-pipeline"), "generate", "--model", str(folder), "--prompt", "a"], ROOT, check=False)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "model.safetensors" in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


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


def test_shown_uris_hide_passwords():
    from tasks.store import shown_uri

    assert shown_uri("http://alice:pw@host:5000") == "http://alice:***@host:5000"
    assert shown_uri("postgresql://u:p%40ss@db/mlflow") == "postgresql://u:***@db/mlflow"
    assert shown_uri("sqlite:///mlflow.db") == "sqlite:///mlflow.db"
    assert shown_uri("http://host:5000") == "http://host:5000"


def test_bandit_finds_nothing_of_medium_or_high_severity():
    result = subprocess.run(
        [str(BIN / "bandit"), "-q", "-ll", "-f", "json", "-r", "tasks", "flows"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    findings = json.loads(result.stdout)["results"]
    assert findings == [], [(f["filename"], f["line_number"], f["test_id"]) for f in findings]
