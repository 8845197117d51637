"""Prefect flow `promote-model`: score @challenger against @champion and move @champion if it wins.

Run: python -m flows.promote (or gpt2-pipeline promote); the flow only wires tasks.promote.
"""

from __future__ import annotations

from prefect import flow

from flows import artifacts, server
from tasks import promote as promotion
from tasks.plumbing.errors import PipelineError
from tasks.plumbing.outputs import inside_project
from tasks.plumbing.params import PARAMS_FILE, load_params


@flow(name="promote-model", log_prints=True)
def promote_model(workdir: str = ".", version: str | None = None) -> dict:
    """Promote the challenger when it meets every rule of promote.gate; returns the decision.

    Args:
        workdir: the project (or run workspace) whose params.yaml and validation text to use.
        version: the registered version to judge; default: the one @challenger names.
    """
    server.one_line_errors()
    root = inside_project(workdir, "workdir")  # a deployment's parameter: the worker's project and nothing else
    params = load_params(root / PARAMS_FILE)
    try:
        with server.promotion_slot(params.register.model_name):  # one promotion at a time on a shared server
            decision = promotion.promote(params, promotion.text_path(params, root), version, root)
    except PipelineError as error:  # its one line, where the Prefect UI shows the run
        artifacts.publish_failure(params.register.model_name, str(error))
        raise
    artifacts.publish_decision(params.register.model_name, decision)
    verb = "promoted to @champion" if decision["promoted"] else "not promoted"
    print(f"version {decision['challenger_version']} {verb}")
    for rule in decision.get("gate") or [{"text": decision["reason"]}]:
        print(f"  {rule['text']}")
    if decision.get("report"):
        print(f"report: {decision['report']} (the challenger's run, in the MLflow UI)")
    return decision


if __name__ == "__main__":
    server.start_local()
    promote_model()
