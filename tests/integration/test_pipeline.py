"""End to end on the project trained once per test run (tests/conftest.py's golden): what `dvc repro` made, then
the Prefect flow, a fine-tune and bad params on copies of it, against real MLflow and DVC."""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import socket
from importlib.metadata import version
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from tests.browser import chromium, pixels_near
from tests.helpers import (
    BIN,
    cli_here,
    merge,
    mlflow_on,
    run,
    store_client,
    tiny_params,
    tool_env,
    trained_copy,
    untrained_perplexity,
    write_params,
)
from tests.servers import LOOPBACK, free_port, process, wait_http

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(golden, tmp_path_factory):
    """A copy of the project after `dvc repro` with tiny params, shared by the tests that only read it."""
    return trained_copy(golden, tmp_path_factory.mktemp("e2e"))


def test_dvc_repro_registers_a_model_that_loads_and_generates(pipeline):
    registered = json.loads((pipeline / "registered.json").read_text())
    assert registered["name"] == "gpt2-lm" and registered["model_uri"] == f"models:/gpt2-lm/{registered['version']}"
    client = store_client(pipeline)
    version = client.get_model_version_by_alias("gpt2-lm", "challenger")
    assert str(version.version) == registered["version"] and version.run_id == registered["run_id"]
    lock = yaml.safe_load((pipeline / "dvc.lock").read_text())["stages"]
    model_md5 = next(o["md5"] for o in lock["train"]["outs"] if o["path"] == "models/gpt2")
    assert version.tags["model_md5"] == model_md5
    assert version.tags["git_dirty"] == "true"  # the tiny params differ from the copy's commit
    assert len(version.tags["git_commit"]) == 40 and len(version.tags["params_hash"]) == 16
    assert {"data_md5", "tokenized_md5", "eval_perplexity"} <= set(version.tags)
    with mlflow_on(f"sqlite:///{pipeline}/mlflow.db") as mlflow:
        generator = mlflow.transformers.load_model("models:/gpt2-lm@challenger")
    text = generator("ROMEO:", max_new_tokens=20, do_sample=False)[0]["generated_text"]
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:") + 5


def test_dvc_plots_diff_of_two_experiments_draws_offline_in_a_browser(trained_project, tmp_path):
    """`dvc plots diff` of the trained revision and an experiment (a shorter training) writes a page that Chromium
    draws with the network off: Vega is in the page (.dvc/config's template), and each revision's curves are drawn in
    its own colour."""
    project = trained_project
    run([str(BIN / "dvc"), "exp", "run", "train", "--name", "short", "-S", "train.max_steps=100"], project)
    run([str(BIN / "dvc"), "plots", "diff", "HEAD", "short", "-o", str(tmp_path / "plots")], project)
    page = (tmp_path / "plots/index.html").read_text()
    assert "<script src=" not in page and "cdn." not in page and "vegaEmbed(" in page
    colours = json.loads(re.search(r'"range": (\["#[^]]+\])', page).group(1))  # DVC's colour for each revision
    assert len(colours) == 2 and '"HEAD"' in page and '"short"' in page
    _, png = chromium(tmp_path / "plots/index.html", tmp_path)
    for colour in colours:
        assert pixels_near(png, colour, tolerance=30) > 150, f"a revision's curves ({colour}) were not drawn"


def test_generate_from_the_registry_and_from_the_folder(pipeline):
    """The command as a user runs it on the registered model, and in this process on the trained folder."""
    command = ["generate", "--prompt", "KING:", "--max-new-tokens", "20", "--model"]
    from_registry = run([str(BIN / "gpt2-pipeline"), *command, "models:/gpt2-lm@challenger"], pipeline).stdout
    from_folder = cli_here(pipeline, *command, "models/gpt2")
    assert from_registry.startswith("KING:") and len(from_registry.strip()) > len("KING:")
    assert from_registry == from_folder  # the same weights and the same seed give the same text


def test_one_mlflow_run_holds_params_curve_metrics_and_model(pipeline):
    registered = json.loads((pipeline / "registered.json").read_text())
    client = store_client(pipeline)
    runs = client.search_runs([client.get_experiment_by_name("gpt2-pipeline").experiment_id])
    assert len(runs) == 1
    run_data = runs[0]
    assert run_data.info.run_id == registered["run_id"] and run_data.info.status == "FINISHED"
    assert run_data.data.params["train.max_steps"] == "150" and run_data.data.params["model.config.n_layer"] == "2"
    # precision: auto, and a 64-wide model: fp32 on any CPU, with the reason the stage printed.
    assert run_data.data.params["train.precision_chosen"] == "fp32"
    assert run_data.data.params["train.precision_reason"].startswith("auto: the CPU has ")
    losses = client.get_metric_history(run_data.info.run_id, "train/loss")
    assert [m.step for m in losses] == list(range(10, 151, 10))
    assert losses[-1].value < losses[0].value - 1.0
    for key in ("train/mfu", "train/tokens_per_second"):  # one value a logging step, none twice
        assert [m.step for m in client.get_metric_history(run_data.info.run_id, key)] == list(range(10, 151, 10))
    assert 0 < run_data.data.metrics["train/mean_mfu"] < 1
    eval_json = json.loads((pipeline / "metrics/eval.json").read_text())
    assert run_data.data.metrics["eval/perplexity"] == pytest.approx(eval_json["perplexity"])
    assert int(run_data.data.tags["ingest/train_records"]) > 6000
    assert {"samples.json", "README.md"} <= {a.path for a in client.list_artifacts(run_data.info.run_id)}
    card = Path(client.download_artifacts(run_data.info.run_id, "README.md", str(pipeline / ".."))).read_text()
    model_md5 = client.get_model_version_by_alias("gpt2-lm", "challenger").tags["model_md5"]
    assert "data/samples/tinyshakespeare.txt" in card and model_md5 in card and "ROMEO:" in card
    with mlflow_on(f"sqlite:///{pipeline}/mlflow.db") as mlflow:
        local = Path(mlflow.artifacts.download_artifacts("models:/gpt2-lm@challenger", dst_path=str(pipeline / "dl")))
    assert (local / "model" / "README.md").read_text() == card
    samples = json.loads((pipeline / "reports/samples.json").read_text())
    assert [s["prompt"] for s in samples] == ["ROMEO:", "First Citizen:"]
    assert all(s["text"].startswith(s["prompt"]) for s in samples)


def test_perplexity_far_below_the_untrained_model(pipeline):
    metrics = json.loads((pipeline / "metrics/eval.json").read_text())
    assert set(metrics) >= {"perplexity", "bits_per_byte", "eval_loss", "eval_tokens"}
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert metrics["perplexity"] < untrained_perplexity(pipeline) / 2


def test_second_repro_runs_nothing(pipeline):
    result = run([str(BIN / "dvc"), "repro"], pipeline)
    assert "Data and pipelines are up to date." in result.stdout and "Running stage" not in result.stdout


