"""The flagship recipe, params/gpt2-124m-openwebtext.yaml, scaled down: the same file through the same stages on a
few MB of gzipped JSONL, with only sizes changed and the two settings a CPU would pay for (bf16 is emulated on most
CPUs; compiling costs a minute)."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest
import yaml

from tasks.plumbing.params import load_params
from tests.helpers import BIN, copy_project, merge, run, write_params
from tools.corpora import MB, write_unique_corpus

pytestmark = pytest.mark.slow

SCALED_DOWN = {
    "data": {"sources": ["data/corpora/web/*.jsonl.gz"], "shard_mb": 1, "validation_fraction": 0.02, "workers": 2},
    "tokenizer": {"block_size": 64},
    "model": {"config": {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 64}},
    "train": {"max_steps": 4, "batch_size": 4, "grad_accum": 2, "warmup_steps": 1, "logging_steps": 1,
              "eval_steps": 2, "checkpoint_every": 2, "precision": "auto", "torch_compile": False,
              "dataloader_workers": 0},
    "evaluate": {"batch_size": 8, "stride": 64},
}  # fmt: skip


def test_the_gpt2_124m_recipe_scaled_down_trains_through_the_same_stages(tmp_path):
    project = copy_project(tmp_path)
    recipe = yaml.safe_load((project / "params/gpt2-124m-openwebtext.yaml").read_text())
    assert load_params(project / "params/gpt2-124m-openwebtext.yaml").model.config.n_embd == 768
    write_unique_corpus(tmp_path / "plain", 3 * MB, file_size=MB)
    (project / "data/corpora/web").mkdir(parents=True)
    for plain in sorted((tmp_path / "plain").glob("*.jsonl")):
        with plain.open("rb") as source, gzip.open(project / "data/corpora/web" / f"{plain.name}.gz", "wb") as packed:
            shutil.copyfileobj(source, packed)
    write_params(project, merge(recipe, SCALED_DOWN))
    run([str(BIN / "dvc"), "repro", "train"], project)
    stats = json.loads((project / "data/prepared/stats.json").read_text())
    assert len(stats["sources"]) >= 3 and stats["dropped"]["duplicate"] == 0
    tokenizer = json.loads((project / "models/tokenizer/tokenizer.json").read_text())
    assert tokenizer["model"]["type"] == "BPE" and len(tokenizer["model"]["vocab"]) > 20_000  # towards 50,257
    config = json.loads((project / "models/gpt2/config.json").read_text())
    assert (config["n_layer"], config["n_positions"]) == (2, 64) and config["vocab_size"] > 20_000
    assert config["resid_pdrop"] == config["attn_pdrop"] == config["embd_pdrop"] == 0.0  # the recipe's dropout: 0
    trained = json.loads((project / "metrics/train.json").read_text())
    assert trained["steps"] == 4
