"""The tokenize stage's tokenizer: a byte-level BPE (GPT-2's scheme) or a character vocabulary (GPT2-Chinese's)
trained on the train split, or the pretrained model's own, each carrying the framing of its records."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from tasks.data import framing
from tasks.plumbing.errors import PipelineError
from tasks.tracking.loading import load_tokenizer
from tasks.plumbing.params import CHAR_SPECIALS, ModelParams, TokenizerParams
from tasks.plumbing.specials import EOS, SEP, UNK

CHAR_PATTERN = r"[\s\S]"  # the char tokenizer's pre-tokenizer: every character on its own


def _train_texts(shards: list[Path]) -> Iterator[str]:
    for shard in shards:
        with shard.open(encoding="utf-8") as handle:
            for line in handle:
                yield json.loads(line)["text"]


def train_bpe(train_shards: list[Path], params: TokenizerParams):
    """A byte-level BPE (GPT-2's scheme) trained on the train split, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=params.vocab_size,
        min_frequency=params.min_frequency,
        special_tokens=[EOS, SEP],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_train_texts(train_shards), trainer=trainer)
    return _wrap(bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS, sep_token=SEP)


def train_char(train_shards: list[Path], params: TokenizerParams):
    """A character-level vocabulary (GPT2-Chinese's scheme).

    Every character seen at least min_frequency times, the most frequent first up to vocab_size, the rest [UNK]."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    counts: Counter[str] = Counter()
    for text in _train_texts(train_shards):
        counts.update(text)
    room = params.vocab_size - len(CHAR_SPECIALS)
    kept = [char for char, count in counts.most_common(room) if count >= params.min_frequency]
    vocab = {token: index for index, token in enumerate([*CHAR_SPECIALS, *kept])}
    chars = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    chars.pre_tokenizer = pre_tokenizers.Split(Regex(CHAR_PATTERN), behavior="isolated")  # one token a character
    chars.decoder = decoders.Fuse()  # characters join with nothing between them
    return _wrap(chars, bos_token=EOS, eos_token=EOS, unk_token=UNK, sep_token=SEP)


def _wrap(trained, **special_tokens):
    """A trained `tokenizers` object as a transformers tokenizer, its vocabulary checked."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=trained, clean_up_tokenization_spaces=False, **special_tokens)
    # transformers 5 builds an empty tokenizer on some paths without complaint: check the vocabulary came along.
    if len(tokenizer) != trained.get_vocab_size() or len(tokenizer) <= len(special_tokens):
        raise PipelineError(
            f"tokenizer has {len(tokenizer)} tokens after training, expected {trained.get_vocab_size()}"
        )
    return tokenizer


def load_pretrained_tokenizer(name_or_path: str, dialog: bool, framing_setting: str):
    """The tokenizer of model.name_or_path, carrying its model family's framing.

    The tokenizer of model.name_or_path (a hub id, a local folder or an MLflow model URI), carrying the framing of
    its model family (tasks/data/framing.py).

    Dialogue data framed GPT-2's way needs a separator: one is added when the tokenizer has none (train then
    resizes embeddings).
    """
    tokenizer = load_tokenizer(name_or_path)
    chosen = framing.resolve(framing_setting, tokenizer, dialog, name_or_path)
    if chosen.name == "eos" and dialog and tokenizer.sep_token_id is None:
        tokenizer.add_special_tokens({"sep_token": SEP})
        print(f"tokenize: added the separator {SEP} to the tokenizer of {name_or_path} for dialogue turns")
    return framing.apply(chosen, tokenizer), chosen


def build_tokenizer(params: TokenizerParams, model_params: ModelParams, train_shards: list[Path], dialog: bool):
    """(tokenizer, framing): a bpe or char tokenizer trained on the train split, or the pretrained model's."""
    if params.kind == "pretrained":
        return load_pretrained_tokenizer(model_params.name_or_path, dialog, params.framing)
    tokenizer = train_bpe(train_shards, params) if params.kind == "bpe" else train_char(train_shards, params)
    return tokenizer, framing.resolve(params.framing, tokenizer, dialog, f"the trained {params.kind} tokenizer")
