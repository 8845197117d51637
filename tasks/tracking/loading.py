"""Loading a GPT-2 and its tokenizer, and the device to run it on.

From a save_pretrained folder, a hub id or an MLflow model URI. The one place the pipeline calls from_pretrained:
train's pretrained path, tokenize's pretrained tokenizer, evaluate, promotion and `gpt2-pipeline generate`."""

from __future__ import annotations

# Only to catch the refusal of torch's weights_only loader, never to load.
import pickle  # nosec B403
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.plumbing.errors import PipelineError, first_line
from tasks.plumbing.paths import MLFLOW_MODEL_SUBDIR, MLFLOW_TOKENIZER_SUBDIR
from tasks.tracking import store

MLFLOW_URI_PREFIXES = ("models:/", "runs:/")


@dataclass(frozen=True)
class ModelSource:
    """Where from_pretrained finds a model and its tokenizer."""

    model: str
    tokenizer: str


@contextmanager
def model_source(name_or_path: str) -> Iterator[ModelSource]:
    """A hub id or a local folder as is.

    An MLflow model URI (`models:/gpt2-lm@champion`) downloaded for the duration of the block, its transformers-
    flavor layout (model/, components/tokenizer/) resolved."""
    if not name_or_path.startswith(MLFLOW_URI_PREFIXES):
        yield ModelSource(name_or_path, name_or_path)
        return
    store.require_tracking_server()  # one line now, not minutes of MLflow's retries against a server that is down
    mlflow = store.use_store()
    with tempfile.TemporaryDirectory(prefix="gpt2-source-") as scratch:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=name_or_path, dst_path=scratch))
        except Exception as exc:  # MLflow raises its own, REST and OS errors for a missing model or alias
            raise PipelineError(
                f"model.name_or_path: {name_or_path} is not in the MLflow registry at {store.shown_uri()} "
                f"({first_line(exc, 200)}); list versions and aliases in the MLflow UI"
            ) from None
        if not (local / MLFLOW_MODEL_SUBDIR / "config.json").exists():
            raise PipelineError(f"model.name_or_path: {name_or_path} is not a transformers model logged by register")
        yield ModelSource(str(local / MLFLOW_MODEL_SUBDIR), str(local / MLFLOW_TOKENIZER_SUBDIR))


def load_pretrained(name_or_path: str, key: str = "model.name_or_path", **model_kwargs: Any):
    """(GPT2LMHeadModel, tokenizer) from a folder, hub id or MLflow URI.

    A model that cannot be loaded is one PipelineError naming `key`. model_kwargs go to from_pretrained (config
    overrides, attn_implementation)."""
    try:
        with model_source(name_or_path) as source:
            # After the registry has answered: a model URI that fails there fails before torch is imported.
            from transformers import AutoTokenizer, GPT2LMHeadModel

            # Safetensors where the folder has them, else pytorch_model.bin read by torch's weights_only loader.
            model = GPT2LMHeadModel.from_pretrained(source.model, weights_only=True, **model_kwargs)  # nosec B615
            tokenizer = AutoTokenizer.from_pretrained(source.tokenizer)  # nosec B615
    except OSError as exc:
        raise PipelineError(
            f"{key}: cannot load {name_or_path!r} ({first_line(exc)}); "
            "offline, point it at a local save_pretrained folder"
        ) from None
    except pickle.UnpicklingError as exc:  # torch's weights_only loader met an object that is not a tensor
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        raise PipelineError(
            f"{key}: the pytorch_model.bin of {name_or_path!r} holds more than tensors"
            f"{f' ({found.group(1)})' if found else ''}, and only tensors are loaded (torch's weights_only); "
            "if you trust it, convert it to model.safetensors"
        ) from None
    return model, tokenizer


def load_tokenizer(name_or_path: str, key: str = "model.name_or_path"):
    """The tokenizer alone, from the same places as load_pretrained."""
    try:
        with model_source(name_or_path) as source:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(source.tokenizer)  # nosec B615
    except OSError as exc:
        raise PipelineError(
            f"{key}: cannot load a tokenizer from {name_or_path!r} ({first_line(exc)}); "
            "offline, point it at a local save_pretrained folder"
        ) from None


def resolve_device(setting: str) -> str:
    """`auto` is CUDA when present, else the CPU; asking for CUDA without it is an error."""
    import torch

    if setting == "cuda" and not torch.cuda.is_available():
        raise PipelineError("train.device: cuda was asked for but no CUDA device is visible; use auto or cpu")
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting
