"""Framing records the way each GPT-2 family does, counting bytes for a BERT vocabulary, and decoding Chinese."""

from __future__ import annotations

import numpy as np
import pytest

from examples.bert_gpt2 import bert_tokenizer
from tasks.data import framing
from tasks.data.blocks import TokenSizes, encode_and_group
from tasks.plumbing.errors import PipelineError
from tasks.plumbing.params import FRAMING_CHOICES
from tests.reliability.test_security import char_tokenizer

WORDS = ["床", "前", "明", "月", "光", "，", "hello", "world", "py", "##thon", "!"]


@pytest.fixture
def bert(tmp_path):
    return bert_tokenizer(tmp_path / "bert", WORDS)


def test_params_name_the_framings_defined():
    assert ("auto", *framing.FRAMINGS) == FRAMING_CHOICES


def test_auto_takes_end_of_text_then_cls_and_sep(bert):
    assert framing.resolve("auto", char_tokenizer(10), dialog=False, source="x").name == "eos"
    assert framing.resolve("auto", bert, dialog=False, source="x").name == "uer"
    assert framing.resolve("auto", bert, dialog=True, source="x").name == "chitchat"
    assert framing.resolve("gpt2-chinese", bert, dialog=False, source="x").shown == "[MASK] text [CLS]"


def test_a_tokenizer_that_fits_no_framing_names_the_choices(bert):
    with pytest.raises(PipelineError, match=r"needs the tokenizer of 'gpt2' to have cls_token and sep_token"):
        framing.resolve("uer", char_tokenizer(10), dialog=False, source="gpt2")
    plain = char_tokenizer(10)
    plain.eos_token = None
    with pytest.raises(
        PipelineError,
        match=r"no end-of-text token and no \[CLS\]/\[SEP\] to frame records with; set tokenizer.framing to",
    ):
        framing.resolve("auto", plain, dialog=False, source="x")


def test_uer_framing_counts_each_wordpiece_s_bytes_by_hand(bert):
    chosen = framing.resolve("auto", bert, dialog=False, source="x")
    bert = framing.apply(chosen, bert)
    ids = {token: bert.convert_tokens_to_ids(token) for token in [*WORDS, "[CLS]", "[SEP]", "[UNK]"]}
    batch = {"text": ["床前明月光，python!", "hello 霜 world"]}
    start = bert.convert_tokens_to_ids(bert.bos_token)
    out = encode_and_group(batch, bert, block_size=16, sizes=TokenSizes(bert.backend_tokenizer), start_id=start)
    # Two records, 16 tokens: one block.
    tokens = ["[CLS]", "床", "前", "明", "月", "光", "，", "py", "##thon", "!", "[SEP]",
              "[CLS]", "hello", "[UNK]", "world", "[SEP]"]  # fmt: skip
    assert out["input_ids"].tolist() == [[ids[token] for token in tokens]]
    # UTF-8 bytes: 3 a Chinese character or full-width comma; "py" 2, "##thon" 4; the space before "霜" and
    # "world" goes with them; [UNK] stands for 霜; the end marker for the newline; [CLS] for nothing.
    assert out["token_bytes"].tolist() == [[0, 3, 3, 3, 3, 3, 3, 2, 4, 1, 1, 0, 5, 4, 6, 1]]
    assert out["token_chars"].tolist() == [[0, 1, 1, 1, 1, 1, 1, 2, 4, 1, 1, 0, 5, 2, 6, 1]]
    text_bytes = sum(len(text.encode()) for text in batch["text"])
    assert int(np.sum(out["token_bytes"])) == text_bytes + 2  # every byte once, and one newline a record


def test_gpt2_chinese_framing_marks_with_mask_and_cls(bert):
    chosen = framing.resolve("gpt2-chinese", bert, dialog=False, source="x")
    bert = framing.apply(chosen, bert)
    out = encode_and_group({"text": ["明月", "光"]}, bert, 6, start_id=bert.convert_tokens_to_ids(bert.bos_token))
    assert bert.convert_ids_to_tokens(out["input_ids"][0].tolist()) == ["[MASK]", "明", "月", "[CLS]", "[MASK]", "光"]


def test_chitchat_joins_turns_with_sep(bert):
    bert = framing.apply(framing.resolve("auto", bert, dialog=True, source="x"), bert)
    out = encode_and_group({"turns": [["明月", "光"]]}, bert, 6, start_id=bert.convert_tokens_to_ids(bert.bos_token))
    assert bert.convert_ids_to_tokens(out["input_ids"][0].tolist()) == ["[CLS]", "明", "月", "[SEP]", "光", "[SEP]"]


def test_chinese_decodes_without_spaces_and_english_words_stay_apart(bert, tmp_path):
    before = bert.decode(bert("床前明月光，hello world python!", add_special_tokens=False)["input_ids"])
    assert before.startswith("床 前 明")  # BERT's own decoder: a space before every token
    bert = framing.apply(framing.resolve("auto", bert, dialog=False, source="x"), bert)
    bert.save_pretrained(tmp_path / "saved")  # the decoder travels with the tokenizer, to the served model too
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(tmp_path / "saved")
    ids = saved("[CLS]床前明月光，hello world python![SEP]", add_special_tokens=False)["input_ids"]
    # No space before a Chinese character or full-width mark; Latin words keep theirs, as mixed text is written.
    assert saved.decode(ids, skip_special_tokens=True) == "床前明月光， hello world python!"
    assert saved.eos_token == "[SEP]" and saved.bos_token == "[CLS]"
