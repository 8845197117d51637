"""`gpt2-pipeline serve`: the deployments of prefect.yaml, served from this process with `prefect.serve`.

prefect.yaml stays the one description of the deployments (names, schedules, parameters, concurrency limits);
`prefect deploy` reads it for work pools, this module reads it to serve the same deployments without one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tasks.plumbing.errors import PipelineError

PREFECT_FILE = Path("prefect.yaml")


def load_deployments(path: Path = PREFECT_FILE) -> list[dict[str, Any]]:
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found; run from the project root, next to dvc.yaml") from None
    entries = (config or {}).get("deployments") or []
    if not entries:
        raise PipelineError(f"{path}: no deployments listed under `deployments:`")
    return entries


def runner_deployments(path: Path = PREFECT_FILE) -> list:
    """One RunnerDeployment per prefect.yaml entry, with its schedules, parameters and concurrency limit."""
    from prefect.flows import load_flow_from_entrypoint
    from prefect.schedules import Cron

    deployments = []
    for entry in load_deployments(path):
        flow = load_flow_from_entrypoint(entry["entrypoint"])
        schedules = [
            Cron(item["cron"], timezone=item.get("timezone"), active=item.get("active", True))
            for item in entry.get("schedules") or []
        ]
        deployments.append(
            flow.to_deployment(
                name=entry["name"],
                description=entry.get("description"),
                parameters=entry.get("parameters") or {},
                schedules=schedules or None,
                concurrency_limit=entry.get("concurrency_limit"),
            )
        )
    return deployments


def serve(path: Path = PREFECT_FILE) -> None:
    from prefect import serve as prefect_serve

    prefect_serve(*runner_deployments(path))
