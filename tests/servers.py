"""Real servers for the integration tests, each on 127.0.0.1 and stopped on exit, also on failure.

PostgreSQL comes from Debian's `postgresql` package (.ci/run installs it when missing): a throwaway cluster
made with initdb in a temporary folder, on a free loopback port, with password authentication. The MLflow
and Prefect servers and the Prefect worker are the real command-line programs, each in its own process group
so that stopping one stops everything it started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tools.project import BIN

PG_USER = "pipeline"
PG_PASSWORD = "test-only-password"
LOOPBACK = "127.0.0.1"


# The pipeline uses none of the MLflow server's jobs (GenAI evaluation, trace rollups): without them it starts no
# job runner and huey consumers, which cost the suite about a minute of CPU.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def mlflow_server(
    port: int, backend: str, artifacts: Path, log: Path, env: dict[str, str], workers: int = 1
) -> contextlib.AbstractContextManager[subprocess.Popen]:
    """`mlflow server` on the loopback (started, not yet answering), proxying artifacts into the folder
    artifacts, stopped on exit as process() stops it."""
    command = [
        str(BIN / "mlflow"), "server", "--host", LOOPBACK, "--port", str(port), "--workers", str(workers),
        "--backend-store-uri", backend, "--artifacts-destination", str(artifacts),
    ]  # fmt: skip
    return process(command, log, {**env, **MLFLOW_SERVER_ENV})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def postgres_bin() -> Path | None:
    """The folder of initdb/pg_ctl: PATH first, then Debian's versioned folders."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return versions[-1].parent if versions else None


def _as_postgres_user(args: list[str]) -> list[str]:
    """initdb refuses to run as root: run the cluster as Debian's `postgres` user then."""
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@contextlib.contextmanager
def postgres(databases: tuple[str, ...]) -> Iterator[dict[str, str]]:
    """A PostgreSQL cluster with one database per name; yields {name: "postgresql://user:pw@host:port/name"}."""
    bindir = postgres_bin()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql (.ci/run does it)")
    folder = Path(tempfile.mkdtemp(prefix="gpt2-pg-"))
    data = folder / "data"
    port = free_port()
    try:
        (folder / "pw").write_text(PG_PASSWORD)
        if os.geteuid() == 0:
            shutil.chown(folder, "postgres")
            shutil.chown(folder / "pw", "postgres")
        initdb = [str(bindir / "initdb"), "-D", str(data), "-U", PG_USER, "--pwfile", str(folder / "pw")]
        _check(_as_postgres_user([*initdb, "--auth=scram-sha-256", "-E", "UTF8", "--locale=C"]))
        options = f"-c listen_addresses={LOOPBACK} -p {port} -k {folder} -c fsync=off"
        _check(
            _as_postgres_user(
                [str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-w", "-l", str(folder / "log"), "start"]
            )
        )
        try:
            env = {**os.environ, "PGPASSWORD": PG_PASSWORD}
            for name in databases:
                _check([str(bindir / "createdb"), "-h", LOOPBACK, "-p", str(port), "-U", PG_USER, name], env=env)
            yield {name: f"postgresql://{PG_USER}:{PG_PASSWORD}@{LOOPBACK}:{port}/{name}" for name in databases}
        finally:
            _check(_as_postgres_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _check(args: list[str], env: dict[str, str] | None = None) -> None:
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:4])} failed: {result.stderr.strip() or result.stdout.strip()}")


@contextlib.contextmanager
def process(
    args: list[str], log: Path, env: dict[str, str], cwd: Path | None = None, background: bool = False
) -> Iterator[subprocess.Popen]:
    """A long-running program in its own process group, its output in log; the group is stopped on exit.

    background: started as a shell's `&` starts it, SIGINT ignored."""
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if background else None
    with log.open("ab") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True, preexec_fn=ignore
        )
    try:
        yield proc
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the process group, SIGKILL what is left after `grace` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    """Wait until url answers 200; fail with the server's log when it exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=5).status_code == 200:
                return
        time.sleep(1)
    raise RuntimeError(f"{url}: no answer in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def still_running(processes: list, ports: list[int]) -> list[str]:
    """What outlived its stop: any of processes (psutil.Process) still alive, any port still listened on."""
    import psutil

    alive = [
        f"pid {p.pid} {' '.join(p.cmdline()[:4])}"
        for p in processes
        if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    ]
    listening = {c.laddr.port for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
    return alive + [f"port {port} still listened on" for port in ports if port in listening]
