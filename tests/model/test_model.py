"""Behaviour of real (tiny) GPT-2 models: exact perplexity, both initializations, training that learns."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import threading
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from tasks.evaluate import evaluate, load_model, score, windows
from tasks.plumbing.errors import PipelineError
from tasks.plumbing.params import ModelParams, parse_params
from tasks.tokenize import tokenize
from tasks.tracking import mlflow_runs, store
from tasks.train import _save, train
from tasks.training.callbacks import MlflowLogger
from tasks.training.model import build_model, for_training
from tests.helpers import merge, tiny_params

TOKENIZER_SIZE = 500  # not a multiple of 128: the models here train with their vocabulary padded to 512


@pytest.fixture
def tokenized(prepared, tmp_path):
    params = parse_params(merge(tiny_params(), {"tokenizer": {"vocab_size": TOKENIZER_SIZE}}))
    tokenize(params.tokenizer, ModelParams(), prepared, tmp_path / "tokenizer", tmp_path / "tokenized")
    return tmp_path


def tiny_model(vocab: int = 512) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_layer=1, n_head=2, n_embd=32, n_positions=64))


def test_perplexity_is_token_weighted_over_the_whole_split():
    model = tiny_model()
    ids = torch.randint(0, 512, (5, 64))
    blocks = datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "token_bytes": [[2] * 64] * 5, "token_chars": [[1] * 64] * 5}
    )
    result = score(model, blocks.with_format("torch")[:], 64, 64, batch_size=2, device="cpu")  # batches of 2, 2, 1
    with torch.no_grad():
        direct = model(input_ids=ids, labels=ids).loss.item()  # mean over all 5 * 63 predicted tokens
    metrics = result.metrics()
    assert result.tokens == 5 * 63 and result.bytes == 5 * 63 * 2
    assert metrics["perplexity"] == pytest.approx(math.exp(direct), rel=1e-4)
    assert metrics["bits_per_byte"] == pytest.approx(direct / math.log(2) / 2, rel=1e-4)
    assert metrics["bits_per_char"] == pytest.approx(direct / math.log(2), rel=1e-4)


def evaluate_untrained(model_dir, tokenized_dir) -> dict:
    model = GPT2LMHeadModel(GPT2LMHeadModel.from_pretrained(model_dir).config)
    blocks = datasets.load_from_disk(str(tokenized_dir))["validation"].with_format("torch")[:]
    return score(model, blocks, 64, 64, 8, "cpu").metrics()


def test_windows_score_every_token_once():
    assert windows(10, 4, 4) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]  # blocks: the first of each unscored
    assert windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]  # tokens 1..9 once each


def test_sliding_window_matches_a_direct_computation_and_lowers_perplexity():
    model = tiny_model()
    pattern = (torch.arange(64) % 37).unsqueeze(0)  # a model that has learned something, so context helps
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        model(input_ids=pattern, labels=pattern).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    torch.manual_seed(1)
    stream = torch.randint(0, 37, (4 * 64,))
    ones = torch.ones(4, 64, dtype=torch.long)
    blocks = {"input_ids": stream.reshape(4, 64), "token_bytes": ones, "token_chars": ones}
    strided = score(model, blocks, 64, 16, batch_size=3, device="cpu")
    direct_nll, direct_tokens = 0.0, 0
    with torch.no_grad():  # the guide's loop, one window at a time, labels masked outside the scored tokens
        for begin, end, first in windows(len(stream), 64, 16):
            labels = stream[begin:end].clone()
            labels[: first - begin] = -100
            count = int((labels[1:] != -100).sum())
            direct_nll += (
                model(input_ids=stream[begin:end].unsqueeze(0), labels=labels.unsqueeze(0)).loss.item() * count
            )
            direct_tokens += count
    assert strided.tokens == direct_tokens == len(stream) - 1 == strided.bytes
    assert strided.metrics()["perplexity"] == pytest.approx(math.exp(direct_nll / direct_tokens), rel=1e-4)
    blockwise = score(model, blocks, 64, 64, batch_size=3, device="cpu")
    assert strided.metrics()["perplexity"] < blockwise.metrics()["perplexity"]


def test_the_vocabulary_is_padded_for_training_only(tokenized, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenized / "tokenizer"))
    model = build_model(parse_params(tiny_params()).model, tokenizer, 64)
    assert model.config.vocab_size == len(tokenizer) == TOKENIZER_SIZE
    assert model.config.n_layer == 2 and model.config.eos_token_id == tokenizer.eos_token_id
    reference = copy.deepcopy(model)
    for_training(model)
    assert model.get_input_embeddings().weight.shape[0] == model.lm_head.weight.shape[0] == 512
    ids = torch.randint(0, TOKENIZER_SIZE, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the padding columns take no probability: the loss is the unpadded model's
        assert model(input_ids=ids, labels=ids).loss.item() == pytest.approx(
            reference(input_ids=ids, labels=ids).loss.item(), rel=1e-5
        )
    _save(model, tokenizer, tmp_path / "saved", "run-id")
    saved = GPT2LMHeadModel.from_pretrained(tmp_path / "saved")
    assert saved.config.vocab_size == saved.lm_head.weight.shape[0] == TOKENIZER_SIZE  # no padding id to sample
    torch.testing.assert_close(saved.lm_head.weight, reference.lm_head.weight)


def test_pretrained_from_a_local_folder_resizes_embeddings(tokenized, tmp_path, capsys):
    tiny_model(vocab=300).save_pretrained(tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenized / "tokenizer"))
    model = build_model(ModelParams(init="pretrained", name_or_path=str(tmp_path / "base")), tokenizer, 64)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert f"resizing token embeddings from 300 to {len(tokenizer)}" in capsys.readouterr().out
    with pytest.raises(PipelineError, match=r"tokenizer.block_size: 128 exceeds the n_positions \(64\)"):
        build_model(ModelParams(init="pretrained", name_or_path=str(tmp_path / "base")), tokenizer, 128)


def test_unreachable_hub_model_says_use_a_local_folder(tokenized):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenized / "tokenizer"))
    with pytest.raises(
        PipelineError, match=r"model.name_or_path: cannot load 'no-such-org/gpt2-x'.*local save_pretrained"
    ):
        build_model(ModelParams(init="pretrained", name_or_path="no-such-org/gpt2-x"), tokenizer, 64)


def train_here(params, run_id: str, tokenized, tmp_path) -> dict:
    """The train stage with every input and output in the test's folders."""
    return train(
        params,
        run_id,
        tokenized / "tokenizer",
        tokenized / "tokenized",
        tmp_path / "model",
        tmp_path / "plots",
        tmp_path / "checkpoints",
    )


