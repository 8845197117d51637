"""Fine-tuning the Chinese GPT-2s people use (a BERT vocabulary, uer's and GPT2-chitchat's framing, weights as
safetensors or pytorch_model.bin), built offline and trained through `dvc repro` on the bundled corpora."""

from __future__ import annotations

import json
import math
import re

import pytest
import yaml

from examples.bert_gpt2 import bert_gpt2
from tests.helpers import BIN, cli_here, copy_project, merge, mlflow_on, run, store_client, write_params

pytestmark = pytest.mark.slow

CJK_SPACE = re.compile(r"[\u4e00-\u9fff] [\u4e00-\u9fff]")  # a space between two Chinese characters
TRAIN = {"max_steps": 60, "batch_size": 8, "learning_rate": 3.0e-3, "warmup_steps": 10, "logging_steps": 10,
         "eval_steps": 30, "checkpoint_every": 30}  # fmt: skip


def fine_tune_params(project, source, **sections) -> dict:
    """params/tang-poetry-uer.yaml (shorter), fine-tuning the BERT-vocabulary GPT-2 in `source`."""
    params = yaml.safe_load((project / "params/tang-poetry-uer.yaml").read_text(encoding="utf-8"))
    params["model"]["name_or_path"] = str(source)
    return merge(params, {"tokenizer": {"block_size": 64}, "model": {"config": {"dropout": 0.0}}, "train": TRAIN,
                          "evaluate": {"generation": {"max_new_tokens": 24}}, **sections})  # fmt: skip


def starting_perplexity(project, source) -> float:
    """The validation perplexity of the model fine-tuning started from, on the project's framed blocks."""
    from tasks.evaluate import evaluate
    from tasks.tracking.loading import load_pretrained

    return evaluate(load_pretrained(str(source))[0], project / "data/tokenized", batch_size=16, device="cpu")[
        "perplexity"
    ]


def test_a_uer_style_gpt2_fine_tunes_on_tang_poems_and_writes_chinese(tmp_path):
    project = copy_project(tmp_path)
    source = bert_gpt2(tmp_path / "gpt2-chinese-like", layers=2, width=64)
    write_params(project, fine_tune_params(project, source))
    output = run([str(BIN / "dvc"), "repro"], project).stdout
    assert "framing uer ([CLS] text [SEP])" in output
    evaluation = json.loads((project / "metrics/eval.json").read_text())
    assert evaluation["perplexity"] < starting_perplexity(project, source) / 3
    config = json.loads((project / "models/gpt2/config.json").read_text())
    generation = json.loads((project / "models/gpt2/generation_config.json").read_text())
    vocab = (source / "vocab.txt").read_text(encoding="utf-8").split("\n")
    assert config["prefix"] == "[CLS]" and config["framing"] == "uer"
    assert generation["eos_token_id"] == vocab.index("[SEP]")  # stops at the end marker, not GPT-2's 50256
    assert (project / "models/gpt2/model.safetensors").exists()
    for sample in json.loads((project / "reports/samples.json").read_text(encoding="utf-8")):
        text = sample["text"]
        assert text.startswith(sample["prompt"]) and len(text) > len(sample["prompt"]) + 3
        assert not CJK_SPACE.search(text) and "[CLS]" not in text and "[SEP]" not in text, text
    command = ["generate", "--prompt", "月", "--max-new-tokens", "20", "--model"]
    from_folder = cli_here(project, *command, "models/gpt2")
    assert run([str(BIN / "gpt2-pipeline"), *command, "models:/gpt2-lm@challenger"], project).stdout == from_folder
    assert from_folder.startswith("月") and not CJK_SPACE.search(from_folder)
    with mlflow_on(f"sqlite:///{project}/mlflow.db") as mlflow:  # as `mlflow models serve` loads it
        served = mlflow.pyfunc.load_model("models:/gpt2-lm@challenger").predict(["春"], params={"max_new_tokens": 12})
    assert served[0].startswith("春") and not CJK_SPACE.search(served[0]) and "[SEP]" not in served[0]
    run_id = json.loads((project / "registered.json").read_text())["run_id"]
    assert store_client(project).get_run(run_id).data.tags["tokenize/framing"] == "uer"
    version = json.loads((project / "registered.json").read_text())["version"]
    description = store_client(project).get_model_version("gpt2-lm", version).description
    assert "records framed uer's way ([CLS] text [SEP])" in description


def test_a_chitchat_dialogue_model_shipped_as_pytorch_model_bin_fine_tunes(tmp_path):
    project = copy_project(tmp_path)
    source = bert_gpt2(tmp_path / "chitchat-like", weights="bin", layers=2, width=64)
    turns = [["你好", "你好呀，今天天气不错"], ["吃饭了吗", "吃了，你呢", "我也吃了"], ["在看什么", "在看书"]]
    places = [a + b for a in "春夏秋冬山水风月花鸟" for b in "东南西北天地日星"]  # ingest keeps one of each record
    records = [json.dumps({"dialog": [f"{turn}{place}" for turn in dialog]}, ensure_ascii=False)
               for place in places for dialog in turns]  # fmt: skip
    (project / "data/samples/chat.jsonl").write_text("\n".join(records) + "\n", encoding="utf-8")
    data = {"sources": ["data/samples/chat.jsonl"], "format": "dialog", "text_field": "dialog"}
    write_params(project, fine_tune_params(project, source, data=data))
    output = run([str(BIN / "dvc"), "repro", "train"], project).stdout
    assert "framing chitchat ([CLS] turn [SEP] turn [SEP])" in output
    import datasets

    vocab = (source / "vocab.txt").read_text(encoding="utf-8").split("\n")
    first = datasets.load_from_disk(str(project / "data/tokenized"))["train"][0]["input_ids"]
    framed = [vocab[index] for index in first[:30]]
    assert framed[0] == "[CLS]" and framed.count("[SEP]") >= 2 and "[CLS]" in framed[1:]
    metrics = json.loads((project / "metrics/train.json").read_text())
    assert math.exp(metrics["best_eval_loss"]) < starting_perplexity(project, source) / 10
    saved = {path.name for path in (project / "models/gpt2").iterdir()}
    assert "model.safetensors" in saved and "pytorch_model.bin" not in saved  # what the pipeline saves
