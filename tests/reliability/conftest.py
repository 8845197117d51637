"""A trained project that bad input and faults must leave intact, and the checks that say so."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from tasks.plumbing.stage import run_cli
from tests.helpers import BIN, merge, run, store_client, tool_env, trained_copy, write_params

# What an earlier successful run left that nothing may lose or corrupt.
KEPT = ("data/prepared", "data/tokenized", "models/tokenizer", "models/gpt2", "registered.json", "dvc.lock")
# Training long enough to be stopped after a checkpoint (tests that interrupt one).
CHECKPOINTED = {"train": {"max_steps": 100, "eval_steps": 20, "checkpoint_every": 20}}


def digest(project: Path) -> dict[str, object]:
    """A hash of every kept output, of the DVC cache's file list and of the registry's versions."""
    found = {}
    for name in KEPT:
        path = project / name
        if not path.exists():
            found[name] = "missing"
            continue
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        sha = hashlib.sha256()
        for file in files:
            sha.update(str(file.relative_to(project)).encode() + file.read_bytes())
        found[name] = sha.hexdigest()
    found["dvc cache"] = sorted(p.name for p in (project / ".dvc/cache").rglob("*") if p.is_file())
    found["registry"] = registry_versions(project)
    return found


def registry_versions(project: Path) -> list[str]:
    client = store_client(project)
    return sorted(str(v.version) for v in client.search_model_versions("name='gpt2-lm'"))


def leftovers(project: Path) -> list[str]:
    """Temporary outputs (atomic_output's .name.tmp-PID / .name.old-PID) that a failure left behind."""
    pattern = re.compile(r"^\..+\.(tmp|old)-\d+$")
    return [str(p.relative_to(project)) for p in project.rglob(".*") if pattern.match(p.name) and ".dvc" not in p.parts]


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]


class Trained:
    """A project copy after one successful tiny run: break it, run, check, restore."""

    def __init__(self, project: Path):
        self.project = project
        self.params = yaml.safe_load((project / "params.yaml").read_text())
        self.baseline = digest(project)
        self.lock = (project / "dvc.lock").read_text()

    def repro(self, params_overrides: dict | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
        write_params(self.project, merge(self.params, params_overrides or {}))
        try:
            return run([str(BIN / "dvc"), "repro"], self.project, check=False, env=env)
        finally:
            write_params(self.project, self.params)

    def stage(self, name: str, params_overrides: dict) -> subprocess.CompletedProcess:
        """One stage as `python -m tasks.<name>` runs it (run_cli: the same error lines and exit statuses), in this
        process: the bad-input cases need neither DVC nor a fresh interpreter to show how a stage refuses them."""
        main = importlib.import_module(f"tasks.{name}").main
        write_params(self.project, merge(self.params, params_overrides))
        out, err, code = io.StringIO(), io.StringIO(), 0
        cwd, sigterm = Path.cwd(), signal.getsignal(signal.SIGTERM)
        try:
            os.chdir(self.project)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                run_cli(main)
        except SystemExit as exc:
            code = exc.code
        finally:
            os.chdir(cwd)
            signal.signal(signal.SIGTERM, sigterm)
            write_params(self.project, self.params)
        return subprocess.CompletedProcess([f"tasks.{name}"], code, out.getvalue(), err.getvalue())

    def assert_failed_cleanly(
        self, result: subprocess.CompletedProcess, message: str, upstream_ran: tuple[str, ...] = ()
    ) -> str:
        """Non-zero exit, exactly one error line matching message, no traceback, nothing lost.

        upstream_ran: outputs of stages that succeeded before the failing one; DVC records those (their old
        versions stay in the cache), so they are restored afterwards instead of compared."""
        assert result.returncode != 0, result.stdout[-2000:]
        lines = error_lines(result)
        assert len(lines) == 1, (result.stdout + result.stderr)[-3000:]
        assert re.search(message, lines[0]), lines[0]
        assert "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]
        after = digest(self.project)
        # The DVC cache may gain files (an upstream stage's new output), never lose one.
        assert set(self.baseline["dvc cache"]) <= set(after["dvc cache"]), "the DVC cache lost files"
        changed = {name for name in after if name != "dvc cache" and after[name] != self.baseline[name]}
        assert changed <= {*upstream_ran, "dvc.lock"} if upstream_ran else not changed, changed
        if upstream_ran:
            self.restore()
        assert leftovers(self.project) == []
        return lines[0]

    def restore(self) -> None:
        """Back to the successful run's dvc.lock and outputs (all still in the DVC cache)."""
        (self.project / "dvc.lock").write_text(self.lock)
        run([str(BIN / "dvc"), "checkout", "--force"], self.project)
        restored = digest(self.project)
        assert [name for name in restored if name != "dvc cache" and restored[name] != self.baseline[name]] == []


@pytest.fixture(scope="package")
def trained(golden, tmp_path_factory) -> Trained:
    """A copy of the trained project that each test breaks and restores."""
    return Trained(trained_copy(golden, tmp_path_factory.mktemp("reliability")))


@pytest.fixture
def env() -> dict[str, str]:
    return tool_env()
