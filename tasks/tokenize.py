"""Stage `tokenize`: train (or load) the tokenizer, then cut both splits into block_size blocks.

Writes models/tokenizer/ (loadable by AutoTokenizer.from_pretrained) and data/tokenized/ (a DatasetDict with
`train` and `validation`, columns `input_ids`, `token_bytes` and `token_chars`, in the layout of datasets'
save_to_disk: datasets.load_from_disk reads it). The blocks are written once, batch by batch, straight into the
new output folder: no Arrow cache, no copy.
Run: python -m tasks.tokenize
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tasks import framing
from tasks.errors import PipelineError
from tasks.loading import load_tokenizer
from tasks.outputs import atomic_outputs, hash_file, read_json
from tasks.params import CHAR_SPECIALS, ModelParams, TokenizerParams, load_params
from tasks.paths import DATA_STATS, FRAMING_FIGURE, INGEST_STATS, PREPARED_DIR, SPLITS, TOKENIZED_DIR, TOKENIZER_DIR
from tasks.specials import EOS, SEP, UNK
from tasks.stage import run_cli

CHAR_PATTERN = r"[\s\S]"  # the char tokenizer's pre-tokenizer: every character on its own
RECORD_BATCH = 1000  # records encoded at a time; each batch's last block_size-1 tokens at most are dropped


def _train_texts(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            yield json.loads(line)["text"]


def train_bpe(train_path: Path, params: TokenizerParams):
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
    bpe.train_from_iterator(_train_texts(train_path), trainer=trainer)
    return _wrap(bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS, sep_token=SEP)


def train_char(train_path: Path, params: TokenizerParams):
    """A character-level vocabulary (GPT2-Chinese's scheme): every character seen at least min_frequency times,
    the most frequent first up to vocab_size, the rest [UNK]."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    counts: Counter[str] = Counter()
    for text in _train_texts(train_path):
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
    """The tokenizer of model.name_or_path (a hub id, a local folder or an MLflow model URI), carrying the
    framing of its model family (tasks/framing.py).

    Dialogue data framed GPT-2's way needs a separator: one is added when the tokenizer has none (train then
    resizes embeddings).
    """
    tokenizer = load_tokenizer(name_or_path)
    chosen = framing.resolve(framing_setting, tokenizer, dialog, name_or_path)
    if chosen.name == "eos" and dialog and tokenizer.sep_token_id is None:
        tokenizer.add_special_tokens({"sep_token": SEP})
        print(f"tokenize: added the separator {SEP} to the tokenizer of {name_or_path} for dialogue turns")
    return framing.apply(chosen, tokenizer), chosen


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

    A record ends with the tokenizer's eos_token (the framing's end marker, tasks/framing.py); a dialogue
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


def build_tokenizer(params: TokenizerParams, model_params: ModelParams, train_path: Path, dialog: bool):
    """(tokenizer, framing): a bpe or char tokenizer trained on the train split, or the pretrained model's."""
    if params.kind == "pretrained":
        return load_pretrained_tokenizer(model_params.name_or_path, dialog, params.framing)
    tokenizer = train_bpe(train_path, params) if params.kind == "bpe" else train_char(train_path, params)
    return tokenizer, framing.resolve(params.framing, tokenizer, dialog, f"the trained {params.kind} tokenizer")


def blocks_fingerprint(prepared_file: Path, tokenizer, block_size: int) -> str:
    """The fingerprint saved with a split's blocks, from what makes them: its text, the tokenizer, block_size.

    Left to itself, datasets derives it from the data files' modification times, new whenever ingest reruns
    or the project is cloned: the saved folder's hash in dvc.lock would change and rerun training on
    identical blocks.
    """
    digest = hashlib.sha256()
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(f"block_size={block_size}".encode())
    hash_file(digest, prepared_file)
    return digest.hexdigest()[:16]


def _record_batches(path: Path, size: int) -> Iterator[dict[str, list]]:
    """A prepared split's records, `size` at a time, as columns: {"text": [...]} (and "turns" for dialogues)."""
    with path.open(encoding="utf-8") as handle:
        while lines := list(itertools.islice(handle, size)):
            records = [json.loads(line) for line in lines]
            yield {key: [record[key] for record in records] for key in records[0]}


def _blocks_table(blocks: dict[str, np.ndarray]):
    """encode_and_group's arrays as an Arrow table of list<int32>/list<uint16> columns, without a copy per row."""
    import pyarrow as pa

    rows, width = blocks["input_ids"].shape
    offsets = pa.array(np.arange(0, (rows + 1) * width, width, dtype=np.int32))
    columns = {name: pa.ListArray.from_arrays(offsets, pa.array(array.ravel())) for name, array in blocks.items()}
    return pa.table(columns)


