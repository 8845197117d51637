"""The MLflow model registry: the aliases the pipeline moves and the versions they point at.

Used by register (a new version, @challenger), promotion and the CLI; no other stage imports it, so an edit here
reruns only register.
"""

from __future__ import annotations

import json

from tasks.plumbing.redaction import redact
from tasks.tracking import store

CHALLENGER, CHAMPION, PREVIOUS = "challenger", "champion", "previous-champion"
# The longest description the SQL stores keep (a String(5000) column; PostgreSQL refuses more, SQLite does not).
MAX_DESCRIPTION = 5000
CUT_NOTE = "\n\n*The card is cut here to fit the registry; the whole card is the version's model_card.md artifact.*"


def within_limit(card: str, limit: int = MAX_DESCRIPTION) -> str:
    """card cut to at most limit characters with a note saying where the rest is.

    A code block left open by the cut is closed, so the note stays text."""
    if len(card) <= limit:
        return card
    kept: list[str] = []
    fence = None  # the fence of the code block the kept lines leave open
    budget = limit - len(CUT_NOTE) - 40  # room for a closing fence
    for line in card.splitlines(keepends=True):
        if len(line) > budget:
            kept.append(line[:budget] + "\n")
            break
        budget -= len(line)
        kept.append(line)
        stripped = line.strip()
        backticks = len(stripped) - len(stripped.lstrip("`"))
        if backticks >= 3 and fence is None:
            fence = "`" * backticks  # a block opens
        elif fence is not None and stripped == fence:
            fence = None  # and closes
    closing = f"\n{fence}" if fence else ""
    return "".join(kept).rstrip("\n") + closing + CUT_NOTE


# What MLflow answers for a model or an alias that does not exist (SQL and REST stores alike); anything else (a
# server that is down, refused credentials) is a failure, not an absent alias.
NOT_THERE = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


def alias_version(name: str, alias: str) -> str | None:
    """The version an alias points at, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return str(store.client().get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if exc.error_code in NOT_THERE:
            return None
        raise


def set_alias(name: str, alias: str, version: str) -> None:
    store.client().set_registered_model_alias(name, alias, version)


def new_version(name: str, model_id: str, run_id: str, card: str, tags: dict[str, object]) -> str:
    """A new version of the registered model, in one call; returns its number.

    A new version of the registered model name (created if missing) from a logged model, with its model card as
    description and its tags, in one call; returns its number."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    client = store.client()
    try:
        client.create_registered_model(name)
        print(f"Registered model '{name}' created.")
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    version = client.create_model_version(
        name,
        source=f"models:/{model_id}",
        run_id=run_id,
        tags={key: redact(str(value)) for key, value in tags.items()},
        description=within_limit(card),
        model_id=model_id,
    )
    print(f"Created version '{version.version}' of model '{name}'.")
    # The logged model's page lists the versions made from it (what mlflow.register_model records too; a
    # tracking server may have recorded it already).
    logged = client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS)
    listed, made = json.loads(logged) if logged else [], {"name": name, "version": int(version.version)}
    if made not in listed:
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*listed, made])})
    return str(version.version)


def tag_version(name: str, version: str, tags: dict[str, object]) -> None:
    client = store.client()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, redact(str(value)))


def describe_champion(name: str, version: str) -> None:
    """The registered model's description becomes its new champion's model card.

    The registered model's description becomes its new champion's model card (the version's description), so the
    model's page in the MLflow UI says what @champion is."""
    client = store.client()
    card = client.get_model_version(name, version).description or ""
    client.update_registered_model(name, description=within_limit(f"@{CHAMPION} is version {version}.\n\n{card}"))


def versions(name: str) -> list:
    """Every version of a registered model, oldest first."""
    return sorted(store.client().search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))


def aliases_by_version(name: str) -> dict[str, list[str]]:
    """{"3": ["@champion", "@challenger"], ...}: search_model_versions leaves ModelVersion.aliases empty."""
    by_version: dict[str, list[str]] = {}
    for alias, number in store.client().get_registered_model(name).aliases.items():
        by_version.setdefault(str(number), []).append(f"@{alias}")
    return by_version