def test_training_lowers_loss_and_perplexity(tokenized, tmp_path, mlflow_run):
    params = parse_params(merge(tiny_params(), {"train": {"max_steps": 60, "eval_steps": 30, "checkpoint_every": 30}}))
    metrics = train_here(params, mlflow_run, tokenized, tmp_path)
    assert metrics["steps"] == 60 and metrics["tokens_seen"] == 60 * 8 * 64
    assert metrics["train_loss"] < 0.9 * metrics["train_loss_first"]
    assert 0 < metrics["mfu"] < 1 and metrics["tokens_per_second"] > 0
    assert (tmp_path / "model/model.safetensors").exists() and (tmp_path / "model/tokenizer.json").exists()
    assert json.loads((tmp_path / "model/generation_config.json").read_text())["eos_token_id"] == 0
    assert not (tmp_path / "checkpoints").exists(), "a finished run leaves no checkpoints for the next one"
    rows = (tmp_path / "plots/train_loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss" and len(rows) == 1 + 6
    evals = (tmp_path / "plots/eval_loss.csv").read_text().splitlines()
    assert evals[0] == "step,eval_loss" and [row.split(",")[0] for row in evals[1:]] == ["30", "60"]
    image = (tmp_path / "plots/loss.svg").read_text()  # both curves, every point: 6 logged steps, 2 evaluations
    assert [len(points.split()) for points in re.findall(r'<polyline points="([^"]+)"', image)] == [6, 2]
    client = store.client()
    for key in ("train/loss", "train/learning_rate", "train/tokens_per_second", "train/mfu"):
        assert [m.step for m in client.get_metric_history(mlflow_run, key)] == [10, 20, 30, 40, 50, 60], key
    assert [m.step for m in client.get_metric_history(mlflow_run, "train/eval_loss")] == [30, 60]
    trained = evaluate(load_model(tmp_path / "model")[0], tokenized / "tokenized", batch_size=8, device="cpu")
    untrained = evaluate_untrained(tmp_path / "model", tokenized / "tokenized")
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
    warnings_seen, warned, trainer_log = [], logging.Handler(), logging.getLogger("transformers.trainer")
    warned.emit = lambda record: warnings_seen.append(record.getMessage())
    trainer_log.addHandler(warned)
    try:
        metrics = train_here(params, mlflow_run, tokenized, tmp_path)
    finally:
        trainer_log.removeHandler(warned)
    evals = [m.value for m in store.client().get_metric_history(mlflow_run, "train/eval_loss")]
    assert metrics["steps"] < 300 and len(evals) == metrics["steps"] // 10
    assert min(evals[-2:]) > min(evals) == metrics["best_eval_loss"]  # stopped after two evaluations no better
    kept = evaluate(load_model(tmp_path / "model")[0], tokenized / "tokenized", batch_size=8, device="cpu")
    assert kept["eval_loss"] == pytest.approx(metrics["best_eval_loss"], rel=1e-4)
    # The tied head came back with the embedding: no warning that the best checkpoint lacked lm_head.weight.
    assert not [message for message in warnings_seen if "missing keys" in message]


def test_samples_fit_in_the_model_positions(tokenized):
    from tasks.evaluate import sample
    from tasks.plumbing.params import GenerationParams

    tokenizer = AutoTokenizer.from_pretrained(str(tokenized / "tokenizer"))
    model = build_model(parse_params(tiny_params()).model, tokenizer, 64)  # 64 positions
    settings = GenerationParams(max_new_tokens=500, temperature=1.0, top_k=0, top_p=1.0)
    [generated] = sample(model, tokenizer, ["ROMEO:"], settings)  # 500 new tokens would overrun: capped
    assert generated["prompt"] == "ROMEO:" and generated["text"].startswith("ROMEO:")
    assert sample(model, tokenizer, ["ROMEO:"], settings) == [generated]  # the fixed seed repeats itself
    with pytest.raises(PipelineError, match=r"evaluate.prompts: .* fills the model's 64 positions; shorten it"):
        sample(model, tokenizer, ["ROMEO: " * 64], settings)


def test_metrics_go_to_mlflow_in_batches_and_before_each_checkpoint(tokenized, tmp_path, mlflow_run, monkeypatch):
    """Logging every step must not cost a request every step; a checkpoint never holds steps MLflow lacks."""
    requests = []  # (steps sent, checkpoints on disk at that moment)
    senders = set()  # the threads the sends ran in: not training's
    send = mlflow_runs.log_metric_steps

    def counted(run_id, entries):
        on_disk = {int(p.name.split("-")[1]) for p in (tmp_path / "checkpoints").glob("checkpoint-*")}
        requests.append(({step for step, _, _ in entries}, on_disk))
        senders.add(threading.current_thread().name.split("_")[0])
        send(run_id, entries)

    monkeypatch.setattr(mlflow_runs, "log_metric_steps", counted)
    # No timer: flushes come from the first logging step, each checkpoint and the end, the same on any machine.
    monkeypatch.setattr(MlflowLogger, "FLUSH_SECONDS", math.inf)
    steps = {"max_steps": 60, "logging_steps": 1, "eval_steps": 20, "checkpoint_every": 20}
    train_here(parse_params(merge(tiny_params(), {"train": steps})), mlflow_run, tokenized, tmp_path)
    history = store.client().get_metric_history(mlflow_run, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 61))  # every step, once
    assert len(requests) <= 10, f"{len(requests)} requests for 60 logging steps"
    assert senders == {"mlflow-metrics"}, senders  # training goes on while a batch is sent
    for checkpoint in (20, 40):  # step 20 went out before checkpoint-20 was written
        sent_with = [on_disk for sent, on_disk in requests if checkpoint in sent]
        assert sent_with and checkpoint not in sent_with[0], requests


