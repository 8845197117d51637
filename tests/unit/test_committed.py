"""What is committed agrees with itself: dvc.lock records the committed code, and the outputs DVC keeps out of
its cache (metrics, plots) are in git, so a fresh clone is up to date and draws its plots."""

from __future__ import annotations

import hashlib
import json
import subprocess

import yaml

from tests.helpers import ROOT


def committed(path: str) -> bytes:
    return subprocess.run(["git", "show", f"HEAD:{path}"], cwd=ROOT, capture_output=True, check=True).stdout


def test_the_committed_dvc_lock_records_the_committed_code():
    """Each stage's code deps in dvc.lock have the md5 of the committed file (DVC hashes the bytes), and are the
    deps dvc.yaml names: a code change without its `dvc repro` and dvc.lock fails here, not on a user's clone."""
    lock = yaml.safe_load(committed("dvc.lock"))["stages"]
    declared = yaml.safe_load(committed("dvc.yaml"))["stages"]
    stale = []
    for stage, spec in declared.items():
        code = {dep for dep in spec["deps"] if dep.endswith(".py")}
        locked = {dep["path"]: dep["md5"] for dep in lock[stage]["deps"] if dep["path"].endswith(".py")}
        stale += [f"{stage}: {path} not in dvc.lock" for path in sorted(code - set(locked))]
        stale += [
            f"{stage}: {path}"
            for path, md5 in sorted(locked.items())
            if path in code and hashlib.md5(committed(path)).hexdigest() != md5  # noqa: S324 (DVC's hash)
        ]
    assert stale == [], "dvc.lock is older than the code: run `make run` and commit dvc.lock"


def test_every_output_dvc_keeps_out_of_its_cache_is_committed():
    tracked = set(subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split())
    missing = []
    for stage, spec in yaml.safe_load(committed("dvc.yaml"))["stages"].items():
        for kind in ("outs", "metrics", "plots"):
            for entry in spec.get(kind, []):
                path, options = next(iter(entry.items())) if isinstance(entry, dict) else (entry, {})
                if options and options.get("cache") is False and path not in tracked:
                    missing.append(f"{stage}: {path}")
    assert missing == [], "commit them (cache: false outputs live in git)"


def test_the_test_durations_name_only_test_modules_that_exist():
    """tests/durations.json orders the modules of the test run (tests/scheduler.py): a module renamed or removed
    since the timings were measured is not left in it."""
    durations = json.loads((ROOT / "tests/durations.json").read_text())
    modules = {path.relative_to(ROOT).as_posix() for path in (ROOT / "tests").rglob("test_*.py")}
    assert sorted(set(durations) - modules) == []
    assert all(isinstance(seconds, int | float) and seconds >= 0 for seconds in durations.values())
