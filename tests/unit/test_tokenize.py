"""The tokenize stage: a real byte-level BPE, blocks of block_size, bytes accounted exactly."""

from __future__ import annotations

import json
import os
import shutil

import datasets
import numpy as np
import pytest
from transformers import AutoTokenizer

from tasks.data.blocks import TokenSizes, encode_and_group, span_lengths
from tasks.data.tokenizer import train_bpe, train_char
from tasks.plumbing.errors import PipelineError
from tasks.plumbing.params import ModelParams, TokenizerParams
from tasks.tokenize import tokenize


@pytest.mark.parametrize("text", ["plain ascii text", "床前明月光，疑是地上霜。", "mixed 漢字 and 😀 emoji"])
def test_token_bytes_and_chars_sum_to_the_text(text):
    offsets = [(i, i + 1) for i in range(len(text))]
    token_bytes, token_chars = span_lengths(text, offsets)
    assert token_bytes.sum() == len(text.encode("utf-8")) and token_chars.sum() == len(text)
    # A character split over two tokens (both reporting its offsets) is counted once.
    split = [(0, 1), (0, 1)] + [(i, i + 1) for i in range(1, len(text))]
    assert [lengths.sum() for lengths in span_lengths(text, split)] == [len(text.encode("utf-8")), len(text)]


def test_tokenize_writes_a_loadable_tokenizer_and_blocks(prepared, tmp_path):
    stats = tokenize(
        TokenizerParams(vocab_size=400, block_size=32),
        ModelParams(),
        prepared,
        tmp_path / "tokenizer",
        tmp_path / "tokenized",
    )
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    assert len(tokenizer) == stats["vocab_size"] == 400
    assert tokenizer.eos_token == "<|endoftext|>"
    text = "床前明月光 and Shakespeare"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level: CJK round-trips
    blocks = datasets.load_from_disk(str(tmp_path / "tokenized"))
    assert set(blocks) == {"train", "validation"}
    ids = np.array(blocks["validation"]["input_ids"])
    assert ids.shape == (stats["validation_blocks"], 32) and ids.max() < 400
    assert (ids == tokenizer.eos_token_id).sum() > 0  # records are separated by end-of-text
    # Every byte of the validation text is in some block, bar the remainder dropped at the end.
    source_bytes = sum(
        len(line.encode()) + 1
        for line in datasets.load_dataset("json", data_files=str(prepared / "validation/00000.jsonl"))["train"]["text"]
    )
    covered = int(np.array(blocks["validation"]["token_bytes"]).sum())
    assert source_bytes - 32 * 4 < covered <= source_bytes
    assert sorted(path.name for path in tmp_path.iterdir()) == ["prepared", "tokenized", "tokenizer"]  # no scratch
    assert [path.name for path in (tmp_path / "tokenized/train").iterdir() if path.suffix == ".arrow"] == [
        "data-00000-of-00001.arrow"
    ]  # written once, straight into the output: no cache file beside it


def test_the_same_text_gives_byte_identical_blocks(prepared, tmp_path):
    # dvc.lock hashes the folder: any difference would make the train stage rerun on the same blocks. The
    # second run reads the same text rewritten later, as a rerun of ingest leaves it (datasets' own fingerprint
    # depends on the files' modification times).
    rewritten = shutil.copytree(prepared, tmp_path / "rewritten")
    for jsonl in rewritten.rglob("*.jsonl"):
        os.utime(jsonl, (jsonl.stat().st_atime, jsonl.stat().st_mtime + 60))
    for run, source in (("first", prepared), ("second", rewritten)):
        tokenize(TokenizerParams(vocab_size=400, block_size=32), ModelParams(), source,
                 tmp_path / run / "tokenizer", tmp_path / run / "tokenized")  # fmt: skip
    files = sorted(p.relative_to(tmp_path / "first") for p in (tmp_path / "first").rglob("*") if p.is_file())
    assert len(files) == 11  # dataset_dict.json, manifest.json, stats.json, 3 per split, 2 for the tokenizer
    for name in files:
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes(), name
    state = json.loads((tmp_path / "first/tokenized/train/state.json").read_text())
    validation = json.loads((tmp_path / "first/tokenized/validation/state.json").read_text())
    assert state["_fingerprint"] != validation["_fingerprint"]


def test_a_corpus_smaller_than_one_block_is_refused(prepared, tmp_path):
    with pytest.raises(PipelineError, match=r"prepared/train: fewer tokens than one block \(tokenizer.block_size="):
        tokenize(
            TokenizerParams(vocab_size=300, block_size=100000),
            ModelParams(),
            prepared,
            tmp_path / "tokenizer",
            tmp_path / "tokenized",
        )
    assert not (tmp_path / "tokenized").exists()