LORA = {"method": "lora", "max_steps": 40, "eval_steps": 20, "checkpoint_every": 20, "logging_steps": 10}
ADAPTED = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def test_lora_saves_a_plain_gpt2_changed_only_where_its_adapters_were_merged(tokenized, tmp_path, mlflow_run):
    """train.method: lora trains the adapters alone and saves a plain GPT2LMHeadModel folder: no peft file or key,
    the initial weights but in the adapted layers, and the same logits as the initial model with the adapter the run
    holds (so merging changed nothing the adapter computes)."""
    from mlflow.artifacts import download_artifacts
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import set_seed

    from tasks.training.memory import lora_parameters, shape

    params = parse_params(merge(tiny_params(), {"train": LORA}))
    metrics = train_here(params, mlflow_run, tokenized, tmp_path)
    assert metrics["train_loss"] < metrics["train_loss_first"]  # slowly: the frozen weights are random ones
    assert metrics["trainable_parameters"] == lora_parameters(params, shape(params)) == 2 * 8 * 1024
    saved_dir = tmp_path / "model"
    assert not list(saved_dir.glob("adapter*"))
    assert not [key for key in load_file(saved_dir / "model.safetensors") if "lora" in key or "base_layer" in key]
    saved = GPT2LMHeadModel.from_pretrained(saved_dir).eval()
    assert type(saved) is GPT2LMHeadModel and saved.num_parameters() == metrics["parameters"]

    tokenizer = AutoTokenizer.from_pretrained(str(tokenized / "tokenizer"))
    set_seed(params.train.seed)  # as train does before it builds the model
    initial = build_model(params.model, tokenizer, params.tokenizer.block_size).eval()
    start, end = initial.state_dict(), saved.state_dict()
    assert start.keys() == end.keys()
    changed = {name for name in start if not torch.equal(start[name], end[name])}
    assert changed == {f"transformer.h.{layer}{suffix}" for layer in range(2) for suffix in ADAPTED}

    adapter = download_artifacts(
        run_id=mlflow_run,
        artifact_path="adapter",
        dst_path=str(tmp_path / "adapter"),
        tracking_uri=os.environ["MLFLOW_TRACKING_URI"],  # not MLflow's process-wide URI, which another test may set
    )
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in Path(adapter).iterdir()}
    ids = torch.randint(0, TOKENIZER_SIZE, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(initial, adapter).eval()(input_ids=ids).logits
        torch.testing.assert_close(saved(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)


def test_a_stopped_lora_training_resumes_from_its_adapter_checkpoint(tokenized, tmp_path, mlflow_run, monkeypatch):
    """SIGTERM at step 15: the checkpoint holds the adapter and its optimizer state (no frozen weight), and the
    resumed training ends where an uninterrupted one does."""
    import signal

    from tasks.plumbing.errors import Stopped
    from tasks.training import checkpoints

    params = parse_params(merge(tiny_params(), {"train": LORA}))
    whole = train_here(params, mlflow_run, tokenized, tmp_path / "whole")
    began = MlflowLogger.on_step_begin

    def stop_at_15(self, args, state, control, **kwargs):
        if state.global_step == 14:  # the 15th step begins
            signal.raise_signal(signal.SIGTERM)
        return began(self, args, state, control, **kwargs)

    monkeypatch.setattr(MlflowLogger, "on_step_begin", stop_at_15)
    stopped = tmp_path / "stopped"
    with pytest.raises(Stopped, match="at step 15"):
        train_here(params, mlflow_run, tokenized, stopped)
    monkeypatch.setattr(MlflowLogger, "on_step_begin", began)
    checkpoint = checkpoints.last_checkpoint(stopped / "checkpoints")
    assert checkpoint.endswith("checkpoint-15")
    assert (
        not (Path(checkpoint) / "model.safetensors").exists()
        and (Path(checkpoint) / "adapter_model.safetensors").exists()
    )
    resumed = train(params, mlflow_run, tokenized / "tokenizer", tokenized / "tokenized", stopped / "model",
                    stopped / "plots", stopped / "checkpoints", resume_from=checkpoint)  # fmt: skip
    assert resumed["steps"] == 40
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-3)
    ends = [GPT2LMHeadModel.from_pretrained(folder / "model").state_dict() for folder in (tmp_path / "whole", stopped)]
    for name, tensor in ends[0].items():
        torch.testing.assert_close(ends[1][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
