"""train.method: lora: peft's low-rank adapters on GPT-2's Conv1D layers, every other weight frozen.

The adapters train through the same Trainer, checkpoints and resume as full training; at the end the adapter alone
is logged to the model's MLflow run and then merged into the weights, so the saved model is a plain GPT2LMHeadModel.
"""

from __future__ import annotations

import functools
import sys
import tempfile
import warnings
from pathlib import Path

from tasks.plumbing.errors import PipelineError
from tasks.plumbing.params import LoraParams
from tasks.tracking import mlflow_runs

ADAPTER_ARTIFACT = "adapter"  # the run's artifact folder holding the adapter (peft's save_pretrained)


def _peft():
    try:
        import peft
    except ImportError:
        raise PipelineError(
            "train.method: lora needs peft: pip install 'gpt2-pipeline[lora]', or set train.method: full"
        ) from None
    return peft


def wrap(model, settings: LoraParams, scratch: bool = False):
    """The model with adapters on settings.target_modules (a peft PeftModel); only the adapters train."""
    peft = _peft()
    if scratch:
        print(
            "note: train.method: lora on a model from scratch trains only the adapters; every other weight keeps its "
            "random initialization (LoRA is meant for model.init: pretrained)",
            file=sys.stderr,
        )
    config = peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        fan_in_fan_out=True,  # GPT-2's Conv1D stores its weight as (in, out)
    )
    with warnings.catch_warnings():  # peft asks transformers for a name it deprecated: nothing a user can change
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        wrapped = peft.get_peft_model(model, config)
    # The Trainer's checkpoints hold the adapter alone: the frozen weights come back from the params on resume (the
    # same seed or checkpoint). peft's "auto" would add the embeddings, padded for training, and look the base
    # model up on the hub to decide.
    wrapped.save_pretrained = functools.partial(wrapped.save_pretrained, save_embedding_layers=False)
    return wrapped


def trainable_parameters(model) -> int:
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


def merge(wrapped, run_id: str):
    """Log the adapter alone to the run (artifact `adapter`), then merge it into the weights.

    Returns the plain GPT2LMHeadModel."""
    with tempfile.TemporaryDirectory(prefix="lora-adapter-") as folder:
        wrapped.save_pretrained(folder)  # adapter_config.json, adapter_model.safetensors, a model card
        mlflow_runs.log_artifacts(run_id, Path(folder), ADAPTER_ARTIFACT)
    return wrapped.merge_and_unload()