def test_bad_params_stop_with_one_line_and_keep_outputs(trained_project):
    model_before = (trained_project / "models/gpt2/model.safetensors").read_bytes()
    write_params(trained_project, merge(tiny_params(), {"train": {"learning_rate": 0}}))
    result = run([str(BIN / "dvc"), "repro"], trained_project, check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: params.yaml")]
    assert errors == ["error: params.yaml: train.learning_rate: input should be greater than 0 (got 0)"]
    assert (trained_project / "models/gpt2/model.safetensors").read_bytes() == model_before


def test_a_flow_run_as_a_worker_runs_it_logs_bad_input_in_one_line(trained_project, prefect_env):
    """The flow run in a process of its own, no CLI around it (as a deployment's worker runs it): a stage's bad
    input ends the run with its one line, in the process's output and in the run's log on the Prefect server (what
    its UI shows), without Prefect's traceback."""
    write_params(trained_project, merge(tiny_params(), {"train": {"learning_rate": 0}}))
    code = "from flows.pipeline import training_pipeline as f; print(f(return_state=True).state_details.flow_run_id)"
    result = run([str(BIN / "python"), "-c", code], trained_project, env=prefect_env)
    flow_run_id = result.stdout.strip().splitlines()[-1]
    logged = httpx.post(f"{prefect_env['PREFECT_API_URL']}/logs/filter", timeout=30,
                        json={"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200}).json()  # fmt: skip
    messages = "\n".join(entry["message"] for entry in logged)
    line = "params.yaml: train.learning_rate: input should be greater than 0 (got 0)"
    assert line in messages and line in result.stdout + result.stderr, messages[-3000:]
    assert "Traceback" not in messages, messages[-3000:]
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]


def assert_no_secret_in_prefect(env: dict[str, str], secrets) -> None:
    """No secret of the flow's environment in what Prefect keeps (its database) or shows (its API: flow runs, task
    runs, logs, events): the tasks take their environment from the process, not as parameters."""
    api = httpx.Client(base_url=env["PREFECT_API_URL"], timeout=30)
    shown = [api.post(f"/{kind}/filter", json={"limit": 200}).text for kind in ("flow_runs", "task_runs", "logs")]
    shown.append(api.post("/events/filter", json={"limit": 50}).text)
    assert {"evaluate", "register"} <= {run["name"] for run in json.loads(shown[1])}  # what is searched is there
    stored = b"".join(path.read_bytes() for path in Path(env["PREFECT_HOME"]).glob("prefect.db*"))
    for secret in secrets:
        assert secret not in "".join(shown) and secret.encode() not in stored, secret


def test_prefect_flow_reruns_what_changed_and_registers_a_new_version(trained_project, prefect_env):
    """A new evaluation (evaluate.stride) through the Prefect flow: evaluate and register run, train does not; the
    new version belongs to the model's one run, which keeps its training curve, gains an evaluation and is closed."""
    from flows.pipeline import stages

    pipeline = trained_project
    train_metrics = (pipeline / "metrics/train.json").read_text()
    trained_in = json.loads((pipeline / "registered.json").read_text())["run_id"]
    version_before = int(json.loads((pipeline / "registered.json").read_text())["version"])
    write_params(pipeline, merge(tiny_params(), {"evaluate": {"stride": 32}}))
    secrets = {"AWS_SECRET_ACCESS_KEY": "aws-Qz8unique-key", "HF_TOKEN": "hf_Wv3uniqueToken"}
    result = run([str(BIN / "python"), "-m", "flows.pipeline"], pipeline, env={**prefect_env, **secrets})
    output = result.stdout + result.stderr
    assert_no_secret_in_prefect(prefect_env, secrets.values())
    assert "Stage 'train' didn't change, skipping" in output
    assert "git add dvc.lock" not in output and "dvc config core.autostage" not in output  # DVC's terminal hints
    assert [stage for stage in stages(pipeline) if f"Running stage '{stage}'" in output] == ["evaluate", "register"]
    assert (pipeline / "metrics/train.json").read_text() == train_metrics  # not retrained
    registered = json.loads((pipeline / "registered.json").read_text())
    client = store_client(pipeline)
    version = client.get_model_version_by_alias("gpt2-lm", "challenger")
    assert str(version.version) == registered["version"] == str(version_before + 1)
    assert len(version.tags["prefect_flow_run_id"]) == 36  # a UUID
    assert version.tags["evaluate.stride"] == "32"
    # The same model, so the same run: its training curve and now two evaluations, and it is closed again.
    assert registered["run_id"] == version.run_id == trained_in
    model_run = client.get_run(trained_in)
    assert model_run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(trained_in, "train/loss")] == list(range(10, 151, 10))
    evaluations = sorted(m.step for m in client.get_metric_history(trained_in, "eval/perplexity"))
    assert evaluations == list(range(len(evaluations))) and len(evaluations) >= 2  # each evaluation one more step
    perplexity = json.loads((pipeline / "metrics/eval.json").read_text())["perplexity"]
    assert model_run.data.metrics["eval/perplexity"] == pytest.approx(perplexity)
    assert float(version.tags["eval_perplexity"]) == pytest.approx(perplexity)
    assert {"eval_loss", "eval_tokens"} <= set(version.tags) and not [t for t in version.tags if "eval_eval" in t]
    assert version.description.startswith("# gpt2-lm\n") and "perplexity" in version.description  # the card
    for key in ("train/mean_tokens_per_second", "train/mean_mfu"):
        assert model_run.data.metrics[key] > 0, key
    # What a run is, one value each, are tags (MLflow draws every metric as a chart); measurements are metrics.
    facts = ("ingest/train_records", "tokenize/train_blocks", "train/steps", "train/parameters", "train/processes")
    assert all(int(model_run.data.tags[key]) > 0 for key in facts) and not set(facts) & set(model_run.data.metrics)
    assert model_run.data.tags["train/mfu_peak"].startswith(("CPU upper bound", "measured CPU matmul"))
    assert client.get_metric_history(trained_in, "system/cpu_utilization_percentage")  # sampled while training
    every_run = client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
    assert {r.info.status for r in every_run} == {"FINISHED"}  # none left RUNNING
    # The flow run's artifacts in Prefect: the version and its metrics, and which stages ran and which were skipped.
    summary, stages_run = prefect_artifacts(prefect_env, "gpt2-lm-summary", "gpt2-lm-stages")
    assert summary["flow_run_id"] == stages_run["flow_run_id"] == version.tags["prefect_flow_run_id"]
    assert summary["data"].startswith(f"# gpt2-lm version {registered['version']}\n")
    assert f"| perplexity | {perplexity:.6g} |" in summary["data"]
    table = json.loads(stages_run["data"])
    assert [(row["stage"], row["ran"]) for row in table] == [
        ("ingest", "skipped (unchanged)"), ("tokenize", "skipped (unchanged)"), ("train", "skipped (unchanged)"),
        ("evaluate", "ran"), ("register", "ran"),
    ]  # fmt: skip
    assert all(row["seconds"] > 0 for row in table)
    listed = run([str(BIN / "prefect"), "artifact", "ls"], pipeline, env={**prefect_env, "COLUMNS": "250"}).stdout
    assert "gpt2-lm-summary" in listed and "gpt2-lm-stages" in listed
    # A run that fails publishes its one error line.
    write_params(pipeline, merge(tiny_params(), {"data": {"sources": ["data/samples/missing.txt"]}}))
    failed = run([str(BIN / "python"), "-m", "flows.pipeline"], pipeline, check=False, env=prefect_env)
    assert failed.returncode != 0
    (failure,) = prefect_artifacts(prefect_env, "gpt2-lm-failure")
    assert failure["data"].startswith("# The run failed\n\n    stage ingest failed: error: ")
    assert "data/samples/missing.txt" in failure["data"]


def prefect_artifacts(env: dict[str, str], *keys: str) -> list[dict]:
    """The latest artifact of each key, from the Prefect server's API."""
    found = httpx.post(
        f"{env['PREFECT_API_URL']}/artifacts/latest/filter", json={"artifacts": {"key": {"any_": list(keys)}}}
    )
    by_key = {artifact["key"]: artifact for artifact in found.raise_for_status().json()}
    return [by_key[key] for key in keys]


def test_a_new_run_workspace_starts_from_the_committed_outputs(trained_project):
    """A run with a training override runs train onwards: its new workspace has the committed data and tokenizer
    from the shared cache, so DVC does not ingest and tokenize again."""
    from flows import workspace

    folder = workspace.prepare(trained_project, {"train.seed": 9})
    for output in (
        "data/prepared/train/00000.jsonl",
        "data/tokenized/dataset_dict.json",
        "models/tokenizer/tokenizer.json",
    ):
        assert (folder / output).read_bytes() == (trained_project / output).read_bytes()
    changed = run([str(BIN / "dvc"), "status"], folder).stdout
    assert [line for line in changed.splitlines() if not line.startswith(("\t", " "))] == ["train:"], changed


def test_a_registered_model_is_where_a_training_can_start(pipeline, monkeypatch):
    """model.name_or_path: models:/gpt2-lm@challenger gives train the registered weights and tokenize its
    tokenizer (the fine-tune below runs the same path from a folder); an alias that does not exist is one line."""
    import safetensors.torch
    import torch
    from transformers import AutoTokenizer

    from tasks.plumbing.errors import PipelineError
    from tasks.plumbing.params import ModelParams
    from tasks.tracking.loading import load_tokenizer
    from tasks.training.model import build_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{pipeline}/mlflow.db")
    registered = ModelParams(init="pretrained", name_or_path="models:/gpt2-lm@challenger", config={})
    tokenizer = load_tokenizer(registered.name_or_path)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(str(pipeline / "models/gpt2")).get_vocab()
    weights = build_model(registered, tokenizer, 64).state_dict()
    trained = safetensors.torch.load_file(pipeline / "models/gpt2/model.safetensors")
    assert trained and all(torch.equal(weights[name], tensor) for name, tensor in trained.items())
    missing = registered.model_copy(update={"name_or_path": "models:/gpt2-lm@no-such-alias"})
    with pytest.raises(PipelineError, match=r"model\.name_or_path: models:/gpt2-lm@no-such-alias is not in the MLflow"):
        build_model(missing, tokenizer, 64)


def fine_tune_the_trained_model(project, train: dict):
    """Save the project's trained model as a folder of its own (as a user brings one) and set the params to
    fine-tune it with these train settings; its folder and its validation perplexity."""
    base = project / "base/gpt2-shakespeare"
    shutil.copytree(project / "models/gpt2", base)
    start = json.loads((project / "metrics/eval.json").read_text())["perplexity"]
    pretrained = {"init": "pretrained", "name_or_path": "base/gpt2-shakespeare", "config": {}}
    write_params(project, merge(tiny_params(), {"tokenizer": {"kind": "pretrained"}, "model": pretrained,
                                                "train": train}))  # fmt: skip
    return base, start


def test_fine_tune_from_a_local_save_pretrained_folder_beats_its_start(trained_project):
    """The trained model saved as a folder of its own (as a user brings one), fine-tuned further: it starts from
    those weights and ends with a lower validation perplexity than the folder's model had."""
    start_loss = json.loads((trained_project / "metrics/train.json").read_text())["train_loss"]
    _, start = fine_tune_the_trained_model(
        trained_project,
        {"max_steps": 60, "warmup_steps": 0, "learning_rate": 1.0e-3, "eval_steps": 30, "checkpoint_every": 60},
    )
    output = run([str(BIN / "dvc"), "repro", "evaluate"], trained_project).stdout
    assert "Running stage 'train'" in output
    tuned = json.loads((trained_project / "metrics/train.json").read_text())
    assert tuned["train_loss_first"] < start_loss + 0.3  # the folder's weights, not an untrained model's loss
    assert json.loads((trained_project / "metrics/eval.json").read_text())["perplexity"] < start


ADAPTED = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def test_a_lora_fine_tune_registers_a_plain_gpt2_that_serves(trained_project, tmp_path):
    """train.method: lora on the trained model as a pretrained base: the saved and registered model is a plain
    GPT2LMHeadModel folder whose weights are the base's but in the layers the adapters were merged into, better than
    its start; the adapter alone is in the model's run, and serve-model serves the new version."""
    import torch
    from safetensors.torch import load_file

    steps = {"max_steps": 40, "warmup_steps": 0, "learning_rate": 2.0e-3, "eval_steps": 20, "checkpoint_every": 40}
    base, start = fine_tune_the_trained_model(trained_project, {"method": "lora", **steps})
    output = run([str(BIN / "dvc"), "repro"], trained_project).stdout
    assert "Running stage 'train'" in output and "Running stage 'register'" in output
    trained = trained_project / "models/gpt2"
    assert sorted(path.name for path in trained.glob("adapter*")) == []
    before, after = load_file(base / "model.safetensors"), load_file(trained / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {f"transformer.h.{layer}{suffix}" for layer in range(2) for suffix in ADAPTED}
    assert json.loads((trained_project / "metrics/eval.json").read_text())["perplexity"] < start
    metrics = json.loads((trained_project / "metrics/train.json").read_text())
    assert metrics["trainable_parameters"] == 2 * 8 * 1024

    registered = json.loads((trained_project / "registered.json").read_text())
    assert registered["version"] == "2"
    client = store_client(trained_project)
    run_info = client.get_run(registered["run_id"])
    assert (
        run_info.data.tags["train/trainable_parameters"] == "16384" and run_info.data.params["train.method"] == "lora"
    )
    adapter = {artifact.path for artifact in client.list_artifacts(registered["run_id"], "adapter")}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= adapter

    port = free_port()
    command = [str(BIN / "gpt2-pipeline"), "serve-model", "--api", "mlflow", "--model", registered["model_uri"],
               "--port", str(port)]  # fmt: skip
    with process(command, tmp_path / "serve.log", tool_env(), cwd=trained_project) as server:
        wait_http(f"http://{LOOPBACK}:{port}/ping", server, tmp_path / "serve.log")
        body = {"inputs": ["ROMEO:"], "params": {"do_sample": False, "max_new_tokens": 8}}
        answered = httpx.post(f"http://{LOOPBACK}:{port}/invocations", json=body, timeout=120)
    assert answered.status_code == 200, answered.text
    [text] = answered.json()["predictions"]
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")


# What a caller may send wrong, and the one line the served model answers each with (HTTP 400).
REFUSED = [
    ({"inputs": ["ROMEO:"], "params": {"top_p": 2.0}}, "params.top_p: must be > 0 and <= 1 (got 2.0)"),
    (b'{"inputs": ["a"], "params": {"temperature": 1e309}}', "params.temperature: must be a finite number (got inf)"),
    ({"inputs": ["a"], "params": {"max_new_tokens": "abc"}}, "params.max_new_tokens: must be a whole number "
     '(got "abc")'),
    ({"inputs": ["a"], "params": {"max_new_tokens": True}}, "params.max_new_tokens: must be a whole number (got true)"),
    ({"inputs": ["a"], "params": {"num_beams": 4, "max_length": 3}}, "params: this model does not take max_length, "
     "num_beams; it takes max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty"),
    ({"inputs": [{"a": 1}, 5, None]}, "inputs[0]: must be a string (got dict)"),
    ({"inputs": ["a"] * 17, "params": {"max_new_tokens": 1}}, "inputs: 17 prompts, more than the 16 a request may"),
    ({"inputs": ["a"] * 16, "params": {"max_new_tokens": 300}}, "params.max_new_tokens: 16 prompts x 300 new tokens"),
    ({"inputs": ["ROMEO: " * 30], "params": {"max_new_tokens": 5}}, "inputs[0]: 181 tokens and max_new_tokens 5 do "
     "not fit the model's 64 positions; shorten the prompt or ask for fewer new tokens"),
    ({"inputs": ["a" * 1_000_000]}, "inputs[0]: 1,000,000 characters and max_new_tokens 64 do not fit"),
    (b"[" * 100_000 + b"]" * 100_000, "request body: JSON nested deeper than 8 levels"),
    (b"not json", "request body: not JSON (Expecting value: line 1 column 1 (char 0))"),
    ({"dataframe_split": {"columns": ["x"], "data": [["a"]]}}, 'request body: must be {"inputs": [prompts]'),
]  # fmt: skip
GROWTH_BOUND = 64 << 20  # what refused requests may add to the server's memory, all of them together
# Short, so that the test waits little for a 408; longer than serve-model's 3 s of grace on SIGTERM, so that the
# request still sending its body then is in progress when the server stops.
BODY_TIMEOUT = 6
SECRET = "Zq8vX2kP9wLm-served"  # in the server's environment under a secret's name, then in a request's path
HEADERS_ONLY = b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 99\r\n\r\n{"  # and a body that never comes


def answer(sock: socket.socket) -> bytes:
    """All the server sends on a connection until it closes it."""
    sock.settimeout(10 * BODY_TIMEOUT)  # a server that never answers fails the test instead of hanging it
    received = b""
    while chunk := sock.recv(4096):
        received += chunk
    return received


def test_the_served_model_honours_its_settings_and_bounds_every_request(pipeline, tmp_path):
    """`gpt2-pipeline serve-model` on @champion: a request generates as many tokens as it asks for, as this process
    does with the same settings; every request past a limit gets one line (never a stack trace) without growing
    the server's memory; a request past the concurrency limit gets 503; a body that does not come in time gets
    408 and frees its turn; a secret of the environment is in none of the server's log lines; SIGTERM stops it
    within seconds, also with a request in progress."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    store_client(pipeline).set_registered_model_alias("gpt2-lm", "champion", "1")
    port = free_port()
    command = [
        str(BIN / "gpt2-pipeline"),
        "serve-model",
        "--api",
        "mlflow",
        "--port",
        str(port),
        "--max-concurrent",
        "1",
        "--max-queue",
        "0",
        "--body-timeout",
        str(BODY_TIMEOUT),
    ]
    plain_shell = {**tool_env(), "PATH": "/usr/bin:/bin"}  # .venv/bin not on PATH: a user who did not activate it
    plain_shell["SERVING_API_TOKEN"] = SECRET
    url = f"http://{LOOPBACK}:{port}/invocations"
    with process(command, tmp_path / "serve.log", plain_shell, cwd=pipeline) as server:
        wait_http(f"http://{LOOPBACK}:{port}/ping", server, tmp_path / "serve.log")

        def served(body) -> httpx.Response:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            return httpx.post(url, content=raw, headers={"content-type": "application/json"}, timeout=120)

        short, long = (served({"inputs": ["ROMEO:"], "params": {"do_sample": False, "max_new_tokens": n}})
                       for n in (5, 40))  # fmt: skip
        memory = psutil.Process(server.pid)  # the server replaced the CLI's process: the same pid
        before = memory.memory_info().rss
        oversized = [served(b'{"inputs": ["' + b"a" * (10 << 20) + b'"]}') for _ in range(3)]
        refused = [(served(body), expected) for body, expected in REFUSED]
        grown = memory.memory_info().rss - before
        not_found = httpx.get(f"http://{LOOPBACK}:{port}/{SECRET}", timeout=30)  # the access log names the path
        with socket.create_connection((LOOPBACK, port)) as slow:  # a request still sending its body holds its turn
            slow.sendall(HEADERS_ONLY)
            while served({"inputs": ["a"], "params": {"max_new_tokens": 1}}).status_code != 503:
                pass  # until the server has read the slow request's headers
            busy = served({"inputs": ["a"], "params": {"max_new_tokens": 1}})
            late = answer(slow)  # ... until --body-timeout, then 408 and the connection closed
        after_late = served({"inputs": ["a"], "params": {"max_new_tokens": 1}})
        with socket.create_connection((LOOPBACK, port)) as slow:
            slow.sendall(HEADERS_ONLY)
            while served({"inputs": ["a"], "params": {"max_new_tokens": 1}}).status_code != 503:
                pass
            server.terminate()
            server.wait(timeout=30)  # stopped, not killed, though a request was in progress
            last_word = slow.recv(4096)
    for response in [short, long]:
        assert response.status_code == 200, response.text
    assert [r.status_code for r in oversized] == [413] * 3
    assert oversized[0].json()["message"] == (
        "request body: 10,485,776 bytes, more than 1,048,576 (serve-model --max-body-bytes)"
    )
    for response, expected in refused:
        assert response.status_code == 400 and response.json()["message"].startswith(expected), response.text
        assert set(response.json()) == {"error_code", "message"} and "Traceback" not in response.text
    assert grown < GROWTH_BOUND, f"the server grew {grown >> 20} MB answering refused requests"
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert late.startswith(b"HTTP/1.1 408 ") and json.loads(late.partition(b"\r\n\r\n")[2]) == {
        "error_code": "DEADLINE_EXCEEDED",
        "message": f"request body: not all sent within {BODY_TIMEOUT} s (serve-model --body-timeout)",
    }
    assert after_late.status_code == 200, after_late.text  # the turn it held went to the next request
    # uvicorn ends by re-raising the SIGTERM it handled: -15 after a clean stop (-9 had it been killed).
    assert server.returncode == -signal.SIGTERM and b"503 Service Unavailable" in last_word
    log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in log
    assert not_found.status_code == 404 and SECRET not in log and '"GET /*** HTTP/1.1" 404' in log, log[-3000:]
    tokenizer = AutoTokenizer.from_pretrained(pipeline / "models/gpt2")
    model = GPT2LMHeadModel.from_pretrained(pipeline / "models/gpt2")
    prompt = tokenizer("ROMEO:", return_tensors="pt")["input_ids"]
    for served_text, asked in ((short.json()["predictions"][0], 5), (long.json()["predictions"][0], 40)):
        ids = model.generate(prompt, max_new_tokens=asked, do_sample=False)[0]  # greedy: the same tokens
        assert len(ids) - prompt.shape[1] == asked
        assert served_text == tokenizer.decode(ids, skip_special_tokens=True).strip()  # MLflow strips it


def test_a_generation_past_its_time_limit_stops_and_says_so(pipeline):
    """The served model's loader (any MLflow server's) ends a generation at its deadline, or at once when the
    server stops, and answers 504 (DEADLINE_EXCEEDED) instead of running on after the caller has gone."""
    from mlflow.exceptions import MlflowException

    with mlflow_on(f"sqlite:///{pipeline}/mlflow.db") as mlflow:
        hurried = mlflow.pyfunc.load_model("models:/gpt2-lm/1", model_config={"timeout_seconds": 1e-9})
        stopping = mlflow.pyfunc.load_model("models:/gpt2-lm/1")
    request = {"max_new_tokens": 40, "do_sample": False}
    with pytest.raises(MlflowException, match=r"generation stopped before it finished: 1e-09 s passed") as late:
        hurried.predict(["ROMEO:"], params=request)
    assert late.value.get_http_status_code() == 504
    assert len(stopping.predict(["ROMEO:"], params=request)[0]) > len("ROMEO:")
    with pytest.raises(MlflowException, match=r"^params.max_new_tokens: must be a whole number \(got null\)$") as null:
        stopping.predict(["ROMEO:"], params={"max_new_tokens": None})  # MLflow's own check lets null through
    assert null.value.get_http_status_code() == 400
    stopping._model_impl.stop()  # what the server does on SIGTERM
    with pytest.raises(MlflowException, match="the server is stopping"):
        stopping.predict(["ROMEO:"], params=request)


REGISTER_ALONE = """
import json, sys
from tasks.tracking import mlflow_runs
from tasks.plumbing.params import load_params
from tasks.plumbing.paths import MODEL_DIR
from tasks.register import register
params = load_params()
version = register(params, mlflow_runs.model_run(params, MODEL_DIR))["version"]
print(json.dumps({"version": version, "loaded": sorted({"torch", "transformers"} & set(sys.modules))}))
"""


def test_registering_logs_the_trained_files_as_they_are_without_loading_them(trained_project):
    """Register hands MLflow the save_pretrained folder's files (no load, no second save): the version's weights
    are the trained bytes, its requirements are pinned, and the register process never imported torch."""
    result = run([str(BIN / "python"), "-c", REGISTER_ALONE], trained_project)
    outcome = json.loads(result.stdout.splitlines()[-1])
    assert outcome["loaded"] == []
    with mlflow_on(f"sqlite:///{trained_project}/mlflow.db") as mlflow:
        uri = f"models:/gpt2-lm/{outcome['version']}"
        local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(trained_project / "dl")))
    trained = trained_project / "models/gpt2"
    for name, folder in (
        ("model.safetensors", "model"),
        ("config.json", "model"),
        ("tokenizer.json", "components/tokenizer"),
    ):
        assert (local / folder / name).read_bytes() == (trained / name).read_bytes(), name
    assert not (local / "model" / "mlflow_run.json").exists()
    # In the project's local store the weights are the trained file itself, hard-linked: no second copy; the small
    # files a user might edit in place are copies.
    client = store_client(trained_project)
    source = client.get_model_version("gpt2-lm", outcome["version"]).source  # models:/<logged model id>
    logged = client.get_logged_model(source.removeprefix("models:/"))
    stored = Path(logged.artifact_location.removeprefix("file://")) / "model"
    assert (stored / "model.safetensors").stat().st_ino == (trained / "model.safetensors").stat().st_ino
    assert (stored / "config.json").stat().st_ino != (trained / "config.json").stat().st_ino
    assert str(logged.status) == "READY"  # finalized, and its page in the UI lists the version made from it
    assert logged.experiment_id == client.get_run(logged.source_run_id).info.experiment_id != "0"
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": "gpt2-lm", "version": int(outcome["version"])}]
    requirements = (local / "requirements.txt").read_text().split()
    assert f"torch=={version('torch')}" in requirements and f"mlflow=={version('mlflow')}" in requirements
