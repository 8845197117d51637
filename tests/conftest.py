"""Shared fixtures: tiny params, a tiny prepared corpus, copies of the project to run DVC in, one project trained
once per test run that tests copy instead of retraining, and one Prefect server per test process."""

from __future__ import annotations

import contextlib
import copy
import ipaddress
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

# Tests and benchmarks run the same tools on the same copies.
from bench.measure import BIN, copy_project, tool_env
from tasks.store import URI_VARIABLES, environment_kept, point_mlflow
from tests.servers import LOOPBACK, free_port, process, wait_http

ROOT = Path(__file__).resolve().parents[1]
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


# Small enough to train in seconds on two CPU cores, big enough to learn something. A validation split of 2% (147
# records, 179 blocks): the evaluations during training and the evaluate stage score each model on it, and at 10%
# they were a third of a training run.
TINY_OVERRIDES = {
    "data": {"validation_fraction": 0.02},
    "tokenizer": {"vocab_size": 512, "block_size": 64},
    "model": {"config": {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 64, "dropout": 0.0}},
    "train": {
        "max_steps": 150,
        "batch_size": 8,
        "learning_rate": 3.0e-3,
        "warmup_steps": 10,
        "logging_steps": 10,
        "eval_steps": 50,
    },
}


def merge(base: dict, overrides: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def default_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def tiny_params() -> dict:
    return merge(default_params(), TINY_OVERRIDES)


def write_params(folder: Path, params: dict) -> None:
    (folder / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False))


def run(args: list[str], cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env or tool_env(), capture_output=True, text=True, timeout=1200)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def cli_here(project: Path, *args: str) -> str:
    """`gpt2-pipeline args...` run in this process in project (the same command, without a new interpreter to
    import torch and transformers again); its output."""
    from typer.testing import CliRunner

    from flows.cli import app

    cwd = Path.cwd()
    os.chdir(project)
    try:
        result = CliRunner().invoke(app, list(args))
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output[-3000:]
    return result.stdout


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
        with (folder / f"{split}.jsonl").open("w", encoding="utf-8") as handle:
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


def store_copy(empty_store: Path, database: Path) -> str:
    """A new MLflow store at database, copied from the session's empty one; its tracking URI."""
    shutil.copyfile(empty_store, database)
    return f"sqlite:///{database}"


@pytest.fixture
def mlflow_run(empty_store, tmp_path, monkeypatch) -> str:
    """A real run in a throwaway SQLite MLflow store; MLFLOW_TRACKING_URI points at it for the test."""
    from tasks import store

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_copy(empty_store, tmp_path / "mlflow.db"))
    client = store.client()
    experiment = client.create_experiment("tests", artifact_location=(tmp_path / "artifacts").as_uri())
    return client.create_run(experiment).info.run_id


def store_client(project: Path):
    """A client of the project's own MLflow store, for its runs and its registry alike: a client given only a
    tracking URI takes the registry from MLflow's process-wide setting, which another test may have set."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{project}/mlflow.db"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def mlflow_on(uri: str) -> Iterator[object]:
    """mlflow with its fluent API (load_model, download_artifacts) on uri for tracking and registry alike, both
    restored afterwards: they are process-wide, and another test (a stage run in-process) may have set them."""
    import mlflow

    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    try:
        yield point_mlflow(uri)
    finally:
        point_mlflow(*previous)


def stage_processes(root: int, stage: str) -> list:
    """The pythons running `-m tasks.<stage>` below the process root: not a shell around one, nor a child it
    forked (between fork and exec a git call or a worker has the same command line); processes that end while
    this looks are left out."""
    import psutil

    found = []
    for child in psutil.Process(root).children(recursive=True):
        try:
            if child.name().startswith("python") and f"tasks.{stage}" in " ".join(child.cmdline()):
                found.append((child, child.ppid()))
        except psutil.Error:
            continue
    pids = {child.pid for child, _ in found}
    return [child for child, parent in found if parent not in pids]


def untrained_perplexity(project: Path) -> float:
    """The validation perplexity of an untrained model shaped like the project's trained one: the starting point
    a trained model is measured against."""
    import datasets
    from transformers import GPT2Config, GPT2LMHeadModel

    from tasks.evaluate import score

    config = GPT2Config.from_pretrained(project / "models/gpt2")
    block = yaml.safe_load((project / "params.yaml").read_text())["tokenizer"]["block_size"]
    blocks = datasets.load_from_disk(str(project / "data/tokenized"))["validation"].with_format("torch")[:]
    return score(GPT2LMHeadModel(config), blocks, block, block, 16, "cpu").metrics()["perplexity"]


def commit(project: Path, message: str = "state") -> None:
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message, "--allow-empty"], project)


def _build_golden(tmp_path_factory) -> Path:
    """Train the golden project once per test run (under pytest-xdist the workers share it: the first to get
    here trains it, the others wait for it); returns its folder."""
    from filelock import FileLock

    run_folder = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker has a folder of its own in the run's folder
        run_folder = run_folder.parent
    folder, done = run_folder / "golden", run_folder / "golden.trained"
    with FileLock(run_folder / "golden.lock"):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed attempt left
            folder.mkdir()
            project = copy_project(folder)
            write_params(project, tiny_params())
            # System metrics every second instead of every 10 (the training takes seconds): only how often.
            run([str(BIN / "dvc"), "repro"], project, env=tool_env(MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1"))
            commit(project, "trained")
            done.touch()
    return folder / "project"


class _Background(threading.Thread):
    """The golden project trained while the first tests (those that do not need it) run."""

    def __init__(self, tmp_path_factory):
        super().__init__(daemon=True)
        self.tmp_path_factory, self.project, self.error = tmp_path_factory, None, None

    def run(self):
        try:
            self.project = _build_golden(self.tmp_path_factory)
        except BaseException as exc:  # handed to the golden fixture, which raises it in the tests that need it
            self.error = exc


def module_of(nodeid: str) -> str:
    """The test module of a test id (tests/x/test_y.py::test_z[case] -> tests/x/test_y.py)."""
    return nodeid.split("::")[0]


DURATIONS = ROOT / "tests/durations.json"  # seconds per module, from a full run with --store-durations
_measured: dict[str, float] = {}


def pytest_addoption(parser):
    parser.addoption(
        "--store-durations",
        action="store_true",
        help="write each test module's measured seconds to tests/durations.json: the order modules are handed out",
    )


@pytest.hookimpl(trylast=True)  # after pytest-randomly's shuffle
def pytest_collection_modifyitems(session, config, items):
    """The modules none of whose tests need the golden project first, so they run while it trains in the
    background; then the others. Within each part the longest module first (tests/durations.json; one not there
    counts as short): pytest-xdist (--dist loadscope, with the scheduler below) hands a worker a whole module
    at a time in this order, so the last ones, running while the other worker may have nothing left, are short. Tests
    keep pytest-randomly's order within their module."""
    known = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
    modules: dict[str, set[str]] = {}
    for item in items:
        modules.setdefault(module_of(item.nodeid), set()).update(getattr(item, "fixturenames", ()))

    def order(item) -> tuple[bool, float]:
        module = module_of(item.nodeid)
        return "golden" in modules[module], -known.get(module, 0.0)

    items.sort(key=order)


