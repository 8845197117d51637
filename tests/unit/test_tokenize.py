"""The tokenize stage: a real byte-level BPE, blocks of block_size, bytes accounted exactly."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
from transformers import AutoTokenizer

from tasks.common import PipelineError
from tasks.params import ModelParams, TokenizerParams
from tasks.tokenize import span_lengths, tokenize


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
        for line in datasets.load_dataset("json", data_files=str(prepared / "validation.jsonl"))["train"]["text"]
    )
    covered = int(np.array(blocks["validation"]["token_bytes"]).sum())
    assert source_bytes - 32 * 4 < covered <= source_bytes
    assert not list(tmp_path.glob(".tokenize-*")), "the Arrow scratch cache is removed"


def test_a_corpus_smaller_than_one_block_is_refused(prepared, tmp_path):
    with pytest.raises(PipelineError, match=r"train.jsonl: fewer tokens than one block \(tokenizer.block_size="):
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
        (folder / f"{split}.jsonl").write_text((json.dumps(dialog, ensure_ascii=False) + "\n") * 4)
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