def test_char_tokenizer_one_token_a_character(prepared, tmp_path):
    stats = tokenize(
        TokenizerParams(kind="char", vocab_size=5000, min_frequency=2, block_size=32),
        ModelParams(),
        prepared,
        tmp_path / "tokenizer",
        tmp_path / "tokenized",
    )
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    assert len(tokenizer) == stats["vocab_size"] < 5000  # only characters seen at least twice
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["[UNK]", "<|endoftext|>", "[SEP]"]
    line = "明月光 and light"
    ids = tokenizer(line, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(line)
    assert tokenizer.decode(ids) == line
    assert tokenizer.convert_ids_to_tokens(tokenizer("𝔘")["input_ids"]) == ["[UNK]"]


def test_dialog_turns_are_joined_with_the_separator(tmp_path):
    folder = tmp_path / "prepared"
    folder.mkdir()
    dialog = {"text": "你好\n你好呀，吃了吗\n吃了", "turns": ["你好", "你好呀，吃了吗", "吃了"]}
    for split in ("train", "validation"):
        (folder / split).mkdir()
        (folder / split / "00000.jsonl").write_text((json.dumps(dialog, ensure_ascii=False) + "\n") * 4)
    counts = {"records": 4, "chars": 4 * len(dialog["text"]), "bytes": 4 * len(dialog["text"].encode())}
    (folder / "stats.json").write_text(json.dumps({"train": counts, "validation": counts}))  # as ingest writes it
    tokenize(
        TokenizerParams(kind="char", vocab_size=100, min_frequency=1, block_size=16),
        ModelParams(),
        folder,
        tmp_path / "tokenizer",
        tmp_path / "tokenized",
        dialog=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    blocks = datasets.load_from_disk(str(tmp_path / "tokenized"))["train"]
    stream = [i for block in blocks["input_ids"] for i in block]
    assert tokenizer.decode(stream[:14]) == "你好[SEP]你好呀，吃了吗[SEP]吃了<|endoftext|>"
    record_bytes = len("你好\n你好呀，吃了吗\n吃了\n".encode())
    assert sum(blocks["token_bytes"][0][:14]) == record_bytes
    assert sum(blocks["token_chars"][0][:14]) == len("你好\n你好呀，吃了吗\n吃了\n")


TRICKY = ["床前明月光，疑是地上霜。", "mixed 漢字 and 😀 emoji, é", "a literal <|endoftext|> and [SEP] in text", "  "]


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_batch_sizes_match_the_offsets_record_by_record(prepared, kind):
    """The vectorized sizes (a byte table for byte-level BPE, UTF-8 widths for char) equal the offsets' sums."""
    trainer = train_bpe if kind == "bpe" else train_char
    tokenizer = trainer([prepared / "train/00000.jsonl"], TokenizerParams(kind=kind, vocab_size=400, min_frequency=1))
    sizes = TokenSizes(tokenizer.backend_tokenizer)
    assert sizes.mode == {"bpe": "table", "char": "char"}[kind]
    offsets = TokenSizes.__new__(TokenSizes)
    offsets.mode = "offsets"
    for text in TRICKY:
        encodings = tokenizer.backend_tokenizer.encode_batch([text], add_special_tokens=False)
        ids = np.asarray(encodings[0].ids)
        fast, exact = sizes([text], encodings, ids), offsets([text], encodings, ids)
        assert [int(a.sum()) for a in fast] == [int(a.sum()) for a in exact] == [len(text.encode()), len(text)], text
        assert len(fast[0]) == len(ids)


def test_other_tokenizers_fall_back_to_offsets(prepared):
    """A normalizer changes the text the tokens stand for: only the offsets tell the original bytes."""
    from tokenizers import normalizers

    tokenizer = train_bpe([prepared / "train/00000.jsonl"], TokenizerParams(vocab_size=400, min_frequency=1))
    tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()
    assert TokenSizes(tokenizer.backend_tokenizer).mode == "offsets"
    blocks = encode_and_group({"text": ["ÉCOLE Été"] * 8}, tokenizer, 1)  # blocks of 1: nothing cut off
    assert int(blocks["token_bytes"].sum()) == len("ÉCOLE Été\n".encode()) * 8
    assert int(blocks["token_chars"].sum()) == len("ÉCOLE Été\n") * 8


def test_the_blocks_do_not_depend_on_where_the_shards_end(prepared, tmp_path, monkeypatch):
    """ingest's shard boundaries follow data.shard_mb: the same records cut into other shards, and encoded by two
    processes instead of one (batches found by reads of any size), give the same tokenizer and the same blocks,
    fingerprints included."""
    import shutil

    monkeypatch.setattr("tasks.tokenize.RECORD_BATCH", 16)  # many batches, so two processes share them
    recut = tmp_path / "recut"
    shutil.copytree(prepared, recut)
    for split in ("train", "validation"):
        lines = (prepared / split / "00000.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
        (recut / split / "00000.jsonl").write_text("".join(lines[:7]), encoding="utf-8")
        (recut / split / "00001.jsonl").write_text("".join(lines[7:100]), encoding="utf-8")
        (recut / split / "00002.jsonl").write_text("".join(lines[100:]), encoding="utf-8")
    for folder, name, processes, scan in ((prepared, "one", 1, 1 << 24), (recut, "three", 2, 7)):
        monkeypatch.setattr("tasks.tokenize.SCAN_BYTES", scan)  # line ends found across reads of 7 bytes
        tokenize(TokenizerParams(vocab_size=300, block_size=32), ModelParams(), folder,
                 tmp_path / name / "tokenizer", tmp_path / name / "tokenized", processes=processes)  # fmt: skip
    for split in ("train", "validation"):
        for name in ("data-00000-of-00001.arrow", "state.json"):
            one = (tmp_path / "one/tokenized" / split / name).read_bytes()
            assert one == (tmp_path / "three/tokenized" / split / name).read_bytes(), (split, name)


def test_the_blocks_go_into_arrow_files_of_bounded_size_that_read_as_one(prepared, tmp_path, monkeypatch):
    """A split of more than tokenize.SHARD_TOKENS tokens is several Arrow files (a manifest lists them with their
    blocks and tokens); load_from_disk reads them as the same blocks one file holds."""
    read = {}
    for name, shard_tokens in (("one", 10**8), ("many", 32 * 7)):
        monkeypatch.setattr("tasks.tokenize.SHARD_TOKENS", shard_tokens)
        stats = tokenize(TokenizerParams(vocab_size=300, block_size=32), ModelParams(), prepared,
                         tmp_path / name / "tokenizer", tmp_path / name / "tokenized")  # fmt: skip
        read[name] = datasets.load_from_disk(str(tmp_path / name / "tokenized"))
    manifest = json.loads((tmp_path / "many/tokenized/manifest.json").read_text())
    files = manifest["splits"]["train"]
    assert len(files) == -(-stats["train_blocks"] // 7) > 2 and all(entry["blocks"] == 7 for entry in files[:-1])
    assert sum(entry["tokens"] for entry in files) == stats["train_tokens"] and manifest["block_size"] == 32
    assert [(tmp_path / "many/tokenized" / entry["file"]).exists() for entry in files] == [True] * len(files)
    for split in ("train", "validation"):
        for column in ("input_ids", "token_bytes", "token_chars"):
            assert read["many"][split][column] == read["one"][split][column], (split, column)


# The stage in a process of its own, counting the threads its run leaves: the tokenizers library's thread pool
# (rayon) is started by its first parallel call and sized then, once per process.
THREADS_STARTED = (
    "import os; from tasks import tokenize as stage; before = len(os.listdir('/proc/self/task')); stage.main(); "
    "print('threads started:', len(os.listdir('/proc/self/task')) - before)"
)


def test_data_workers_is_a_budget_of_cores_for_the_tokenizers_threads_too(prepared, tmp_path):
    """data.workers: 1 is one core, as for ingest: the stage holds the tokenizers library's thread pool (rayon,
    which BPE training and batch encoding use) to data.workers threads, whatever RAYON_NUM_THREADS a shell exported:
    the same threads with 8 exported as with 1, and fewer than 8."""
    import subprocess
    import sys

    shutil.copytree(prepared, tmp_path / "data/prepared")
    (tmp_path / "params.yaml").write_text("data: {workers: 1}\ntokenizer: {vocab_size: 300, block_size: 32}\n")
    started = {}
    for exported in ("1", "8"):
        env = {**os.environ, "RAYON_NUM_THREADS": exported}
        run = subprocess.run([sys.executable, "-c", THREADS_STARTED], cwd=tmp_path, env=env, capture_output=True,
                             text=True, check=False)  # fmt: skip
        assert run.returncode == 0 and "tokenize: vocabulary 300" in run.stdout, run.stderr[-2000:]
        started[exported] = int(run.stdout.split("threads started:")[1])
    assert started["8"] == started["1"] < 8, started
