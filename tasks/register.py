"""Stage `register`: log models/gpt2/ to the model's MLflow run and register it as a new model version.

The run is the one recorded in models/gpt2 (tasks/tracking/mlflow_runs.py), so the version's source run holds the
params, the training curve and the evaluations. The version gets alias `challenger`, lineage tags (git, dvc.lock hashes,
params hash, run id, DVC experiment), the eval metrics and settings it was registered with as tags, and a model
card (README.md in the logged model folder and the run); the run is closed again.
Writes registered.json (name, version, run_id, model_uri).
Run: python -m tasks.register
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

from tasks.data.framing import FRAMINGS
from tasks.plumbing.errors import PipelineError
from tasks.plumbing.outputs import read_json, write_json
from tasks.plumbing.params import GenerationParams, Params, flatten, load_params
from tasks.plumbing.paths import EVAL_METRICS, INGEST_STATS, MODEL_DIR, REGISTERED_FILE, SAMPLES_FILE, TRAIN_METRICS
from tasks.plumbing.redaction import redact
from tasks.plumbing.stage import run_cli
from tasks.tracking import flavor, inputs, lineage, mlflow_runs, registry, serving, store
from tasks.tracking.registry import CHALLENGER

SERVING_CODE = Path(serving.__file__)  # the served model's loader, shipped with each version


def generation_signature(settings: GenerationParams):
    """The served model's signature: text in, text out, and the generation settings.

    Text in, text out, and the generation settings a caller of the served model may set per request (the params
    schema, without which `mlflow models serve` ignores them), defaulting to evaluate.generation."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    params = ParamSchema(
        [
            ParamSpec("max_new_tokens", "long", settings.max_new_tokens),
            ParamSpec("do_sample", "boolean", settings.temperature > 0),
            ParamSpec("temperature", "double", settings.temperature or 1.0),
            ParamSpec("top_k", "long", settings.top_k),
            ParamSpec("top_p", "double", settings.top_p),
            ParamSpec("repetition_penalty", "double", settings.repetition_penalty),
        ]
    )
    return ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]), params=params)


# The characters that can open Markdown syntax inside a line (emphasis, code, links, images, HTML, entities, table
# cells, headings): escaped with a backslash. A value is joined onto one line first, so no block can start.
MARKDOWN_SYNTAX = re.compile(r"([\\`*_\[\]()<>#!|~&])")


def markdown_text(value: object) -> str:
    """A name or value as literal text in the card: no heading, link, image, HTML or table cell can start in it."""
    return MARKDOWN_SYNTAX.sub(r"\\\1", " ".join(str(value).split()))


def code_block(text: str) -> str:
    """text as a fenced code block that nothing in the text can close.

    text as a fenced code block whose fence is longer than any run of backticks in it, so nothing in the text (a
    generated or prompted ``` line) can close it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def model_card(model_name: str, params: Params, eval_metrics: dict[str, Any], tags: dict[str, str]) -> str:
    """The model card: data and its hashes, tokenizer, config, training, scores, samples, and how to load it."""
    stats = read_json(INGEST_STATS, "ingest")
    trained = read_json(TRAIN_METRICS, "train")
    samples = read_json(SAMPLES_FILE, "evaluate")
    config = json.loads((MODEL_DIR / "config.json").read_text())
    framed = FRAMINGS[config.get("framing", "eos")]  # the name train wrote into config.json
    framing = f"{framed.family} way ({framed.shown})"
    origin = markdown_text(params.model.name_or_path)
    shape = ", ".join(f"{key} {config[key]}" for key in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size"))
    scores = "\n".join(f"| {markdown_text(key)} | {value:.6g} |" for key, value in eval_metrics.items())
    examples = "\n\n".join(code_block(item["text"]) for item in samples)
    hashes = ", ".join(
        f"{key} {markdown_text(tags[key])}" for key in ("data_md5", "tokenized_md5", "model_md5") if key in tags
    )
    sources = ", ".join(markdown_text(source) for source in stats["sources"])
    return f"""# {markdown_text(model_name)}

A GPT-2 language model (transformers `GPT2LMHeadModel`) built by gpt2-pipeline.

## Data
Sources: {sources}; {stats["train"]["records"]} train and {stats["validation"]["records"]}
validation records ({stats["train"]["bytes"]:,} and {stats["validation"]["bytes"]:,} UTF-8 bytes). DVC hashes: {hashes}.

