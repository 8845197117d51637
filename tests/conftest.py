"""Shared fixtures: tiny params, a tiny prepared corpus, and a copy of the project to run DVC in."""

from __future__ import annotations

import copy
import ipaddress
import json
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from bench.measure import BIN, copy_project, tool_env  # noqa: F401  # tests and benchmarks run the same tools on the same copies

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK_NAMES = {"localhost", "localhost.localdomain"}


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return host in LOOPBACK_NAMES


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


# Small enough to train in seconds on two CPU cores, big enough to learn something.
TINY_OVERRIDES = {
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


@pytest.fixture
def mlflow_run(tmp_path, monkeypatch) -> str:
    """A real run in a throwaway SQLite MLflow store; MLFLOW_TRACKING_URI points at it for the test."""
    from tasks import store

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    client = store.client()
    experiment = client.create_experiment("tests", artifact_location=(tmp_path / "artifacts").as_uri())
    return client.create_run(experiment).info.run_id