def write_split(prepared_file: Path, folder: Path, encode, fingerprint: str) -> int:
    """Encode a split batch by batch and write its blocks once, straight into `folder` in the layout of
    datasets' save_to_disk (one Arrow file, state.json, dataset_info.json); returns the number of blocks."""
    from dataclasses import asdict

    import datasets
    from datasets.arrow_writer import ArrowWriter

    folder.mkdir(parents=True)
    arrow = folder / "data-00000-of-00001.arrow"
    with ArrowWriter(features=block_features(), path=str(arrow)) as writer:
        for batch in _record_batches(prepared_file, RECORD_BATCH):
            writer.write_table(_blocks_table(encode(batch)))
        count, _ = writer.finalize()
    dataset = datasets.Dataset.from_file(str(arrow))  # memory-mapped: read for its state, not copied
    state = {key: dataset.__dict__[key] for key in ("_format_columns", "_format_kwargs", "_format_type")}
    state |= {"_fingerprint": fingerprint, "_output_all_columns": False, "_split": prepared_file.stem}
    state["_data_files"] = [{"filename": arrow.name}]
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
    info = asdict(dataset.info)
    (folder / "dataset_info.json").write_text(
        json.dumps({k: info[k] for k in sorted(info)}, indent=2), encoding="utf-8"
    )
    return count


def block_features():
    """The blocks' columns as datasets types them (list<int32>, list<uint16>)."""
    import datasets

    return datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "token_bytes": datasets.Sequence(datasets.Value("uint16")),
            "token_chars": datasets.Sequence(datasets.Value("uint16")),
        }
    )


def tokenize(
    tokenizer_params: TokenizerParams,
    model_params: ModelParams,
    prepared_dir: Path = PREPARED_DIR,
    tokenizer_dir: Path = TOKENIZER_DIR,
    tokenized_dir: Path = TOKENIZED_DIR,
    dialog: bool = False,
) -> dict[str, Any]:
    """Build the tokenizer and the block datasets (read back with datasets.load_from_disk); returns blocks and
    tokens per split."""
    for split in SPLITS:
        if not (prepared_dir / f"{split}.jsonl").exists():
            raise PipelineError(f"{prepared_dir / f'{split}.jsonl'}: not found; run the ingest stage first (dvc repro)")
    tokenizer, chosen = build_tokenizer(tokenizer_params, model_params, prepared_dir / "train.jsonl", dialog)
    start_id = tokenizer.convert_tokens_to_ids(getattr(tokenizer, chosen.start)) if chosen.start else None
    block_size = tokenizer_params.block_size
    sizes = TokenSizes(tokenizer.backend_tokenizer)

    def encode(batch: dict[str, list]) -> dict[str, np.ndarray]:
        return encode_and_group(batch, tokenizer, block_size, sizes, start_id)

    stats: dict[str, Any] = {"vocab_size": len(tokenizer), "block_size": block_size}
    # Both outputs are written in place of a scratch copy and swapped in together: a stop in between never pairs
    # the new blocks with the old tokenizer, and a failure leaves the previous outputs as they were.
    with atomic_outputs(tokenized_dir, tokenizer_dir) as (blocks_tmp, tokenizer_tmp):
        for split in SPLITS:
            prepared_file = prepared_dir / f"{split}.jsonl"
            fingerprint = blocks_fingerprint(prepared_file, tokenizer, block_size)
            blocks = write_split(prepared_file, blocks_tmp / split, encode, fingerprint)
            if blocks == 0:
                raise PipelineError(
                    f"{prepared_file}: fewer tokens than one block (tokenizer.block_size={block_size}); add text or "
                    "lower block_size"
                )
            stats[f"{split}_blocks"], stats[f"{split}_tokens"] = blocks, blocks * block_size
        (blocks_tmp / "dataset_dict.json").write_text(json.dumps({"splits": list(SPLITS)}), encoding="utf-8")
        figures = data_figures(read_json(prepared_dir / INGEST_STATS.name, "ingest"), stats)
        figures[FRAMING_FIGURE] = chosen.name  # for train (the model's prompt prefix), the run and the card
        stats["framing"] = f"{chosen.name} ({chosen.shown})"
        (blocks_tmp / DATA_STATS.name).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
        tokenizer.save_pretrained(str(tokenizer_tmp))
    return stats


def data_figures(ingest_stats: dict[str, Any], tokenize_stats: dict[str, Any]) -> dict[str, float]:
    """The ingest and tokenize figures as MLflow metrics (ingest/train_records, tokenize/vocab_size, ...), kept
    with the blocks in data/tokenized/stats.json: the training run logs them, wherever and whenever it runs."""
    figures = {
        f"ingest/{split}_{key}": ingest_stats[split][key] for split in SPLITS for key in ("records", "chars", "bytes")
    }
    figures.update({f"tokenize/{key}": value for key, value in tokenize_stats.items()})
    return figures


def main() -> None:
    params = load_params()
    stats = tokenize(params.tokenizer, params.model, dialog=params.data.format == "dialog")
    print(
        f"tokenize: vocabulary {stats['vocab_size']}, {stats['train_blocks']} train / "
        f"{stats['validation_blocks']} validation blocks of {stats['block_size']}, framing {stats['framing']} "
        f"-> {TOKENIZED_DIR}"
    )


if __name__ == "__main__":
    run_cli(main)
