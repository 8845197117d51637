"""The MLflow tracking store: which one, a client for it, and a check that it answers.

MLFLOW_TRACKING_URI names a server; without it the store is the project's own `mlflow.db` (artifacts in
`mlartifacts/` beside it). "The project" is DVC's root (DVC_ROOT, which `dvc exp run --temp`, `--queue` and
`--run-all` set to the project they came from, not their temporary copy), else the current folder: so every run
and model version reaches one store, wherever DVC runs a stage.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tasks.plumbing.errors import PipelineError, cause
from tasks.plumbing.redaction import redact

DATABASE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
HEALTH_TIMEOUT_S = 10
# MLflow's set_tracking_uri / set_registry_uri also write these into os.environ (for child processes).
URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
_created: set[str] = set()  # the SQLite stores this process has seen with their tables made


def store_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or ".").resolve()


def default_uri(root: Path | None = None) -> str:
    """The project's SQLite store, by absolute path."""
    return f"sqlite:///{(root or store_root()).resolve() / DATABASE}"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set (a shared server), else the project's SQLite file."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_uri()


def shown_uri(uri: str | None = None) -> str:
    """The tracking URI as logs and messages show it: its user-info (a password, a token) hidden."""
    return redact(uri or tracking_uri())


def mlflow_module():
    """mlflow, imported with its usage telemetry off: the pipeline talks only to the configured tracking server."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # MLflow prints "View run at <tracking URI>" with the URI's password in it; the stages print their own lines.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    import mlflow

    return mlflow


def create_once(uri: str) -> None:
    """A new SQLite store's tables, made by one process at a time.

    Two stages opening a new store together (queued experiments run with `dvc queue start --jobs 2` on a fresh
    clone) would both create them, and one fail ("table experiments already exists"). They wait on an exclusive lock
    on the database's folder: no file left behind."""
    if uri in _created or not uri.startswith("sqlite:///"):
        return
    folder = Path(uri.removeprefix("sqlite:///")).parent
    if folder.is_dir():  # else MLflow's own error says what is wrong with the path
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)  # released by the close, also when this fails
            mlflow_module().MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments(max_results=1)
        finally:
            os.close(descriptor)
    _created.add(uri)


def client():
    mlflow, uri = mlflow_module(), tracking_uri()
    create_once(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextmanager
def environment_kept(names: tuple[str, ...] = URI_VARIABLES) -> Iterator[None]:
    """The variables as they were before the block, whatever it wrote to os.environ."""
    before = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def point_mlflow(tracking: str, registry: str | None = None):
    """mlflow's fluent API pointed at these URIs; returns the module.

    mlflow with its fluent API (log_model, download_artifacts) on these URIs, the registry's defaulting to the
    tracking one; returns the module. The environment is left as it was: MLflow's setters also export the URIs, and
    had that stayed, it would decide the store of every later run in this process and its children (a flow's next
    stage, a test's next project) instead of the user's setting and DVC's root."""
    mlflow = mlflow_module()
    with environment_kept():
        mlflow.set_tracking_uri(tracking)
        mlflow.set_registry_uri(registry or tracking)
    return mlflow


def use_store():
    """mlflow with its fluent API pointed at this store; returns the module."""
    uri = tracking_uri()
    create_once(uri)
    return point_mlflow(uri)


def local_artifacts(uri: str) -> str | None:
    """A SQLite store keeps its artifacts in mlartifacts/ beside the database file; a server decides itself."""
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri.removeprefix("sqlite:///"))
    return (database.parent / ARTIFACTS_DIR).resolve().as_uri()


def require_tracking_server() -> None:
    """Fail before any work when a configured tracking server does not answer.

    An HTTP server is asked for /health with a short timeout first: MLflow's client retries a refused
    connection with backoff for minutes before it gives up.
    """
    uri = tracking_uri()
    try:
        if uri.startswith(("http://", "https://")):
            import httpx

            httpx.get(f"{uri.rstrip('/')}/health", timeout=HEALTH_TIMEOUT_S).raise_for_status()
        client().search_experiments(max_results=1)
    except Exception as exc:
        raise PipelineError(
            f"MLflow tracking server {shown_uri(uri)} is not reachable ({cause(exc)}); start it, check its "
            "credentials, or unset MLFLOW_TRACKING_URI to use the local mlflow.db"
        ) from None
