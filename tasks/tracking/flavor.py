"""The MLflow transformers-flavor layout of a save_pretrained folder, built from its files as they are.

`mlflow.transformers.log_model` loads the model and tokenizer, saves them again, and scans every installed
distribution for requirement mismatches: for GPT-2 124M that is ten times a save_pretrained. Register instead
writes the logged model's folder with `save_model` here: the weights hard-linked (the other files copied) into
the layout that `mlflow.transformers.load_model` reads (model/, components/tokenizer/), with the MLmodel, the
requirements and the model card. Nothing here imports torch or transformers.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from fnmatch import fnmatch
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml

from tasks.plumbing.paths import MLFLOW_MODEL_SUBDIR, MLFLOW_TOKENIZER_SUBDIR, RUN_RECORD

FLAVOR = "transformers"
CODE_SUBDIR = "code"
# Files of the model proper; the other files of the folder (but the run record) are the tokenizer's.
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")
MODEL_WEIGHTS = "model*.safetensors"
# Given explicitly: MLflow's inference of requirements imports torchvision, which this stack does not need.
REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "accelerate")


def pip_requirements() -> list[str]:
    return [f"{package}=={version(package)}" for package in REQUIREMENTS]


def place(source: Path, dest: Path) -> None:
    """dest as a hard link to source, or a copy across devices.

    Only weights are linked: save_pretrained and DVC replace them with new files, never edit them in place; the
    small files a user might edit are copied."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if fnmatch(source.name, MODEL_WEIGHTS):
        try:
            os.link(source, dest)
            return
        except OSError:
            pass
    shutil.copy2(source, dest)


def split_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(model files, tokenizer files) of a save_pretrained folder."""
    model = {*folder.glob(MODEL_WEIGHTS), *(folder / name for name in MODEL_FILES if (folder / name).exists())}
    others = [path for path in folder.iterdir() if path.is_file() and path not in model and path.name != RUN_RECORD]
    return sorted(model), sorted(others)


def flavor_config(folder: Path) -> dict[str, Any]:
    """What mlflow.transformers.load_model reads to rebuild the text-generation pipeline from the layout."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    tokenizer_config = folder / "tokenizer_config.json"
    recorded = json.loads(tokenizer_config.read_text(encoding="utf-8")) if tokenizer_config.exists() else {}
    tokenizer_class = recorded.get("tokenizer_class") or "AutoTokenizer"  # Auto: transformers resolves it
    return {
        "task": "text-generation",
        "instance_type": "TextGenerationPipeline",
        "pipeline_model_type": config["architectures"][0],
        "source_model_name": str(folder),
        "model_binary": MLFLOW_MODEL_SUBDIR,
        "components": ["tokenizer"],
        "tokenizer_type": tokenizer_class,
        "torch_dtype": f"torch.{config.get('dtype') or config.get('torch_dtype') or 'float32'}",
        "transformers_version": version("transformers"),
        "code": CODE_SUBDIR,
    }


def environment_files(path: Path, requirements: list[str]) -> None:
    """requirements.txt, conda.yaml and python_env.yaml as MLflow writes them, from the given requirements."""
    python = platform.python_version()
    (path / "requirements.txt").write_text("\n".join(requirements), encoding="utf-8")
    conda = {
        "channels": ["conda-forge"],
        "dependencies": [f"python={python}", f"pip<={version('pip')}", {"pip": requirements}],
        "name": "mlflow-env",
    }
    (path / "conda.yaml").write_text(yaml.safe_dump(conda, sort_keys=False), encoding="utf-8")
    build = [f"pip=={version('pip')}", f"setuptools=={version('setuptools')}", "wheel"]
    python_env = {"python": python, "build_dependencies": build, "dependencies": ["-r requirements.txt"]}
    (path / "python_env.yaml").write_text(yaml.safe_dump(python_env, sort_keys=False), encoding="utf-8")


def save_model(
    path: str, mlflow_model, folder: Path, card: str, signature, loader: Path, model_config: dict[str, Any]
) -> None:
    """Write MLflow's transformers layout of `folder` in `path`.

    The layout of `folder` in `path` (the logged model's artifact folder, or a staging folder), with `loader` (a
    module in code/) as the python_function loader, `model_config` as the settings a server may override (`mlflow
    models serve --model-config`) and `card` as the model card."""
    from mlflow.pyfunc import add_to_model

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    model_files, tokenizer_files = split_files(folder)
    for source in model_files:
        place(source, root / MLFLOW_MODEL_SUBDIR / source.name)
    for source in tokenizer_files:
        place(source, root / MLFLOW_TOKENIZER_SUBDIR / source.name)
    place(loader, root / CODE_SUBDIR / loader.name)
    (root / MLFLOW_MODEL_SUBDIR / "README.md").write_text(card, encoding="utf-8")  # as a hub model's card
    (root / "model_card.md").write_text(card, encoding="utf-8")
    environment_files(root, pip_requirements())
    mlflow_model.signature = signature
    mlflow_model.add_flavor(FLAVOR, **flavor_config(folder))
    add_to_model(
        mlflow_model,
        loader_module=loader.stem,
        code=CODE_SUBDIR,
        conda_env="conda.yaml",
        python_env="python_env.yaml",
        model_config=model_config,
    )
    mlflow_model.save(str(root / "MLmodel"))
