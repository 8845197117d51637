"""What a flow run shows in the Prefect UI beside its logs: Prefect artifacts (also `prefect artifact ls`).

The training pipeline publishes a summary (the version it registered, its metrics, the gate's decision when it
promoted), links to the MLflow run and the model version where the tracking store is a server, and a table of its
stages: how long each took and whether DVC ran it or skipped it. The promote flow publishes its decision; a failed
run publishes its one error line. Keys name the model, so each model's latest summary is one artifact in the UI.
"""

from __future__ import annotations

import re
from typing import Any

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from tasks.plumbing.redaction import redact
from tasks.tracking import store

SHOWN = ("perplexity", "bits_per_byte", "bits_per_char", "eval_tokens")  # eval.json's figures the summary lists first


def key(model_name: str, what: str) -> str:
    """An artifact key: lowercase letters, digits and dashes, as Prefect requires."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{model_name}-{what}".lower()).strip("-")


def _links(registered: dict[str, Any]) -> list[tuple[str, str]]:
    """(text, URL) of the run and the version in the MLflow UI; none for a store that is a file."""
    uri = store.tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return []
    base = store.shown_uri(uri).rstrip("/")
    experiment = store.client().get_run(registered["run_id"]).info.experiment_id
    return [
        (f"MLflow run {registered['run_id']}", f"{base}/#/experiments/{experiment}/runs/{registered['run_id']}"),
        (f"{registered['name']} version {registered['version']}",
         f"{base}/#/models/{registered['name']}/versions/{registered['version']}"),
    ]  # fmt: skip


def _figures(metrics: dict[str, Any]) -> str:
    ordered = [key for key in SHOWN if key in metrics] + sorted(k for k in metrics if k not in SHOWN and "/" in k)
    rows = [f"| {name} | {metrics[name]:.6g} |" for name in ordered if isinstance(metrics[name], int | float)]
    return "\n".join(["| metric | value |", "| --- | --- |", *rows])


def publish_run(registered: dict, metrics: dict, stages: list[dict], decision: dict | None) -> None:
    """The pipeline run's summary, its links and its stage table."""
    name = registered["name"]
    lines = [f"# {name} version {registered['version']}", "",
             f"Registered as `{registered['model_uri']}` (@{registered['alias']}), MLflow run `{registered['run_id']}` "
             f"in {store.shown_uri()}.", "", _figures(metrics)]  # fmt: skip
    if decision is not None:
        verdict = "promoted to @champion" if decision["promoted"] else "not promoted"
        lines += ["", f"**Promotion:** {verdict}.", *[f"- {rule['text']}" for rule in decision.get("gate", [])]]
        if not decision.get("gate"):
            lines.append(f"- {decision['reason']}")
    create_markdown_artifact(redact("\n".join(lines)), key=key(name, "summary"), description="the run's model")
    for text, link in _links(registered):
        create_link_artifact(link, link_text=text, key=key(name, "mlflow-run" if "run" in text else "mlflow-version"))
    create_table_artifact(stages, key=key(name, "stages"), description="each stage: ran or skipped, and its time")


def publish_decision(model_name: str, decision: dict) -> None:
    """The promote flow's decision and each rule's verdict."""
    verdict = "promoted to @champion" if decision["promoted"] else "not promoted"
    lines = [f"# {model_name} version {decision['challenger_version']}: {verdict}", ""]
    lines += [f"- {rule['text']}" for rule in decision.get("gate", [])] or [f"- {decision['reason']}"]
    if decision.get("report"):
        lines += ["", f"Report: `{decision['report']}` (the challenger's run)."]
    create_markdown_artifact(redact("\n".join(lines)), key=key(model_name, "promotion"), description="the decision")


def publish_failure(model_name: str, line: str) -> None:
    """A failed run's one error line, where the UI shows the run."""
    create_markdown_artifact(redact(f"# The run failed\n\n    {line}"), key=key(model_name, "failure"),
                             description="the error")  # fmt: skip
