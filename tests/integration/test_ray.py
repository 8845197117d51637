"""data.executor: ray on a real Ray cluster: a head and a second node, each its own `ray start`, on 127.0.0.1.

ingest and tokenize run their units there as Ray Data jobs and must write the shards the local path writes, byte
for byte; a node's error reaches the user as the one line the local path prints."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
import yaml

from tasks.ingest import ingest
from tasks.plumbing.errors import PipelineError
from tasks.plumbing.params import DataParams, ModelParams, TokenizerParams
from tasks.tokenize import tokenize
from tests.servers import LOOPBACK, free_port, process
from tools.project import BIN, ROOT

pytestmark = pytest.mark.servers

RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",  # Ray would otherwise report usage to its makers
    # No token authentication on this loopback-only cluster, for its nodes and the tests' driver alike: left unset,
    # each would turn it on or not depending on whether ~/.ray/auth_token exists (a local ray.init(), as
    # serve-model's, writes one), and a node that differs from its head cannot join.
    "RAY_AUTH_MODE": "disabled",
}
NODE = ["--block", f"--node-ip-address={LOOPBACK}", "--num-cpus=1", "--object-store-memory=100000000"]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """`host:port` of a two-node Ray cluster; each `ray start --block` stops what it started when it is stopped."""
    folder = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # Ray's sockets need a short path
    port, env = free_port(), {**os.environ, **RAY_ENV}
    address = f"{LOOPBACK}:{port}"
    head = [str(BIN / "ray"), "start", "--head", f"--port={port}", "--include-dashboard=false",
            "--disable-usage-stats", f"--temp-dir={folder}", *NODE]  # fmt: skip
    try:
        with (
            mock.patch.dict(os.environ, RAY_ENV),
            process(head, folder / "head.log", env),
            process([str(BIN / "ray"), "start", f"--address={address}", *NODE], folder / "node.log", env),
        ):
            _wait_for_nodes(address, 2, env, folder)
            yield address
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _wait_for_nodes(address: str, count: int, env: dict, folder: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(subprocess.TimeoutExpired):
            status = subprocess.run([str(BIN / "ray"), "status", f"--address={address}"], env=env,
                                    capture_output=True, text=True, timeout=30).stdout  # fmt: skip
            if status.count(" node_") >= count:
                return
        time.sleep(1)
    logs = "\n".join((folder / name).read_text()[-2000:] for name in ("head.log", "node.log"))
    raise RuntimeError(f"the Ray cluster at {address} did not reach {count} nodes:\n{logs}")


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _sources(folder: Path) -> list[str]:
    """Three formats over several units (shard_mb 1), with repeats across units for the merge to drop."""
    paragraphs = [f"paragraph {i} " + "word " * (i % 37) + ("\nsecond line" if i % 3 else "") for i in range(20000)]
    (folder / "book.txt").write_text("\n\n".join(paragraphs + paragraphs[:40]) + "\n", encoding="utf-8")
    poems = json.loads((ROOT / "data/samples/tang300.json").read_text(encoding="utf-8"))
    with gzip.open(folder / "poems.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"text": "\n".join(p["paragraphs"])}, ensure_ascii=False) + "\n" for p in poems)
    return ["book.txt", "poems.jsonl.gz"]


def test_ingest_and_tokenize_on_ray_write_the_local_shards_byte_for_byte(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the project: sources are project-relative, as the nodes read them
    monkeypatch.setattr("tasks.tokenize.RECORD_BATCH", 300)  # many batches, spread over both nodes
    data = {"sources": _sources(tmp_path), "shard_mb": 1, "workers": 1}
    local = ingest(DataParams(**data), tmp_path / "local/prepared")
    tokenize(TokenizerParams(vocab_size=500, block_size=64), ModelParams(), tmp_path / "local/prepared",
             tmp_path / "local/tokenizer", tmp_path / "local/tokenized")  # fmt: skip
    assert local["shards"] >= 3 and local["dropped"]["duplicate"] >= 40

    # The stages as dvc runs them: the cluster named by data.ray_address for ingest, by RAY_ADDRESS for tokenize.
    from tasks import ingest as ingest_stage
    from tasks import tokenize as tokenize_stage

    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["data"] |= data | {"executor": "ray", "ray_address": ray_cluster}
    params["tokenizer"] |= {"vocab_size": 500, "block_size": 64}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    ingest_stage.main()
    params["data"]["ray_address"] = None
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster)
    tokenize_stage.main()
    for output in ("data/prepared", "models/tokenizer", "data/tokenized"):
        ran_on_ray, ran_here = _files(tmp_path / output), _files(tmp_path / "local" / Path(output).name)
        assert ran_on_ray.keys() == ran_here.keys() and len(ran_here) >= 2, output
        assert [name for name in ran_here if ran_on_ray[name] != ran_here[name]] == [], output


def test_a_nodes_error_is_the_one_line_the_local_path_gives(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "good.txt").write_text("a first record\n\nanother one\n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("fine\n\ncaf\xe9 au lait\n".encode("latin-1"))
    messages = []
    for executor in ("local", "ray"):
        with pytest.raises(PipelineError) as raised:
            ingest(DataParams(sources=["good.txt", "latin1.txt"], executor=executor, ray_address=ray_cluster),
                   tmp_path / executor)  # fmt: skip
        messages.append(str(raised.value))
    assert messages[0] == messages[1] and messages[0].startswith("latin1.txt:3: not valid UTF-8"), messages
    assert not (tmp_path / "ray").exists()  # nothing half-written is left
