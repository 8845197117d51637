"""How a record is framed with special tokens: the convention of the model family a tokenizer comes from.

GPT-2 ends each text with `<|endoftext|>`. The Chinese GPT-2s with a BERT WordPiece vocabulary have no such
token: uer/gpt2-chinese-* frame a text `[CLS] text [SEP]`, GPT2-Chinese `[MASK] text [CLS]`, GPT2-chitchat a
dialogue `[CLS] turn [SEP] turn [SEP]`. tokenize resolves `tokenizer.framing`, frames the blocks with it and
saves the tokenizer with the record's end marker as its eos_token (the generation stop token); train puts the
start marker in the model config's `prefix` (prepended to every prompt, by the pipeline's generation and by
transformers' text-generation pipeline alike) and the framing's name in the config, for the model card.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.plumbing.errors import PipelineError
from tasks.plumbing.params import FRAMING_CHOICES


@dataclass(frozen=True)
class Framing:
    name: str
    start: str | None  # the tokenizer's special token (attribute name) before each record; None: nothing
    end: str  # the one after each record: generation stops there
    turn: str  # the one between the turns of a dialogue record
    shown: str  # one record as it looks, for the logs and the model card
    family: str  # whose convention, for the model card


FRAMINGS = {
    framing.name: framing
    for framing in (
        Framing("eos", None, "eos_token", "sep_token", "text <|endoftext|>", "GPT-2's"),
        Framing("uer", "cls_token", "sep_token", "sep_token", "[CLS] text [SEP]", "uer's"),
        Framing("gpt2-chinese", "mask_token", "cls_token", "sep_token", "[MASK] text [CLS]", "GPT2-Chinese's"),
        Framing("chitchat", "cls_token", "sep_token", "sep_token", "[CLS] turn [SEP] turn [SEP]", "GPT2-chitchat's"),
    )
}
# Chinese, Japanese and Korean characters and their punctuation: no space goes before them when decoding.
CJK = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}\x{3000}-\x{303F}\x{FF00}-\x{FFEF}"


def resolve(setting: str, tokenizer, dialog: bool, source: str) -> Framing:
    """The framing `tokenizer.framing` names.

    Auto is eos when the tokenizer has an end-of-text token, else the uer convention ([CLS]/[SEP]; chitchat's for
    dialogue). Its tokens must be in the tokenizer."""
    if setting == "auto":
        if tokenizer.eos_token_id is not None:
            setting = "eos"
        elif tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None:
            setting = "chitchat" if dialog else "uer"
        else:
            raise PipelineError(
                f"tokenizer.framing: the tokenizer of {source!r} has no end-of-text token and no [CLS]/[SEP] to "
                f"frame records with; set tokenizer.framing to one of {', '.join(FRAMINGS)} that its tokens fit"
            )
    framing = FRAMINGS[setting]
    needed = [name for name in (framing.start, framing.end) if name]
    if framing.name != "eos" and dialog:
        needed.append(framing.turn)
    missing = [name for name in needed if getattr(tokenizer, f"{name}_id", None) is None]
    if missing:
        raise PipelineError(
            f"tokenizer.framing: {framing.name} ({framing.shown}) needs the tokenizer of {source!r} to have "
            f"{' and '.join(missing)}; it has not: choose another of {', '.join(FRAMING_CHOICES)}"
        )
    return framing


def apply(framing: Framing, tokenizer):
    """The tokenizer carrying the framing.

    Its eos_token is the record's end marker, its bos_token the start marker, and a WordPiece (BERT) vocabulary
    decodes Chinese without a space between characters."""
    if framing.name != "eos":
        markers = {"eos_token": getattr(tokenizer, framing.end)}
        if framing.start:
            markers["bos_token"] = getattr(tokenizer, framing.start)
        tokenizer.add_special_tokens(markers)
    return join_cjk(tokenizer)


def join_cjk(tokenizer):
    """BERT's WordPiece decoder puts a space before every token but `##` pieces.

    Keep it before Latin words and drop it before CJK characters and punctuation, so `床 前 明 月 光` decodes as
    `床前明月光`.

    transformers rebuilds a BertTokenizer's decoder from its class when it loads one: the tokenizer is saved
    as a plain fast tokenizer instead, whose tokenizer.json (with this decoder) is what loads, here and in the
    served model."""
    from tokenizers import Regex, decoders
    from transformers import PreTrainedTokenizerFast

    backend = tokenizer.backend_tokenizer
    if type(backend.decoder).__name__ != "WordPiece":
        return tokenizer
    backend.decoder = decoders.Sequence(
        [backend.decoder, decoders.Replace(Regex(f"^ (?=[{CJK}])"), "")]  # per token, before the next joins it
    )
    specials = {name: value for name, value in tokenizer.special_tokens_map.items() if isinstance(value, str)}
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **specials)


def prompt_prefix(model) -> str:
    """The start marker a prompt is framed with (the model config's prefix), or nothing."""
    return getattr(model.config, "prefix", None) or ""
