"""The `gpt2-pipeline` command: run the pipeline through Prefect and show what it produced.

Longer than the house's ~300 lines on purpose: it is the one Typer app, and every command a user types is
declared here with its options and help, so `--help` and this file read alike; the work each command does lives
in flows/ and tasks/.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import click
import typer

from flows import server, workspace
from tasks.plumbing.console import console_output, tools_first
from tasks.plumbing.errors import DEBUG_ENV, NOT_PROMOTED_EXIT, PipelineError, report_error
from tasks.plumbing.outputs import atomic_output, read_json
from tasks.plumbing.params import PARAMS_FILE, apply_overrides, load_params, parse_override, read_raw
from tasks.plumbing.paths import EVAL_METRICS, REGISTERED_FILE, TRAIN_METRICS
from tasks.tracking import registry, store
from tasks.tracking.serving import Limits

COMPARE_FILE = "compare.html"
STOP_SECONDS = 3  # serve-model: how long requests in progress have after SIGTERM

app = typer.Typer(
    help="Build your own GPT-2: DVC-tracked stages, run by Prefect, recorded in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's own help layout: defaults wrapped, not cut at the terminal's edge (rich's), no <bool> on every flag
    rich_markup_mode=None,
    context_settings={"max_content_width": 120},
)


@app.callback()
def options(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help=f"show tracebacks, the stages' too (same as {DEBUG_ENV}=1)")
    ] = False,
):
    if verbose:
        os.environ[DEBUG_ENV] = "1"  # the stages run under dvc inherit it


def main() -> None:
    """The console script.

    The console script: any error is one line, as the stages print it (tasks.plumbing.errors.report_error), with the
    same exit status; the traceback only with --verbose. In a log (not a terminal) no progress bars, as in the
    stages."""
    console_output()
    server.one_line_errors()
    try:
        app()
    except Exception as exc:
        sys.exit(report_error(exc))


def fail(message: str) -> None:
    raise PipelineError(message)


def command(function: Callable) -> Callable:
    """Register a command whose errors end it as a stage's end.

    One line (tasks.plumbing.errors.report_error) and the exit status of the contract, whether it runs from the console
    script or in-process (typer's CliRunner, a notebook)."""

    @functools.wraps(function)
    def reported(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (typer.Exit, click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as exc:
            raise typer.Exit(report_error(exc)) from None

    return app.command()(reported)


@command
def run(
    params: Annotated[
        Path | None,
        typer.Option(
            help="A params file to use instead of params.yaml (copied over it, so that dvc.lock records it; "
            "refused while params.yaml holds edits kept nowhere else; `git checkout params.yaml` restores)"
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-S",
            help="KEY=VALUE: change a params key for this run only (repeatable, as `dvc exp run -S`); "
            "the run happens in .runs/<hash>/ and params.yaml stays as committed",
        ),
    ] = None,
    promote: Annotated[
        bool, typer.Option(help="run promote-model after registering (exit status 3 if it kept the champion)")
    ] = False,
    remote: Annotated[
        str | None, typer.Option(help="a DVC remote: pull existing outputs first, push the new ones after")
    ] = None,
):
    """Run the training-pipeline flow on Prefect (an ephemeral local server unless PREFECT_API_URL is set)."""
    from flows.pipeline import training_pipeline

    if params is not None:
        use_params(params)
    load_params()
    overrides = dict(parse_override(item) for item in set_ or [])
    if overrides:
        apply_overrides(read_raw(), overrides)
    server.start_local()
    training_pipeline(overrides=overrides, promote=promote, remote=remote)  # a failed stage: its own status
    folder = workspace.RUNS_DIR / workspace.overrides_key(overrides) if overrides else Path()
    show_summary(folder)
    if promote and not _is_champion(folder):
        raise typer.Exit(NOT_PROMOTED_EXIT)


def _is_champion(folder: Path) -> bool:
    """Whether the version this run registered is @champion (its promotion moved it there)."""
    registered = read_json(folder / REGISTERED_FILE, "register")
    return registry.alias_version(registered["name"], registry.CHAMPION) == registered["version"]


@command
def sweep(
    trials: Annotated[
        int | None,
        typer.Option(min=1, help="trials the study holds when done, all workers together; default sweep.trials"),
    ] = None,
    timeout_minutes: Annotated[
        float | None, typer.Option(min=0.001, help="start no trial after this long; default sweep.timeout_minutes")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            help="continue the study sweep.study names, its finished trials kept (after a kill; a worker joining)"
        ),
    ] = False,
    register_best: Annotated[
        bool,
        typer.Option(
            help="then run the pipeline with the best trial's params, registering its model (once the trials of other "
            "workers have ended)"
        ),
    ] = False,
):
    """Search params.yaml's sweep.space with Optuna: each trial a DVC experiment (train and evaluate), pruned early
    when it trails; one MLflow run for the study with a child run per trial; prints the trials and the best params."""
    from flows.sweep import sweep as sweep_flow
    from tasks import sweep as study_tools

    params = load_params()  # a bad sweep section: one line before anything runs
    study_tools.open_storage(study_tools.storage_url(params.sweep, Path.cwd()))  # so is a database out of reach
    server.start_local()
    sweep_flow(trials=trials, timeout_minutes=timeout_minutes, resume=resume, register_best=register_best)


@command
def serve(
    prefect_file: Annotated[Path, typer.Option(help="the deployments to serve")] = Path("prefect.yaml"),
):
    """Serve prefect.yaml's deployments (nightly training, on-demand promotion) from this process until stopped."""
    from flows.deployments import serve as serve_deployments

    server.start_local()
    serve_deployments(prefect_file)


def use_params(path: Path) -> None:
    """Validate another params file, then put it in place of params.yaml in one rename.

    Refused while params.yaml holds edits kept nowhere else (neither committed nor a file in params/): the copy
    would lose them, and `git checkout params.yaml` brings back the commit, not the edits."""
    load_params(path)
    text = workspace.relocated(path.read_text(encoding="utf-8"), path, PARAMS_FILE)
    if PARAMS_FILE.exists() and workspace.edits_only_here(PARAMS_FILE, text):
        fail(
            f"{PARAMS_FILE}: holds edits that are neither committed nor in params/, which --params {path} would "
            "replace; commit them, or save them as a file in params/, then rerun"
        )
    with atomic_output(PARAMS_FILE) as tmp:
        tmp.write_text(text, encoding="utf-8")
    typer.echo(f"params.yaml now holds {path}")


@command
def summary():
    """Print the last run's metrics, the registered model and how to look at both."""
    show_summary(Path())


def show_summary(root: Path) -> None:
    outputs = {}
    for path in (TRAIN_METRICS, EVAL_METRICS, REGISTERED_FILE):
        if not (root / path).exists():
            fail(f"{root / path}: not found; run the pipeline first (make run)")
        outputs[path] = json.loads((root / path).read_text())
    trained, scores, registered = outputs[TRAIN_METRICS], outputs[EVAL_METRICS], outputs[REGISTERED_FILE]
    name, alias = registered["name"], registered["alias"]
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    if mlflow_bin.is_relative_to(Path.cwd()):
        mlflow_bin = mlflow_bin.relative_to(Path.cwd())
    typer.echo(
        f"trained   {trained['steps']} steps on {trained['device']}, train loss {trained['train_loss_first']:.3f} -> "
        f"{trained['train_loss']:.3f}, {trained['tokens_per_second']:.0f} tokens/s, {trained['seconds']:.0f} s\n"
        f"evaluated perplexity {scores['perplexity']:.2f}, bits/byte {scores['bits_per_byte']:.3f} "
        f"on {scores['eval_tokens']} validation tokens\n"
        f"registered {registered['model_uri']} as models:/{name}@{alias} (run {registered['run_id']})\n\n"
        f"MLflow UI:  {mlflow_bin} ui --backend-store-uri {store.shown_uri()}\n"
        f'Load it:    mlflow.transformers.load_model("models:/{name}@{alias}")  '
        f"(with MLFLOW_TRACKING_URI={store.shown_uri()})"
    )


@command
def promote(
    version: Annotated[str | None, typer.Option(help="the registered version to judge; default: @challenger")] = None,
):
    """Run the promote-model flow.

    @champion moves to the challenger only if it has fewer bits per byte; exit status 3 when it kept the champion."""
    from flows.promote import promote_model

    load_params()  # bad params first: one line, no store touched
    store.require_tracking_server()  # one line now, not minutes of MLflow's retries
    server.start_local()
    decision = promote_model(version=version)
    typer.echo(json.dumps(decision, indent=2))
    if not decision["promoted"]:
        raise typer.Exit(NOT_PROMOTED_EXIT)


@command
def compare(
    reference: Annotated[str, typer.Argument(help="model A: an MLflow model URI (models:/gpt2-lm/1) or a folder")],
    candidate: Annotated[str, typer.Argument(help="model B, judged against A as promotion would judge it")],
    output: Annotated[
        Path, typer.Option(help="the HTML report's file; an existing folder gets compare.html inside it")
    ] = Path(COMPARE_FILE),
    force: Annotated[bool, typer.Option(help="replace --output even when it is not a report compare wrote")] = False,
):
    """Write the promotion report for any two models.

    Bits per byte on the promotion text (and the gate's tasks), training curves, evaluation metrics, samples for the
    same prompts and seed, what differs, and what promote.gate would decide, rule by rule."""
    from tasks.promote import compare as compare_models
    from tasks.promote import text_path

    if output.is_dir():  # a folder the user owns: write inside it, never in its place
        output = output / COMPARE_FILE
    refuse_to_replace(output, force)
    params = load_params()
    page, decision = compare_models(reference, candidate, params, text_path(params))
    with atomic_output(output) as scratch:
        scratch.write_text(page, encoding="utf-8")
    verdict = "would be promoted" if decision["promoted"] else "would not be promoted"
    typer.echo(f"{output}: B {verdict} over A")
    for rule in decision["gate"]:
        typer.echo(f"  {rule['text']}")


def refuse_to_replace(output: Path, force: bool) -> None:
    """Stop before any work where --output names something of the user's: only a report compare wrote is replaced."""
    from tasks.tracking.report import GENERATOR

    if force or not (output.exists() or output.is_symlink()):
        return
    if output.is_file() and not output.is_symlink():
        with output.open("rb") as existing:
            if GENERATOR.encode() in existing.read(4096):
                return
    raise PipelineError(
        f"compare --output {output}: exists and is not a report compare wrote; name a new file, or pass --force to "
        "replace it"
    )


@command
def rollback():
    """Move @champion back to @previous-champion."""
    from tasks.promote import rollback as roll_back

    name = load_params().register.model_name  # bad params first: one line, no store touched
    store.require_tracking_server()
    result = roll_back(name)
    typer.echo(f"@champion is version {result['champion_version']} again (was {result['replaced_version']})")


@command
def models():
    """A table of the registered model's versions: aliases, scores and lineage."""
    from rich.console import Console
    from rich.table import Table

    name = load_params().register.model_name
    versions = registry.versions(name)
    if not versions:
        fail(f"no versions of {name} at {store.shown_uri()}; run the pipeline first (make run)")
    by_version = registry.aliases_by_version(name)
    table = Table(title=f"{name} at {store.shown_uri()}")
    for column in ("version", "aliases", "bits/byte", "perplexity", "promotion", "git commit", "experiment", "run"):
        table.add_column(column)
    for version in versions:
        tags = version.tags
        table.add_row(
            str(version.version),
            " ".join(sorted(by_version.get(str(version.version), []))),
            _number(tags.get("eval_bits_per_byte"), ".4f"),
            _number(tags.get("eval_perplexity"), ".2f"),
            {"True": "promoted", "False": "kept out"}.get(tags.get("promotion_promoted", ""), ""),
            tags.get("git_commit", "")[:8] + ("*" if tags.get("git_dirty") == "true" else ""),
            tags.get("dvc_exp_name", ""),
            version.run_id[:8],
        )
    Console(width=160).print(table)


def _number(text: str | None, spec: str) -> str:
    return format(float(text), spec) if text else ""


SERVING = Limits()  # serve-model --api mlflow: the limits a served model has unless told otherwise
# serve-model (OpenAI's API): rows (prompts x n) in one batch, requests waiting past them; measured in
# docs/benchmarks.md (bench/serving.py)
BATCHED = Limits(max_concurrent=32, max_queue=64)


class Api(StrEnum):
    openai = "openai"
    mlflow = "mlflow"


@command
def serve_model(
    model: Annotated[
        str | None,
        typer.Option(
            help="a registered model, models:/<name>@<alias> or models:/<name>/<version>; "
            "default: models:/<register.model_name>@champion"
        ),
    ] = None,
    port: Annotated[int, typer.Option(min=1, max=65535)] = 5001,
    host: Annotated[str, typer.Option(help="the address to listen on; 127.0.0.1 answers this machine only")] = (
        "127.0.0.1"
    ),
    api: Annotated[
        Api,
        typer.Option(
            help="openai: POST /v1/completions, batched by Ray Serve; mlflow: MLflow's "
            "scoring server, POST /invocations"
        ),
    ] = Api.openai,
    max_body_bytes: Annotated[int, typer.Option(min=1024, help="a request's body; past it 413")] = (
        SERVING.max_body_bytes
    ),
    body_timeout: Annotated[float, typer.Option(min=0.001, help="seconds a request's body may take; past them 408")] = (
        SERVING.body_timeout_seconds
    ),
    max_prompts: Annotated[int, typer.Option(min=1, help="prompts (x n) in one request")] = SERVING.max_prompts,
    max_total_new_tokens: Annotated[int, typer.Option(min=1, help="prompts x max new tokens in one request")] = (
        SERVING.max_total_new_tokens
    ),
    timeout: Annotated[float, typer.Option(min=0.001, help="seconds a generation may take; past them 504")] = (
        SERVING.timeout_seconds
    ),
    max_concurrent: Annotated[
        int | None,
        typer.Option(
            min=1,
            help=f"openai: rows (prompts x n) in one batch, default "
            f"{BATCHED.max_concurrent}; mlflow: requests generating at once, default "
            f"{SERVING.max_concurrent}",
        ),
    ] = None,
    max_queue: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="requests waiting for a turn; past them 503; default "
            f"{BATCHED.max_queue} (openai), {SERVING.max_queue} (mlflow)",
        ),
    ] = None,
    batch_wait: Annotated[
        float, typer.Option(min=0.0, help="openai: the longest a batch waits for more requests (while they come fast)")
    ] = 0.25,
    replicas: Annotated[int, typer.Option(min=1, help="openai: copies of the model, each batching its own")] = 1,
    follow: Annotated[float, typer.Option(min=0.1, help="openai: seconds between looks at the alias")] = 10.0,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="openai: a Ray cluster to run the replicas on (host:port "
            "of its head); default: a Ray of this machine's own"
        ),
    ] = None,
):
    """Serve a registered model over HTTP, every request bounded; by default @champion, followed when it moves:
    POST /v1/completions {"model": "gpt2-lm", "prompt": "ROMEO:", "max_tokens": 20} (OpenAI's completions API;
    --api mlflow: MLflow's POST /invocations {"inputs": ["ROMEO:"], "params": {"max_new_tokens": 20}})."""
    from tasks.tracking.registry import CHAMPION, alias_version

    uri = model or f"models:/{load_params().register.model_name}@{CHAMPION}"
    store.require_tracking_server()
    name, _, alias = uri.removeprefix("models:/").partition("@")
    if uri.startswith("models:/") and alias and alias_version(name, alias) is None:
        fail(f"--model {uri}: no such alias at {store.shown_uri()}; `gpt2-pipeline models` lists the versions")
    defaults = BATCHED if api is Api.openai else SERVING
    limits = Limits(
        max_body_bytes=max_body_bytes,
        body_timeout_seconds=body_timeout,
        max_prompts=max_prompts,
        max_total_new_tokens=max_total_new_tokens,
        timeout_seconds=timeout,
        max_concurrent=defaults.max_concurrent if max_concurrent is None else max_concurrent,
        max_queue=defaults.max_queue if max_queue is None else max_queue,
    )
    if api is Api.mlflow:
        serve_mlflow(uri, limits, host, port)
    from flows.completions import EngineSettings, run_server

    name, version = registered(uri)
    settings = EngineSettings(name, alias or None, version, limits, batch_wait, follow)
    run_server(settings, host, port, replicas, ray_address)


