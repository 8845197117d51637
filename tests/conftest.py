"""The fixtures of the test run, and guards every test runs under: offline but for the loopback, and the MLflow
store's environment variables left as they were. Helpers are in tests/helpers.py, the test order and scheduler
in tests/scheduler.py."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.tracking.store import URI_VARIABLES, environment_kept
from tests.helpers import (
    IDLE_PREFECT_SERVICES,
    ROOT,
    GoldenBuild,
    build_golden,
    store_copy,
    trained_copy,
)
from tests.servers import LOOPBACK, free_port, process, wait_http

# Tests and benchmarks run the same tools on the same copies.
from tools.project import BIN, tool_env

LOOPBACK_NAMES = {"localhost", "localhost.localdomain"}


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return host in LOOPBACK_NAMES


# What decides where a process's runs go: a test that leaves one changed sends later tests' runs elsewhere.
STORE_VARIABLES = (*URI_VARIABLES, "DVC_ROOT")


@pytest.fixture(autouse=True)
def store_variables_kept(monkeypatch):
    """A test that leaves the store's variables changed in os.environ fails, and they are put back: an in-process
    mlflow.set_tracking_uri once exported the repository's own mlflow.db to the later tests of its worker."""
    before = {name: os.environ.get(name) for name in STORE_VARIABLES}
    with environment_kept(STORE_VARIABLES):
        yield
        monkeypatch.undo()  # the test's own changes, undone now instead of after this fixture
        after = {name: os.environ.get(name) for name in STORE_VARIABLES}
    assert after == before, f"the test left os.environ changed: {after} (was {before})"


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Any connection from the test's process to a host other than the loopback fails the test."""
    refused: list[str] = []
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex

    def guard(original):
        def checked(self, address):
            if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(str(address[0])):
                refused.append(str(address))
                raise OSError(f"the test suite is offline: connection to {address} refused (tests/conftest.py)")
            return original(self, address)

        return checked

    monkeypatch.setattr(socket.socket, "connect", guard(connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guard(connect_ex))
    yield refused
    assert not refused, f"the test tried to reach {refused}: tests run offline, on the loopback only"


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    """A prepared-data folder (as ingest writes it, stats.json too): a few hundred English and Chinese records."""
    folder = tmp_path / "prepared"
    folder.mkdir()
    lines = (ROOT / "data/samples/tinyshakespeare.txt").read_text(encoding="utf-8").split("\n\n")[:300]
    poems = json.loads((ROOT / "data/samples/tang300.json").read_text(encoding="utf-8"))[:40]
    texts = lines + ["\n".join(p["paragraphs"]) for p in poems]
    stats = {}
    for split, chunk in (("train", texts[::2]), ("validation", texts[1::2])):
        (folder / split).mkdir()
        with (folder / split / "00000.jsonl").open("w", encoding="utf-8") as handle:
            for text in chunk:
                handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        stats[split] = {"records": len(chunk), "chars": sum(map(len, chunk)), "bytes": len("".join(chunk).encode())}
    (folder / "stats.json").write_text(json.dumps(stats))
    return folder


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store as MLflow makes it (tables created, migrations run: seconds), for tests to copy."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    folder = tmp_path_factory.mktemp("empty-store")
    SqlAlchemyStore(f"sqlite:///{folder}/mlflow.db", (folder / "artifacts").as_uri()).engine.dispose()
    return folder / "mlflow.db"


@pytest.fixture
def mlflow_run(empty_store, tmp_path, monkeypatch) -> str:
    """A real run in a throwaway SQLite MLflow store; MLFLOW_TRACKING_URI points at it for the test."""
    from tasks.tracking import store

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_copy(empty_store, tmp_path / "mlflow.db"))
    client = store.client()
    experiment = client.create_experiment("tests", artifact_location=(tmp_path / "artifacts").as_uri())
    return client.create_run(experiment).info.run_id


def pytest_collection_finish(session):
    if any("golden" in getattr(item, "fixturenames", ()) for item in session.items):
        # The run's temporary folder made here, first: the build thread and the first test would both create it.
        session.config._tmp_path_factory.getbasetemp()
        session.config.golden_build = GoldenBuild(session.config._tmp_path_factory)
        session.config.golden_build.start()


@pytest.fixture(scope="session")
def golden(request, tmp_path_factory) -> Path:
    """The project trained once per test run with tiny_params() through `dvc repro`, then committed (params and
    dvc.lock): version 1 of gpt2-lm, @challenger. Never changed: tests work on a copy (trained_copy)."""
    build = getattr(request.config, "golden_build", None)
    if build is None:
        return build_golden(tmp_path_factory)
    build.join()
    if build.error is not None:
        raise build.error
    return build.project


@pytest.fixture
def trained_project(golden, tmp_path) -> Path:
    """A copy of the golden project for one test to change."""
    return trained_copy(golden, tmp_path)


@pytest.fixture(scope="session")
def prefect_env(tmp_path_factory) -> Iterator[dict[str, str]]:
    """The environment for the CLI and flows with one Prefect server per test process (each xdist worker; its own
    SQLite database, on the loopback) instead of an ephemeral server started by every command."""
    home = tmp_path_factory.mktemp("prefect")
    port = free_port()
    env = tool_env(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=f"http://{LOOPBACK}:{port}/api",
        PREFECT_UI_ENABLED="false",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    # The flows here need only the API and the services that record runs from events; the others (schedules,
    # automations, clean-ups) poll the database every few seconds for the whole run, on the suite's two cores.
    env.update({f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false" for name in IDLE_PREFECT_SERVICES})
    env["PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED"] = "[]"
    log = home / "server.log"
    command = [str(BIN / "prefect"), "server", "start", "--host", LOOPBACK, "--port", str(port)]
    with process(command, log, env) as server:
        wait_http(f"{env['PREFECT_API_URL']}/health", server, log)
        yield env
