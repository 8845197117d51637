"""The special tokens of the tokenizers the pipeline trains."""

from __future__ import annotations

# Special tokens of the tokenizers the pipeline trains: end of text after every record, a separator between
# dialogue turns (as GPT2-chitchat does), unknown for characters below the char tokenizer's min_frequency.
EOS, SEP, UNK = "<|endoftext|>", "[SEP]", "[UNK]"
