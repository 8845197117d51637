"""Build, offline, a Chinese GPT-2 shaped like uer/gpt2-chinese-*: a BERT WordPiece vocabulary (vocab.txt, the
special tokens [PAD] [UNK] [CLS] [SEP] [MASK], then every character of the bundled Tang poems) and a
config-initialized GPT2LMHeadModel of that size, saved together as a from_pretrained folder. uer's own
config names GPT-2's end-of-text id 50256, outside its vocabulary: so does this one.

For trying the pipeline's Chinese fine-tuning where the model hub is out of reach (README, "Fine-tuning a
Chinese GPT-2"). Weights as model.safetensors, or as pytorch_model.bin (`--weights bin`) as many ship.
Run: .venv/bin/python examples/bert_gpt2.py FOLDER [--weights bin] [--layers 4 --width 128]
(the shape of params/tang-poetry.yaml's model: 4 layers, 4 heads, 128 wide, 128 positions)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def bert_tokenizer(folder: Path, tokens: list[str]):
    """A BERT WordPiece tokenizer of the specials and `tokens`, saved in folder.

    transformers 5 builds a 5-token tokenizer from BertTokenizerFast(vocab_file=...) without complaint: the
    WordPiece model comes from `tokenizers` instead, and its size is checked."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join([*BERT_SPECIALS, *tokens]) + "\n", encoding="utf-8")
    wordpiece = BertWordPieceTokenizer(str(folder / "vocab.txt"), lowercase=True)
    tokenizer = BertTokenizerFast(tokenizer_object=wordpiece._tokenizer)
    if len(tokenizer) != len(BERT_SPECIALS) + len(tokens):
        raise SystemExit(
            f"error: the tokenizer has {len(tokenizer)} tokens, expected {len(BERT_SPECIALS) + len(tokens)}"
        )
    tokenizer.save_pretrained(folder)
    return tokenizer


def bert_gpt2(folder: Path, weights: str = "safetensors", layers: int = 4, width: int = 128) -> Path:
    """The tokenizer above over the Tang poems' characters and a GPT-2 of its size, in folder."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    poems = json.loads((ROOT / "data/samples/tang300.json").read_text(encoding="utf-8"))
    chars = sorted({char for poem in poems for line in [poem["title"], *poem["paragraphs"]] for char in line})
    tokenizer = bert_tokenizer(folder, [char for char in chars if not char.isspace()] + ["hello", "##s"])
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=layers, n_head=4, n_embd=width, n_positions=128)
    model = GPT2LMHeadModel(config)
    if weights == "bin":
        config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    else:
        model.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--weights", choices=("safetensors", "bin"), default="safetensors")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    args = parser.parse_args()
    bert_gpt2(args.folder, args.weights, args.layers, args.width)
    print(f"{args.folder}: a uer-style Chinese GPT-2 ({args.weights}), ready for model.name_or_path")


if __name__ == "__main__":
    main()
