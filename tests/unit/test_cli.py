"""The gpt2-pipeline CLI: a bad params file is refused before it replaces params.yaml."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from tests.helpers import default_params, merge, write_params

runner = CliRunner()


def test_run_refuses_a_bad_params_file_and_keeps_params_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, default_params())
    before = (tmp_path / "params.yaml").read_text()
    bad = tmp_path / "other.yaml"
    bad.write_text(yaml.safe_dump(merge(default_params(), {"model": {"config": {"n_embd": 130}}})))
    result = runner.invoke(app, ["run", "--params", str(bad)])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: {bad}: model.config.n_embd (130) must be divisible by model.config.n_head (4)"
    )
    assert (tmp_path / "params.yaml").read_text() == before


def test_summary_without_a_run_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["summary"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: metrics/train.json: not found; run the pipeline first (make run)"


def test_summary_prints_metrics_and_the_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/train.json").write_text(
        json.dumps(
            {
                "steps": 10,
                "device": "cpu",
                "train_loss_first": 8.0,
                "train_loss": 5.5,
                "tokens_per_second": 100.0,
                "seconds": 3.0,
            }
        )
    )
    (tmp_path / "metrics/eval.json").write_text(
        json.dumps({"perplexity": 81.25, "bits_per_byte": 1.9, "eval_tokens": 1000})
    )
    (tmp_path / "registered.json").write_text(
        json.dumps(
            {
                "name": "gpt2-lm",
                "version": "3",
                "alias": "challenger",
                "run_id": "abc",
                "model_uri": "models:/gpt2-lm/3",
            }
        )
    )
    result = runner.invoke(app, ["summary"])
    assert result.exit_code == 0
    assert "evaluated perplexity 81.25, bits/byte 1.900 on 1000 validation tokens" in result.stdout
    assert "registered models:/gpt2-lm/3 as models:/gpt2-lm@challenger" in result.stdout


DOWN = "http://127.0.0.1:9"  # nothing listens on the discard port of the loopback


def test_promote_rollback_and_serve_model_check_the_tracking_server_first(tmp_path, monkeypatch):
    """A server that is down is one line naming it, before any work: not minutes of retries, nor "no @champion"."""
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, default_params())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", DOWN)
    for command in (["promote"], ["rollback"], ["serve-model"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, (command, result.output)
        assert result.stderr.startswith(f"error: MLflow tracking server {DOWN} is not reachable (")
        assert len(result.stderr.strip().splitlines()) == 1


def test_an_absent_alias_is_none_but_a_failing_server_is_an_error(tmp_path, monkeypatch, empty_store):
    """alias_version says None only for a model or alias that does not exist; a server that does not answer is
    not read as "no @challenger"."""
    from mlflow.exceptions import MlflowException

    from tasks.tracking import registry, store
    from tests.helpers import store_copy

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_copy(empty_store, tmp_path / "mlflow.db"))
    assert registry.alias_version("gpt2-lm", "challenger") is None  # no such model
    store.client().create_registered_model("gpt2-lm")
    assert registry.alias_version("gpt2-lm", "challenger") is None  # no such alias
    monkeypatch.setenv("MLFLOW_TRACKING_URI", DOWN)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with pytest.raises(MlflowException):
        registry.alias_version("gpt2-lm", "challenger")


def test_run_reports_a_fault_in_the_flow_as_a_fault_on_one_line(tmp_path, monkeypatch):
    """An unforeseen RuntimeError in the flow (in-process promotion, Prefect) is exit 1, retry may help, in one
    line; not exit 2, which says the same input will fail again."""
    import flows.pipeline
    from flows import server

    def broken(**kwargs):
        raise RuntimeError("the promotion's server went away\nwith a second line")

    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, default_params())
    monkeypatch.setattr(server, "start_local", lambda: None)
    monkeypatch.setattr(flows.pipeline, "training_pipeline", broken)
    result = runner.invoke(app, ["run", "--promote"])
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "error: RuntimeError: the promotion's server went away (set GPT2_PIPELINE_DEBUG=1 or pass --verbose for "
        "the traceback)"
    )


def test_help_shows_whole_defaults_and_no_type_on_flags():
    result = runner.invoke(app, ["serve-model", "--help"], terminal_width=80)
    assert "models:/<register.model_name>@champion" in " ".join(result.stdout.split())
    assert "<bool>" not in runner.invoke(app, ["run", "--help"], terminal_width=80).stdout


def test_an_empty_exception_message_is_still_one_line():
    from tasks.plumbing.errors import first_line, unexpected

    assert first_line(OSError()) == "no message" and first_line(ValueError("a\nb")) == "a"
    assert unexpected(OSError()).startswith("OSError: no message (set ")


def test_a_stopped_first_training_does_not_claim_a_previous_model(tmp_path):
    from tasks.training.callbacks import kept

    assert kept(tmp_path / "models/gpt2") == f"there is no model in {tmp_path / 'models/gpt2'} yet"
    (tmp_path / "models/gpt2").mkdir(parents=True)
    (tmp_path / "models/gpt2/model.safetensors").write_bytes(b"weights")
    assert kept(tmp_path / "models/gpt2") == f"{tmp_path / 'models/gpt2'} keeps the previous model"


def test_dvc_s_hints_for_a_terminal_stay_out_of_the_flow_s_log():
    from flows.pipeline import for_the_log

    hints = ["To track the changes with git, run:", "\tgit add dvc.lock", "To enable auto staging, run:",
             "\tdvc config core.autostage true", "Use `dvc push` to send your updates to remote storage.",
             "", "  "]  # fmt: skip
    kept_lines = ["Running stage 'train':", "> python3 -m tasks.train", "train: 150 steps, loss 7.1 -> 3.2"]
    assert not any(for_the_log(line) for line in hints)
    assert all(for_the_log(line) for line in kept_lines)


def test_compare_never_replaces_a_file_of_the_users(tmp_path, monkeypatch):
    """`compare --output params.yaml` used to write HTML over params.yaml: a file that is not a report compare wrote
    (also one named compare.html in the folder given) is refused before any work; a report it wrote is replaced."""
    from flows.cli import refuse_to_replace
    from tasks.plumbing.errors import PipelineError
    from tasks.tracking.report import GENERATOR

    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, default_params())
    before = (tmp_path / "params.yaml").read_text()
    result = runner.invoke(app, ["compare", "models:/gpt2-lm/1", "models:/gpt2-lm/2", "--output", "params.yaml"])
    assert (result.exit_code, result.stderr) == (
        2,
        "error: compare --output params.yaml: exists and is not a report compare wrote; name a new file, or pass "
        "--force to replace it\n",
    )
    assert (tmp_path / "params.yaml").read_text() == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/compare.html").write_text("<p>my own page</p>")
    with pytest.raises(PipelineError, match=r"^compare --output mine/compare\.html: exists"):
        refuse_to_replace(tmp_path.joinpath("mine/compare.html").relative_to(tmp_path), force=False)
    refuse_to_replace(tmp_path / "mine/compare.html", force=True)
    (tmp_path / "old.html").write_text(f"<!DOCTYPE html>\n<html><head>{GENERATOR}</head></html>")
    refuse_to_replace(tmp_path / "old.html", force=False)  # a report it wrote: replaced, as a rerun expects
    refuse_to_replace(tmp_path / "new.html", force=False)
