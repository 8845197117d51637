"""Stage `evaluate`: validation perplexity and bits per byte of the trained model.

Perplexity is exp(total NLL / total predicted tokens) over every block of the validation split, never a mean
of batch means; bits per byte divides the same NLL (in bits) by the UTF-8 bytes of the predicted tokens, so
models with different tokenizers compare. Writes metrics/eval.json.
Run: python -m tasks.evaluate
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tasks import tracking
from tasks.common import PipelineError, run_cli, write_json
from tasks.params import load_params
from tasks.tokenize import TOKENIZED_DIR
from tasks.train import MODEL_DIR, resolve_device

METRICS_FILE = Path("metrics/eval.json")


@dataclass
class Score:
    """Sums over a split: enough to combine any number of batches exactly."""

    nll: float = 0.0  # natural-log negative log-likelihood, summed over predicted tokens
    tokens: int = 0
    bytes: int = 0

    def metrics(self) -> dict[str, float]:
        loss = self.nll / self.tokens
        return {
            "eval_loss": loss,
            "perplexity": math.exp(loss),
            "bits_per_byte": self.nll / math.log(2) / self.bytes,
            "eval_tokens": self.tokens,
            "eval_bytes": self.bytes,
        }


def score_blocks(model, blocks, batch_size: int, device: str) -> Score:
    """Sum the NLL of every token after the first of each block; logits live one batch at a time."""
    model.to(device).eval()
    score = Score()
    with torch.inference_mode():
        for start in range(0, len(blocks), batch_size):
            batch = blocks[start : start + batch_size]
            ids = batch["input_ids"].to(device).long()
            logits = model(input_ids=ids).logits[:, :-1].float()
            nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="sum")
            score.nll += nll.item()
            score.tokens += ids[:, 1:].numel()
            score.bytes += int(batch["token_bytes"][:, 1:].sum())
    return score


def load_validation(tokenized_dir: Path = TOKENIZED_DIR):
    import datasets

    if not (tokenized_dir / "dataset_dict.json").exists():
        raise PipelineError(f"{tokenized_dir}: not found; run the tokenize stage first (dvc repro)")
    return datasets.load_from_disk(str(tokenized_dir))["validation"].with_format("torch")


def evaluate(
    model_dir: Path = MODEL_DIR, tokenized_dir: Path = TOKENIZED_DIR, batch_size: int = 16, device: str = "auto"
) -> dict[str, Any]:
    """Score the saved model on the validation blocks."""
    from transformers import GPT2LMHeadModel

    if not (model_dir / "config.json").exists():
        raise PipelineError(f"{model_dir}: no model there; run the train stage first (dvc repro)")
    model = GPT2LMHeadModel.from_pretrained(str(model_dir), use_safetensors=True)
    return score_blocks(model, load_validation(tokenized_dir), batch_size, resolve_device(device)).metrics()


def main() -> None:
    params = load_params()
    run_id = tracking.pipeline_run(params)
    metrics = evaluate(batch_size=params.evaluate.batch_size, device=params.train.device)
    write_json(METRICS_FILE, metrics)
    tracking.log_metrics(run_id, {f"eval/{key}": value for key, value in metrics.items()})
    print(
        f"evaluate: perplexity {metrics['perplexity']:.2f}, bits/byte {metrics['bits_per_byte']:.4f} "
        f"over {metrics['eval_tokens']} tokens -> {METRICS_FILE}"
    )


if __name__ == "__main__":
    run_cli(main)
