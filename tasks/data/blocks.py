"""Records into training blocks (run_clm's group_texts).

Encoded in batches, framed, concatenated and cut into block_size rows, with the UTF-8 bytes and characters each
token stands for (bits per byte needs them)."""

from __future__ import annotations

import itertools
import json

import numpy as np

from tasks.data.tokenizer import CHAR_PATTERN


def span_lengths(text: str, offsets: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 bytes and characters each token accounts for, so that a record's tokens sum to its text.

    Byte-level BPE can split one character over two tokens (both then report its offsets); taking the
    running maximum of the end offsets gives each character, and its bytes, to exactly one token.
    """
    ends = np.maximum.accumulate(np.fromiter((end for _, end in offsets), dtype=np.int64, count=len(offsets)))
    chars = np.diff(ends, prepend=0)
    if text.isascii():
        return chars, chars
    return np.diff(np.concatenate([[0], np.cumsum(utf8_widths(text))])[ends], prepend=0), chars


def utf8_widths(text: str) -> np.ndarray:
    """The UTF-8 length of each character of text."""
    codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return 1 + (codepoints >= 0x80) + (codepoints >= 0x800) + (codepoints >= 0x10000)


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE writes byte b as one printable character; this maps each back to its byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = (b for b in range(256) if b not in printable)
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(shifted)}


class TokenSizes:
    """Bytes and characters per token for a whole batch at once, the same sums as span_lengths.

    Offsets cost a Python tuple per token, several times the encoding itself; the two tokenizers this pipeline
    trains need none: a byte-level BPE token always stands for the same bytes (a table by id, each character
    counted where its first byte is), and a char token is one character of the text. Any other tokenizer
    (a normalizer, a prefix space, another model) goes through the offsets.
    """

    def __init__(self, backend):
        spec = json.loads(backend.to_str())
        pre, plain = spec.get("pre_tokenizer") or {}, spec.get("normalizer") is None
        self.mode = "offsets"
        if plain and pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space"):
            try:
                self.bytes, self.chars = self._byte_level_table(backend)
                self.mode = "table"
            except KeyError:  # a vocabulary entry outside the byte alphabet: not GPT-2's scheme after all
                pass
        elif plain and spec["model"]["type"] == "WordLevel" and pre.get("pattern") == {"Regex": CHAR_PATTERN}:
            self.mode = "char"

    @staticmethod
    def _byte_level_table(backend) -> tuple[np.ndarray, np.ndarray]:
        alphabet = byte_level_alphabet()
        added = {index: token.content for index, token in backend.get_added_tokens_decoder().items()}
        vocab = backend.get_vocab(with_added_tokens=True)
        sizes = np.zeros((2, max(vocab.values()) + 1), dtype=np.uint16)
        for token, index in vocab.items():
            raw = added[index].encode("utf-8") if index in added else bytes(alphabet[char] for char in token)
            sizes[:, index] = len(raw), sum(1 for byte in raw if byte & 0xC0 != 0x80)  # non-continuation bytes
        return sizes[0], sizes[1]

    def __call__(self, texts: list[str], encodings, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.mode == "table":
            return self.bytes[ids], self.chars[ids]
        joined = "".join(texts) if self.mode == "char" else ""
        if len(joined) == len(ids):  # else a special token's text stood in a record as several characters
            return utf8_widths(joined).astype(np.uint16), np.ones(len(joined), dtype=np.uint16)
        pairs = [span_lengths(text, encoding.offsets) for text, encoding in zip(texts, encodings, strict=True)]
        return tuple(np.concatenate([pair[unit] for pair in pairs] or [[]]).astype(np.uint16) for unit in (0, 1))


def encode_and_group(
    batch: dict[str, list], tokenizer, block_size: int, sizes: TokenSizes | None = None, start_id: int | None = None
) -> dict[str, np.ndarray]:
    """Tokenize records, frame each, concatenate and cut into blocks (run_clm's group_texts).

    A record ends with the tokenizer's eos_token (the framing's end marker, tasks/data/framing.py); a dialogue
    record's turns are joined with the separator token; `start_id`, when given, goes before each record. End
    and separator count as one byte and character each: they stand for the newline between records and between
    turns; the start marker stands for nothing. Pass `sizes` when calling batch after batch: building it walks
    the whole vocabulary.
    """
    records = batch["turns"] if "turns" in batch else [[text] for text in batch["text"]]
    turns = [turn for record in records for turn in record]
    sizes = sizes or TokenSizes(tokenizer.backend_tokenizer)
    encodings = tokenizer.backend_tokenizer.encode_batch(turns, add_special_tokens=False)
    lengths = np.fromiter((len(encoding.ids) for encoding in encodings), dtype=np.int64, count=len(encodings))
    ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int32, count=lengths.sum())
    token_bytes, token_chars = sizes(turns, encodings, ids)
    # After each turn: the separator, or the end marker after a record's last turn (1 byte, 1 character each).
    turns_per_record = np.array([len(record) for record in records], dtype=np.int64)
    last = np.zeros(len(turns), dtype=bool)
    last[np.cumsum(turns_per_record) - 1] = True
    ends = np.where(last, tokenizer.eos_token_id, tokenizer.sep_token_id if not last.all() else 0)
    at = np.cumsum(lengths)
    ids = np.insert(ids, at, ends.astype(np.int32))
    token_bytes, token_chars = np.insert(token_bytes, at, 1), np.insert(token_chars, at, 1)
    if start_id is not None:  # before each record, in the stream that now has its turns' end markers
        record_lengths = np.add.reduceat(lengths + 1, np.cumsum(turns_per_record) - turns_per_record)
        starts = np.cumsum(record_lengths) - record_lengths
        ids = np.insert(ids, starts, np.int32(start_id))
        token_bytes, token_chars = np.insert(token_bytes, starts, 0), np.insert(token_chars, starts, 0)
    usable = len(ids) // block_size * block_size
    return {
        "input_ids": ids[:usable].reshape(-1, block_size),
        "token_bytes": token_bytes.astype(np.uint16)[:usable].reshape(-1, block_size),
        "token_chars": token_chars.astype(np.uint16)[:usable].reshape(-1, block_size),
    }
