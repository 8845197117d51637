"""Stage `register`: log models/gpt2/ to the pipeline's MLflow run and register it as a new model version.

The version gets alias `challenger`, lineage tags (git, dvc.lock hashes, params hash, run ids) and the eval
metrics as tags; the run is then ended. Writes registered.json (name, version, run_id, model_uri).
Run: python -m tasks.register
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import Any

from tasks import tracking
from tasks.common import PipelineError, read_json, run_cli, write_json
from tasks.evaluate import METRICS_FILE as EVAL_METRICS
from tasks.params import load_params
from tasks.train import MODEL_DIR

REGISTERED_FILE = Path("registered.json")
CHALLENGER = "challenger"
# Given explicitly: MLflow's inference of requirements imports torchvision, which this stack does not need.
REQUIREMENTS = ("torch", "transformers", "tokenizers", "safetensors", "accelerate")


def pip_requirements() -> list[str]:
    return [f"{package}=={version(package)}" for package in REQUIREMENTS]


def model_card(model_name: str, eval_metrics: dict[str, Any]) -> str:
    """A short card: what the model is, its validation scores, and how to load it."""
    scores = "\n".join(f"- {key}: {value:.4g}" for key, value in eval_metrics.items())
    return (
        f"# {model_name}\n\nA GPT-2 language model (transformers `GPT2LMHeadModel`) trained by gpt2-pipeline.\n\n"
        f"## Validation\n\n{scores}\n\n## Load\n\n"
        f'`mlflow.transformers.load_model("models:/{model_name}@{CHALLENGER}")`, or '
        "`GPT2LMHeadModel.from_pretrained(folder)` on the pipeline's models/gpt2/.\n"
    )


def register(
    model_name: str, run_id: str, model_dir: Path = MODEL_DIR, eval_metrics: dict[str, Any] | None = None
) -> dict[str, str]:
    """Log the model folder with the transformers flavor, register it, alias it challenger, tag its lineage."""
    from huggingface_hub import ModelCard
    from transformers import AutoTokenizer, GPT2LMHeadModel

    if not (model_dir / "model.safetensors").exists():
        raise PipelineError(f"{model_dir}: no model.safetensors there; run the train stage first (dvc repro)")
    mlflow = tracking.mlflow_module()
    mlflow.set_tracking_uri(tracking.tracking_uri())
    mlflow.set_registry_uri(tracking.tracking_uri())
    # MLflow's log-from-folder path breaks on transformers 5's pipeline registry: hand it loaded components.
    # An absolute path and our own card keep MLflow from asking the Hugging Face Hub for a card and license.
    folder = str(model_dir.resolve())
    components = {
        "model": GPT2LMHeadModel.from_pretrained(folder, use_safetensors=True),
        "tokenizer": AutoTokenizer.from_pretrained(folder),
    }
    # Resume the pipeline's run by its explicit id (this stage is its own process); leaving the block ends it.
    with mlflow.start_run(run_id=run_id):
        info = mlflow.transformers.log_model(
            transformers_model=components,
            name="model",
            task="text-generation",
            pip_requirements=pip_requirements(),
            registered_model_name=model_name,
            model_card=ModelCard(model_card(model_name, eval_metrics or {})),
        )
    model_version = str(info.registered_model_version)
    client = tracking.client()
    client.set_registered_model_alias(model_name, CHALLENGER, model_version)
    tags = {**tracking.lineage_tags(run_id), **{f"eval_{k}": str(v) for k, v in (eval_metrics or {}).items()}}
    for key, value in tags.items():
        client.set_model_version_tag(model_name, model_version, key, value)
    return {
        "name": model_name,
        "version": model_version,
        "alias": CHALLENGER,
        "run_id": run_id,
        "model_uri": f"models:/{model_name}/{model_version}",
    }


def main() -> None:
    params = load_params()
    run_id = tracking.pipeline_run(params)
    registered = register(params.register.model_name, run_id, eval_metrics=read_json(EVAL_METRICS, "evaluate"))
    write_json(REGISTERED_FILE, registered)
    print(f"register: {registered['model_uri']} (alias @{CHALLENGER}) from run {run_id} -> {REGISTERED_FILE}")


if __name__ == "__main__":
    run_cli(main)