def pytest_xdist_make_scheduler(config, log):
    """--dist loadscope, handing out modules in the order above and one at a time (see _one_module_at_a_time)."""
    if config.getoption("dist") == "loadscope":
        return _one_module_at_a_time(config, log)
    return None


def _one_module_at_a_time(config, log):
    """xdist's loadscope scheduler, except that a worker gets its next module only on the last test of the one it
    has (xdist gives it when three tests are left, and two modules at the start): a worker never holds a module
    queued behind a long test while the other worker has nothing to do. And the modules keep the collection's order
    (xdist sorts them by their number of tests unless told --no-loadscope-reorder)."""
    from xdist.scheduler import LoadScopeScheduling

    class OneModuleAtATime(LoadScopeScheduling):
        def _reschedule(self, node) -> None:
            if node.shutting_down:
                return
            if not self.workqueue:
                node.shutdown()
            elif self._pending_of(self.assigned_work[node]) <= 1:  # its last test waits for the next to be known
                self._assign_work_unit(node)

    config.option.loadscopereorder = False
    return OneModuleAtATime(config, log)


def pytest_runtest_logreport(report):
    """Setup, call and teardown of every test, summed by module (under xdist the controller sees every worker's)."""
    module = module_of(report.nodeid)
    _measured[module] = _measured.get(module, 0.0) + report.duration


def pytest_sessionfinish(session, exitstatus):
    if session.config.getoption("store_durations") and not os.environ.get("PYTEST_XDIST_WORKER") and _measured:
        rounded = {module: round(seconds, 1) for module, seconds in sorted(_measured.items())}
        DURATIONS.write_text(json.dumps(rounded, indent=1) + "\n")


def pytest_collection_finish(session):
    if any("golden" in getattr(item, "fixturenames", ()) for item in session.items):
        session.config.golden_build = _Background(session.config._tmp_path_factory)
        session.config.golden_build.start()


@pytest.fixture(scope="session")
def golden(request, tmp_path_factory) -> Path:
    """The project trained once per test run with tiny_params() through `dvc repro`, then committed (params and
    dvc.lock): version 1 of gpt2-lm, @challenger. Never changed: tests work on a copy (trained_copy)."""
    build = getattr(request.config, "golden_build", None)
    if build is None:
        return _build_golden(tmp_path_factory)
    build.join()
    if build.error is not None:
        raise build.error
    return build.project


def trained_copy(source: Path, parent: Path) -> Path:
    """A copy of a trained project under parent: its git history, outputs, DVC cache and MLflow store.

    MLflow records artifact locations as absolute paths (the store must not depend on the folder a stage runs
    in), so they are rewritten to the copy's; DVC's temporary folder (locks, queue) is not copied."""
    dest = parent / "project"
    shutil.copytree(source, dest, symlinks=True, ignore=lambda folder, _: {"tmp"} if folder.endswith(".dvc") else ())
    relocate_mlflow_store(dest / "mlflow.db", str(source), str(dest))
    return dest


def relocate_mlflow_store(database: Path, old: str, new: str) -> None:
    """Replace the folder old by new in every text column of a copied SQLite MLflow store."""
    with contextlib.closing(sqlite3.connect(database)) as db, db:
        tables = [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            columns = [c[1] for c in db.execute(f'PRAGMA table_info("{table}")') if "CHAR" in c[2] or "TEXT" in c[2]]
            for column in columns:  # table and column names come from the schema, the paths are parameters
                update = f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) WHERE instr("{column}", ?) > 0'  # noqa: S608
                db.execute(update, (old, new, old))


@pytest.fixture
def trained_project(golden, tmp_path) -> Path:
    """A copy of the golden project for one test to change."""
    return trained_copy(golden, tmp_path)


IDLE_PREFECT_SERVICES = (
    "CANCELLATION_CLEANUP", "CLEANUP_RECONCILER", "FOREMAN", "LATE_RUNS", "PAUSE_EXPIRATIONS", "REPOSSESSOR",
    "SCHEDULER", "TRIGGERS",
)  # fmt: skip


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
