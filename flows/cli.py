"""The `gpt2-pipeline` command: run the pipeline through Prefect and show what it produced."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from tasks import tracking
from tasks.common import PipelineError, atomic_output
from tasks.evaluate import METRICS_FILE as EVAL_METRICS
from tasks.params import PARAMS_FILE, load_params
from tasks.register import REGISTERED_FILE
from tasks.train import METRICS_FILE as TRAIN_METRICS

app = typer.Typer(
    help="Build your own GPT-2: DVC-tracked stages, run by Prefect, recorded in MLflow.",
    no_args_is_help=True,
    add_completion=False,
)


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@app.command()
def run(
    params: Annotated[
        Path | None,
        typer.Option(
            help="A params file to use instead of params.yaml (copied over it, "
            "so that dvc.lock records it; `git checkout params.yaml` restores)"
        ),
    ] = None,
):
    """Run the training-pipeline flow on Prefect (an ephemeral local server unless PREFECT_API_URL is set)."""
    from flows.pipeline import training_pipeline

    try:
        if params is not None:
            use_params(params)
        load_params()
    except PipelineError as exc:
        fail(str(exc))
    try:
        training_pipeline()
    except RuntimeError as exc:
        fail(str(exc))
    summary()


def use_params(path: Path) -> None:
    """Validate another params file, then put it in place of params.yaml in one rename."""
    load_params(path)
    with atomic_output(PARAMS_FILE) as tmp:
        tmp.write_bytes(path.read_bytes())
    typer.echo(f"params.yaml now holds {path}")


@app.command()
def summary():
    """Print the last run's metrics, the registered model and how to look at both."""
    outputs = {}
    for path in (TRAIN_METRICS, EVAL_METRICS, REGISTERED_FILE):
        if not path.exists():
            fail(f"{path}: not found; run the pipeline first (make run)")
        outputs[path] = json.loads(path.read_text())
    trained, scores, registered = outputs[TRAIN_METRICS], outputs[EVAL_METRICS], outputs[REGISTERED_FILE]
    name, alias = registered["name"], registered["alias"]
    mlflow_bin = os.path.relpath(Path(sys.executable).parent / "mlflow")
    typer.echo(
        f"trained   {trained['steps']} steps on {trained['device']}, train loss {trained['train_loss_first']:.3f} -> "
        f"{trained['train_loss']:.3f}, {trained['tokens_per_second']:.0f} tokens/s, {trained['seconds']:.0f} s\n"
        f"evaluated perplexity {scores['perplexity']:.2f}, bits/byte {scores['bits_per_byte']:.3f} "
        f"on {scores['eval_tokens']} validation tokens\n"
        f"registered {registered['model_uri']} as models:/{name}@{alias} (run {registered['run_id']})\n\n"
        f"MLflow UI:  {mlflow_bin} ui --backend-store-uri {tracking.tracking_uri()}\n"
        f'Load it:    mlflow.transformers.load_model("models:/{name}@{alias}")  '
        f"(with MLFLOW_TRACKING_URI={tracking.tracking_uri()})"
    )


if __name__ == "__main__":
    app()
