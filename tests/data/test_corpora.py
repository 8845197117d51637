"""The bundled corpora load and split as the shipped params describe."""

from __future__ import annotations

import json
import unicodedata

import pytest

from tasks.ingest import ingest
from tasks.plumbing.params import load_params
from tasks.plumbing.paths import prepared_shards
from tests.helpers import ROOT


@pytest.fixture(autouse=True)
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # sources in params files are relative to the project root


def test_tinyshakespeare_splits_into_paragraphs(tmp_path):
    stats = ingest(load_params(ROOT / "params.yaml").data, tmp_path)
    total = stats["train"]["records"] + stats["validation"]["records"]
    assert 7000 < total < 7300  # speeches separated by blank lines, exact duplicates ("Exeunt.") dropped once
    assert 0.08 < stats["validation"]["records"] / total < 0.12
    assert stats["dropped"]["duplicate"] > 0
    first = json.loads((tmp_path / "train/00000.jsonl").open().readline())["text"]
    assert first.startswith("First Citizen:\n")


def test_tang_poems_join_title_and_lines(tmp_path):
    stats = ingest(load_params(ROOT / "params/tang-poetry.yaml").data, tmp_path)
    assert stats["train"]["records"] + stats["validation"]["records"] == 366 - stats["dropped"]["duplicate"]
    texts = [json.loads(line)["text"] for split in ("train", "validation")
             for shard in prepared_shards(split, tmp_path) for line in shard.open(encoding="utf-8")]
    poem = next(t for t in texts if t.startswith("在嶽詠蟬\n"))
    assert poem.splitlines()[1] == "西陸蟬聲唱，南冠客思侵。"
    assert all(unicodedata.is_normalized("NFC", t) for t in texts)
    assert stats["validation"]["bytes"] > 2 * stats["validation"]["chars"]  # CJK: three UTF-8 bytes a character
