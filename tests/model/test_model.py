"""Behaviour of real (tiny) GPT-2 models: exact perplexity, both initializations, training that learns."""

from __future__ import annotations

import json
import math

import datasets
import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from tasks import tracking
from tasks.common import PipelineError
from tasks.evaluate import evaluate, score_blocks
from tasks.params import ModelParams, parse_params
from tasks.tokenize import tokenize
from tasks.train import build_model, padded_vocab, train
from tests.conftest import merge, tiny_params


@pytest.fixture
def tokenized(prepared, tmp_path):
    tokenize(
        parse_params(tiny_params()).tokenizer, ModelParams(), prepared, tmp_path / "tokenizer", tmp_path / "tokenized"
    )
    return tmp_path


def tiny_model(vocab: int = 512) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_layer=1, n_head=2, n_embd=32, n_positions=64))


def test_perplexity_is_token_weighted_over_the_whole_split():
    model = tiny_model()
    ids = torch.randint(0, 512, (5, 64))
    blocks = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "token_bytes": [[2] * 64] * 5})
    score = score_blocks(model, blocks.with_format("torch"), batch_size=2, device="cpu")  # batches of 2, 2, 1
    with torch.no_grad():
        direct = model(input_ids=ids, labels=ids).loss.item()  # mean over all 5 * 63 predicted tokens
    metrics = score.metrics()
    assert score.tokens == 5 * 63 and score.bytes == 5 * 63 * 2
    assert metrics["perplexity"] == pytest.approx(math.exp(direct), rel=1e-4)
    assert metrics["bits_per_byte"] == pytest.approx(direct / math.log(2) / 2, rel=1e-4)


def test_scratch_model_pads_the_vocabulary(tokenized):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenized / "tokenizer"))
    model = build_model(parse_params(tiny_params()).model, tokenizer, 64)
    assert model.config.vocab_size == padded_vocab(len(tokenizer)) == 512
    assert model.config.n_layer == 2 and model.config.eos_token_id == tokenizer.eos_token_id


def test_pretrained_from_a_local_folder_resizes_embeddings(tokenized, tmp_path, capsys):
    tiny_model(vocab=300).save_pretrained(tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenized / "tokenizer"))
    model = build_model(ModelParams(init="pretrained", name_or_path=str(tmp_path / "base")), tokenizer, 64)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert f"resizing token embeddings from 300 to {len(tokenizer)}" in capsys.readouterr().out
    with pytest.raises(PipelineError, match=r"tokenizer.block_size: 128 exceeds the n_positions \(64\)"):
        build_model(ModelParams(init="pretrained", name_or_path=str(tmp_path / "base")), tokenizer, 128)


def test_unreachable_hub_model_says_use_a_local_folder(tokenized, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenized / "tokenizer"))
    with pytest.raises(
        PipelineError, match=r"model.name_or_path: cannot load 'no-such-org/gpt2-x'.*local save_pretrained"
    ):
        build_model(ModelParams(init="pretrained", name_or_path="no-such-org/gpt2-x"), tokenizer, 64)


def test_training_lowers_loss_and_perplexity(tokenized, tmp_path, mlflow_run):
    params = parse_params(merge(tiny_params(), {"train": {"max_steps": 60, "eval_steps": 30, "checkpoint_every": 30}}))
    metrics = train(
        params,
        mlflow_run,
        tokenized / "tokenizer",
        tokenized / "tokenized",
        tmp_path / "model",
        tmp_path / "plots/train_loss.csv",
        tmp_path / "checkpoints",
    )
    assert metrics["steps"] == 60 and metrics["tokens_seen"] == 60 * 8 * 64
    assert metrics["train_loss"] < 0.9 * metrics["train_loss_first"]
    assert 0 < metrics["mfu"] < 1 and metrics["tokens_per_second"] > 0
    assert (tmp_path / "model/model.safetensors").exists() and (tmp_path / "model/tokenizer.json").exists()
    assert json.loads((tmp_path / "model/generation_config.json").read_text())["eos_token_id"] == 0
    assert not (tmp_path / "checkpoints").exists(), "a finished run leaves no checkpoints for the next one"
    rows = (tmp_path / "plots/train_loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss" and len(rows) == 1 + 6
    client = tracking.client()
    for key in ("train/loss", "train/learning_rate", "train/tokens_per_second", "train/mfu"):
        assert [m.step for m in client.get_metric_history(mlflow_run, key)] == [10, 20, 30, 40, 50, 60], key
    assert [m.step for m in client.get_metric_history(mlflow_run, "train/eval_loss")] == [30, 60]
    trained = evaluate(tmp_path / "model", tokenized / "tokenized", batch_size=8, device="cpu")
    untrained = score_blocks(
        GPT2LMHeadModel(GPT2LMHeadModel.from_pretrained(tmp_path / "model").config),
        datasets.load_from_disk(str(tokenized / "tokenized"))["validation"].with_format("torch"),
        8,
        "cpu",
    ).metrics()
    assert trained["perplexity"] < untrained["perplexity"] / 2


def test_early_stopping_keeps_the_best_model(tokenized, tmp_path, mlflow_run):
    # A learning rate far too high makes the validation loss climb after its first evaluations.
    unstable = {
        "learning_rate": 0.05,
        "lr_scheduler": "constant_with_warmup",
        "warmup_steps": 0,
        "max_steps": 300,
        "eval_steps": 10,
        "checkpoint_every": 10,
        "early_stopping_patience": 2,
    }
    params = parse_params(merge(tiny_params(), {"train": unstable}))
    metrics = train(
        params,
        mlflow_run,
        tokenized / "tokenizer",
        tokenized / "tokenized",
        tmp_path / "model",
        tmp_path / "plots.csv",
        tmp_path / "checkpoints",
    )
    evals = [m.value for m in tracking.client().get_metric_history(mlflow_run, "train/eval_loss")]
    assert metrics["steps"] < 300 and len(evals) == metrics["steps"] // 10
    assert min(evals[-2:]) > min(evals) == metrics["best_eval_loss"]  # stopped after two evaluations no better
    kept = evaluate(tmp_path / "model", tokenized / "tokenized", batch_size=8, device="cpu")
    assert kept["eval_loss"] == pytest.approx(metrics["best_eval_loss"], rel=1e-4)
