"""The default recipe against the one before its search, on tiny Shakespeare with its last 10% held out.

A copy of the project (tools.copy_project) writes the held-out split (`python -m tools.corpora shakespeare-tail`)
and runs the pipeline's own stages (`dvc repro evaluate`) twice: with params.yaml's recipe as committed, and with
the recipe it replaced (PREVIOUS, the reference), both on the split. Each row is read from the run's own metrics:
training seconds (metrics/train.json) and validation bits per character (metrics/eval.json), against the goal of
<= 2.10 bits per character in <= 180 s of training on this machine.
Run: python bench/recipe.py
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from bench.measure import add_save_option, machine, run_measured, save
from tasks.plumbing.params import apply_overrides
from tools.project import BIN, copy_project, tool_env

SPLIT = {
    "data.sources": ["data/corpora/tinyshakespeare/train.txt"],
    "data.validation_sources": ["data/corpora/tinyshakespeare/validation.txt"],
}
# The default before params/recipe-search.yaml's study: the keys it changed, at their values then.
PREVIOUS = {
    "train.max_steps": 1000,
    "train.learning_rate": 0.002,
    "train.lr_scheduler": "cosine",
    "train.warmup_steps": 50,
    "train.weight_decay": 0.01,
    "train.max_grad_norm": 1.0,
    "model.config.initializer_range": None,
}


def run_recipe(project: Path, name: str, keys: dict, committed: dict) -> dict:
    """One recipe through `dvc repro evaluate` in the copy; its steps, training time and score from its metrics."""
    params = apply_overrides(committed, {**SPLIT, **keys})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    run_measured([str(BIN / "dvc"), "repro", "evaluate"], project, tool_env())  # a failure ends the bench
    trained = json.loads((project / "metrics/train.json").read_text())
    scored = json.loads((project / "metrics/eval.json").read_text())
    figures = {
        "recipe": name,
        "keys": {key: functools.reduce(dict.__getitem__, key.split("."), params) for key in PREVIOUS},
        "steps": trained["steps"],
        "train_seconds": trained["seconds"],
        "bits_per_char": scored["bits_per_char"],
        "eval_loss": scored["eval_loss"],
    }
    print(f"{name}: {figures}", flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_save_option(parser)
    args = parser.parse_args()
    print(machine(), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-recipe-") as folder:
        project = copy_project(Path(folder))
        subprocess.run([sys.executable, "-m", "tools.corpora", "shakespeare-tail"], cwd=project, check=True)
        committed = yaml.safe_load((project / "params.yaml").read_text())
        recipes = [run_recipe(project, "previous", PREVIOUS, committed), run_recipe(project, "default", {}, committed)]
    save(args.save, {"recipes": recipes, "goal_bits_per_char": 2.10, "goal_seconds": 180})


if __name__ == "__main__":
    main()