## Model
Tokenizer: {params.tokenizer.kind}, {params.tokenizer.vocab_size} tokens asked,
block size {params.tokenizer.block_size}; records framed {framing}.
Initialization: {params.model.init}{"" if params.model.init == "scratch" else f" from {origin}"};
{shape}. Trained {trained["steps"]} steps, {trained["tokens_seen"]:,} tokens, on {trained["device"]}
({trained["precision"]}). Git commit {markdown_text(tags.get("git_commit", "unknown"))} (dirty:
{markdown_text(tags.get("git_dirty"))}), params hash {markdown_text(tags.get("params_hash"))}, MLflow run
{markdown_text(tags.get("mlflow_run_id"))}.

## Validation
| metric | value |
| --- | --- |
{scores}

## Samples
{examples}

## Load
```python
import mlflow
generator = mlflow.transformers.load_model("models:/{model_name}@{CHALLENGER}")
```
or `GPT2LMHeadModel.from_pretrained(folder)` and `AutoTokenizer.from_pretrained(folder)` on the pipeline's models/gpt2/.
"""


def register(params: Params, run_id: str, model_dir: Path = MODEL_DIR) -> dict[str, str]:
    """Log, register and alias the trained model.

    Log the model folder in MLflow's transformers layout (its files as they are, tasks/tracking/flavor.py) with its
    card, register it with its lineage, scores and settings as tags, and alias it challenger."""
    if not (model_dir / "model.safetensors").exists():
        raise PipelineError(f"{model_dir}: no model.safetensors there; run the train stage first (dvc repro)")
    model_name = params.register.model_name
    eval_metrics = read_json(EVAL_METRICS, "evaluate")
    tags = lineage.version_tags(run_id)
    card = redact(model_card(model_name, params, eval_metrics, tags))  # it names the model's source
    model_id = log_model(run_id, model_dir.resolve(), card, generation_signature(params.evaluate.generation))
    store.client().log_text(run_id, card, "README.md")
    settings = {key: value for key, value in flatten(params).items() if key.startswith("evaluate.")}
    scores = {f"eval_{key.removeprefix('eval_')}": value for key, value in eval_metrics.items()}  # not eval_eval_loss
    seen = {"datasets": inputs.named(run_id)}  # the run's dataset inputs: what the version was trained and judged on
    model_version = registry.new_version(model_name, model_id, run_id, card, {**tags, **scores, **settings, **seen})
    registry.set_alias(model_name, CHALLENGER, model_version)
    return {
        "name": model_name,
        "version": model_version,
        "alias": CHALLENGER,
        "run_id": run_id,
        "model_uri": f"models:/{model_name}/{model_version}",
    }


def log_model(run_id: str, model_dir: Path, card: str, signature) -> str:
    """model_dir as a logged model of the run, in MLflow's transformers layout; returns its id.

    In a local artifact store the layout is written in place, the weights hard-linked (no copy at all); elsewhere it
    is staged (links) and uploaded once."""
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model
    from mlflow.utils.file_utils import local_file_uri_to_path
    from mlflow.utils.uri import is_local_uri

    mlflow, client = store.use_store(), store.client()
    run = client.get_run(run_id)
    # In the run's experiment (not the default one MLflow would pick with no active run), with the run's params,
    # as Model.log records them.
    logged = mlflow.initialize_logged_model(
        name="model", source_run_id=run_id, params=run.data.params, experiment_id=run.info.experiment_id
    )
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])  # the run's page lists the model
    described = Model(
        artifact_path=logged.artifact_location, model_uuid=logged.model_id, run_id=run_id, model_id=logged.model_id
    )
    layout = {"mlflow_model": described, "folder": model_dir, "card": card, "signature": signature,
              "model_config": serving.Limits().as_config()}  # the serving limits, each overridable  # fmt: skip
    try:
        if is_local_uri(logged.artifact_location, is_tracking_or_registry_uri=False):
            flavor.save_model(local_file_uri_to_path(logged.artifact_location), loader=SERVING_CODE, **layout)
        else:
            with tempfile.TemporaryDirectory() as staging:
                flavor.save_model(staging, loader=SERVING_CODE, **layout)
                client.log_model_artifacts(logged.model_id, staging)
    except BaseException:
        mlflow.finalize_logged_model(logged.model_id, "FAILED")
        raise
    mlflow.finalize_logged_model(logged.model_id, "READY")
    return logged.model_id


def main() -> None:
    params = load_params()
    run_id = mlflow_runs.model_run(params, MODEL_DIR)
    with mlflow_runs.active(run_id):
        registered = register(params, run_id)
        write_json(REGISTERED_FILE, registered)
    print(f"register: {registered['model_uri']} (alias @{CHALLENGER}) from run {run_id} -> {REGISTERED_FILE}")


if __name__ == "__main__":
    run_cli(main)
