"""The gpt2-pipeline CLI: a bad params file is refused before it replaces params.yaml."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from flows.cli import app
from tests.conftest import default_params, merge, write_params

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
