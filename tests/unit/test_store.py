"""Which MLflow store a stage uses: the user's setting, else the project's own, never an earlier run's."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time

import pytest

from tasks.plumbing.errors import BAD_INPUT_EXIT, PipelineError, report_error
from tasks.tracking import store
from tests.helpers import ROOT, tool_env


def test_pointing_mlflow_at_one_project_leaves_the_next_its_own_store(tmp_path, monkeypatch):
    """MLflow's set_tracking_uri exports the URI to os.environ; were it kept, a process that ran one project's
    stage in-process (a flow, a test) would send the next project's runs, and its children's, to the first store."""
    for name in (*store.URI_VARIABLES, "DVC_ROOT"):
        monkeypatch.delenv(name, raising=False)
    first, second, root = (tmp_path / name for name in ("first", "second", "root"))
    for folder in (first, second, root):
        folder.mkdir()
    monkeypatch.chdir(first)
    mlflow = store.use_store()
    assert mlflow.get_tracking_uri() == mlflow.get_registry_uri() == f"sqlite:///{first}/mlflow.db"
    assert {name: os.environ.get(name) for name in store.URI_VARIABLES} == dict.fromkeys(store.URI_VARIABLES)

    monkeypatch.chdir(second)
    assert store.tracking_uri() == f"sqlite:///{second}/mlflow.db"
    monkeypatch.setenv("DVC_ROOT", str(root))  # what `dvc exp run --temp` sets: the project it came from
    assert store.use_store().get_tracking_uri() == store.tracking_uri() == f"sqlite:///{root}/mlflow.db"


def test_a_tracking_uri_the_user_set_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.chdir(tmp_path)
    assert store.use_store().get_tracking_uri() == "http://127.0.0.1:5000"
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    assert "MLFLOW_REGISTRY_URI" not in os.environ


# Imports first, then waits for the test's signal, so that the processes open the new store at the same moment.
OPEN_TOGETHER = """
import sys, time
from pathlib import Path
from tasks.tracking import store
store.mlflow_module()
Path(f"ready-{sys.argv[1]}").touch()
while not Path("go").exists():
    time.sleep(0.01)
print(len(store.client().search_experiments()))
"""


def test_stages_opening_a_new_store_together_all_succeed(tmp_path):
    """Two queued experiments' stages on a fresh clone (`dvc queue start --jobs 2`) both create the project's
    mlflow.db; unserialized, one failed with "table experiments already exists"."""
    env = tool_env(PYTHONPATH=str(ROOT))
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_TOGETHER, str(n)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(3)
    ]
    while len(list(tmp_path.glob("ready-*"))) < len(processes) and all(p.poll() is None for p in processes):
        time.sleep(0.05)
    (tmp_path / "go").touch()
    results = [(*p.communicate(timeout=120), p.returncode) for p in processes]
    assert [(code, out) for out, _, code in results] == [(0, "1\n")] * 3, [err[-500:] for _, err, _ in results]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("ready-")) == ["go", "mlflow.db"]


class Unauthorized(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(401)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_server_that_refuses_is_one_error_line_with_no_part_of_the_password(monkeypatch, capsys):
    """The server's answer names the URL, password and all; however long the user name before it, the line shows
    none of the password, also where the 200-character cut of the message falls inside it."""
    password = "Zq9xW7vK2mLp4tRb"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unauthorized)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for length in range(120, 200):  # the message's 200-character cut moves across the password
            uri = f"http://{'u' * length}:{password}@127.0.0.1:{server.server_address[1]}"
            monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
            with pytest.raises(PipelineError) as error:
                store.require_tracking_server()
            assert report_error(error.value) == BAD_INPUT_EXIT
            (line,) = capsys.readouterr().err.splitlines()
            assert line.startswith(
                f"error: MLflow tracking server {store.shown_uri(uri)} is not reachable (HTTPStatusError: "
            ), line
            assert line.endswith(
                "; start it, check its credentials, or unset MLFLOW_TRACKING_URI to use the local mlflow.db"
            )
            assert password[:4] not in line, line
    finally:
        server.shutdown()
        server.server_close()