def registered(uri: str) -> tuple[str, str | None]:
    """(name, version) of models:/<name>@<alias> (version None) or models:/<name>/<version>, else one line."""
    path = uri.removeprefix("models:/")
    name, _, version = path.partition("/")
    if not uri.startswith("models:/") or not name or ("@" not in name and not version.isdigit()):
        fail(f"--model {uri}: serve-model serves a registered model, models:/<name>@<alias> or "
             "models:/<name>/<version> (--api mlflow serves any MLflow model URI)")  # fmt: skip
    return name.partition("@")[0], (version or None)


def serve_mlflow(uri: str, limits: Limits, host: str, port: int) -> None:
    """MLflow's scoring server for uri behind the limits (flows/model_server.py); replaces this process."""
    from flows.model_server import SERVE_ENV

    uvicorn = Path(sys.executable).parent / "uvicorn"
    command = [
        str(uvicorn), "--factory", "flows.model_server:create_app", "--host", host, "--port", str(port),
        # SIGTERM: requests in progress get a few seconds, then the generations stop at their next token.
        "--timeout-graceful-shutdown", str(STOP_SECONDS),
        # The loop and HTTP parser the limits are tested with, also where uvloop and httptools are installed.
        "--loop", "asyncio", "--http", "h11",
    ]  # fmt: skip
    env = {
        **os.environ,
        "PATH": tools_first(uvicorn.parent),
        "MLFLOW_TRACKING_URI": store.tracking_uri(),
        "MLFLOW_REGISTRY_URI": store.tracking_uri(),
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        SERVE_ENV: json.dumps({"model_uri": uri, "limits": limits.as_config()}),
    }
    typer.echo(f"serving {uri} from {store.shown_uri()} at http://{host}:{port}/invocations", err=True)
    # The server replaces this process: Ctrl-C and a supervisor's SIGTERM reach it, its exit status is ours.
    os.execve(uvicorn, command, env)  # noqa: S606 (a fixed program, no shell)


@command
def generate(
    prompt: Annotated[str, typer.Option(help="text to continue")],
    model: Annotated[str, typer.Option(help="a save_pretrained folder or an MLflow URI (models:/gpt2-lm@champion)")] = (
        "models/gpt2"
    ),
    max_new_tokens: Annotated[int | None, typer.Option(min=1, help="default: evaluate.generation's")] = None,
    temperature: Annotated[float | None, typer.Option(min=0.0, help="default: evaluate.generation's")] = None,
    top_k: Annotated[int | None, typer.Option(min=0, help="default: evaluate.generation's")] = None,
    top_p: Annotated[float | None, typer.Option(min=0.0, max=1.0, help="default: evaluate.generation's")] = None,
    seed: Annotated[int | None, typer.Option(help="default: evaluate.generation's")] = None,
):
    """Continue a prompt with a trained model.

    Continue a prompt with a trained model, sampling as evaluate.generation in params.yaml says unless an option
    says otherwise (a fixed seed: the same call gives the same text)."""
    from tasks.plumbing.params import GenerationParams
    from tasks.tracking.loading import load_pretrained

    asked = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
             "seed": seed}  # fmt: skip
    defaults = load_params().evaluate.generation if PARAMS_FILE.exists() else GenerationParams()  # outside a project
    settings = defaults.model_copy(update={key: value for key, value in asked.items() if value is not None})
    lm, tokenizer = load_pretrained(model, key="--model")
    from tasks.evaluate import sample  # after the model: a model that cannot be loaded fails without torch

    typer.echo(sample(lm, tokenizer, [prompt], settings)[0]["text"])


if __name__ == "__main__":
    main()
