"""Stage `evaluate`: validation perplexity and bits per byte of the trained model, and its benchmark tasks.

Perplexity is exp(total NLL / total predicted tokens) over the whole validation split, never a mean of
batch means, scored in windows of block_size tokens that advance by evaluate.stride (each token scored
once). Bits per byte divides the same NLL (in bits) by the UTF-8 bytes of the predicted tokens, so models
with different tokenizers compare. The tasks evaluate.tasks lists (hellaswag, xcopa_zh, ...) are scored by
lm-evaluation-harness (tasks/evaluation/harness.py), first, so a task without its data stops the stage before the
rest. Writes metrics/eval.json and reports/samples.json; logs both to the model's MLflow run (recorded in
models/gpt2), each evaluation one more step of eval/*.
Run: python -m tasks.evaluate
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tasks.data.framing import prompt_prefix
from tasks.evaluation import harness
from tasks.plumbing.errors import PipelineError
from tasks.plumbing.outputs import atomic_output, read_json, write_json
from tasks.plumbing.params import GenerationParams, load_params
from tasks.plumbing.paths import BENCHMARKS_PLOT, DATA_STATS, EVAL_METRICS, MODEL_DIR, SAMPLES_FILE, TOKENIZED_DIR
from tasks.plumbing.stage import run_cli
from tasks.tracking import inputs, mlflow_runs, store
from tasks.tracking.loading import load_pretrained, resolve_device

COLUMNS = ("input_ids", "token_bytes", "token_chars")


@dataclass
class Score:
    """Sums over a split: enough to combine any number of batches exactly."""

    nll: float = 0.0  # natural-log negative log-likelihood, summed over predicted tokens
    tokens: int = 0
    bytes: int = 0
    chars: int = 0

    def metrics(self) -> dict[str, float]:
        loss = self.nll / self.tokens
        return {
            "eval_loss": loss,
            "perplexity": math.exp(loss),
            "bits_per_byte": self.nll / math.log(2) / self.bytes,
            "bits_per_char": self.nll / math.log(2) / self.chars,
            "eval_tokens": self.tokens,
            "eval_bytes": self.bytes,
        }


def windows(total: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over a stream of `total` tokens.

    The transformers perplexity guide's sliding window: each window scores only the tokens after the previous
    window's end, the ones before serving as context. With stride == block_size the windows are the blocks.
    """
    spans, previous_end = [], 0
    for begin in range(0, total - 1, stride):
        end = min(begin + block_size, total)
        spans.append((begin, end, max(previous_end, begin + 1)))
        previous_end = end
        if end == total:
            break
    return spans


def score(model, blocks, block_size: int, stride: int, batch_size: int, device: str) -> Score:
    """Sum the NLL of every scored token of the validation stream (its blocks end to end), a batch of windows at a time.

    `blocks` is a torch-formatted Dataset (memory-mapped Arrow) or a dict of tensors; each batch reads only the
    blocks its windows cover, and logits never outlive their batch, so memory is flat in the number of validation
    tokens."""
    count = len(blocks) if not isinstance(blocks, dict) else len(blocks["input_ids"])
    spans = windows(count * block_size, block_size, stride)
    model.to(device).eval()
    result = Score()
    with torch.inference_mode():
        for start in range(0, len(spans), batch_size):
            batch = spans[start : start + batch_size]  # windows ascend, so the first begins and the last ends
            first, last = batch[0][0] // block_size, (batch[-1][1] - 1) // block_size + 1
            rows = {key: blocks[key][first:last] for key in COLUMNS} if isinstance(blocks, dict) else blocks[first:last]
            ids = rows["input_ids"].reshape(-1).long()
            sizes = {unit: rows[f"token_{unit}"].reshape(-1).long() for unit in ("bytes", "chars")}
            offset = first * block_size
            local = [(begin - offset, end - offset, scored - offset) for begin, end, scored in batch]
            for length in sorted({end - begin for begin, end, _ in local}):  # only the last window is shorter
                same = [span for span in local if span[1] - span[0] == length]
                _score_windows(model, ids, sizes, same, device, result)
    return result


def _score_windows(model, ids, sizes: dict, spans, device: str, result: Score) -> None:
    """Score windows of one length: one gather builds them, one cross-entropy over (tokens, vocabulary) rows."""
    length = spans[0][1] - spans[0][0]
    index = torch.tensor([begin for begin, _, _ in spans]).unsqueeze(1) + torch.arange(length)  # stream positions
    window_ids = ids[index]
    first = torch.tensor([scored - begin for begin, _, scored in spans]).unsqueeze(1)
    scored = torch.arange(1, length).unsqueeze(0) >= first  # targets are window positions 1..length-1
    logits = model(input_ids=window_ids.to(device)).logits[:, :-1]
    targets = window_ids[:, 1:].reshape(-1).to(device)
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets, reduction="none")
    result.nll += float(nll.view(len(spans), -1).cpu()[scored].sum())
    result.tokens += int(scored.sum())
    for unit, per_token in sizes.items():
        setattr(result, unit, getattr(result, unit) + int(per_token[index[:, 1:]][scored].sum()))


def load_validation(tokenized_dir: Path = TOKENIZED_DIR):
    import datasets

    if not (tokenized_dir / "dataset_dict.json").exists():
        raise PipelineError(f"{tokenized_dir}: not found; run the tokenize stage first (dvc repro)")
    return datasets.load_from_disk(str(tokenized_dir))["validation"].with_format("torch")


def load_model(model_dir: Path = MODEL_DIR):
    """The trained model and its tokenizer, from the train stage's save_pretrained folder."""
    if not (model_dir / "config.json").exists():
        raise PipelineError(f"{model_dir}: no model there; run the train stage first (dvc repro)")
    return load_pretrained(str(model_dir), key=str(model_dir))


def evaluate(
    model,
    tokenized_dir: Path = TOKENIZED_DIR,
    batch_size: int = 16,
    device: str = "auto",
    stride: int | None = None,
) -> dict[str, Any]:
    """Score a model on the validation stream; stride None means non-overlapping blocks."""
    blocks = load_validation(tokenized_dir)
    block_size = len(blocks[0]["input_ids"])
    return score(model, blocks, block_size, stride or block_size, batch_size, resolve_device(device)).metrics()


def sample(model, tokenizer, prompts: list[str], settings: GenerationParams) -> list[dict[str, str]]:
    """Continue each prompt with generate(); a fixed seed makes the same settings give the same text."""
    from transformers import set_seed

    model.eval()
    samples = []
    for prompt in prompts:
        set_seed(settings.seed)
        # The prompt begins a record as tokenize framed them ([CLS] for a uer model; nothing for GPT-2's framing).
        framed = prompt_prefix(model) + prompt
        inputs = tokenizer(framed, return_tensors="pt", add_special_tokens=False).to(model.device)
        # GPT-2 has no positions beyond n_positions: the prompt and what it generates must fit in them.
        room = model.config.n_positions - inputs["input_ids"].shape[1]
        if room < 1:
            raise PipelineError(
                f"evaluate.prompts: {prompt[:40]!r} fills the model's {model.config.n_positions} positions; shorten it"
            )
        output = model.generate(
            **inputs,
            max_new_tokens=min(settings.max_new_tokens, room),
            do_sample=settings.temperature > 0,
            temperature=settings.temperature or None,
            top_k=settings.top_k,
            top_p=settings.top_p,
            repetition_penalty=settings.repetition_penalty,
            pad_token_id=model.generation_config.pad_token_id or tokenizer.eos_token_id,
        )
        samples.append({"prompt": prompt, "text": tokenizer.decode(output[0], skip_special_tokens=True)})
    return samples


def write_benchmarks(task_metrics: dict[str, float], path: Path) -> None:
    """The tasks' scores as rows of (metric, value): dvc.yaml's plot `benchmarks`, which `dvc plots diff` draws side
    by side for each revision and experiment it is given. Without evaluate.tasks, the header alone."""
    with atomic_output(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["metric", "value"])
        writer.writerows([key, value] for key, value in task_metrics.items()
                         if not key.endswith(("_stderr", "/examples")))  # fmt: skip


def main() -> None:
    params = load_params()
    model, tokenizer = load_model()
    run_id = mlflow_runs.model_run(params, MODEL_DIR)
    with mlflow_runs.active(run_id):
        evaluation = params.evaluate
        device = resolve_device(params.train.device)
        tasks = harness.evaluate(model.to(device), tokenizer, evaluation.tasks, evaluation.batch_size).metrics
        metrics = evaluate(model, batch_size=evaluation.batch_size, device=device, stride=evaluation.stride)
        metrics.update(tasks)
        judged = inputs.split_inputs(
            read_json(TOKENIZED_DIR / DATA_STATS.name, "tokenize"), {"validation": "evaluation"}
        )
        judged += [inputs.task_input(task.name, task.folder, int(tasks[f"{task.name}/examples"]), task.num_fewshot)
                   for task in evaluation.tasks]  # fmt: skip
        inputs.log(run_id, judged)
        samples = sample(model, tokenizer, evaluation.prompts, evaluation.generation)
        step = mlflow_runs.next_step(run_id, "eval/perplexity")  # a re-evaluation appends a step
        mlflow_runs.log_metrics(run_id, {f"eval/{key}": value for key, value in metrics.items()}, step=step)
        record = {"step": step, "settings": evaluation.model_dump(), "metrics": metrics, "samples": samples}
        client = store.client()
        client.log_text(run_id, json.dumps(samples, indent=2, ensure_ascii=False), "samples.json")
        client.log_text(run_id, json.dumps(record, indent=2, ensure_ascii=False), f"evaluations/{step}.json")
        write_json(EVAL_METRICS, metrics)
        write_json(SAMPLES_FILE, samples)
        write_benchmarks(tasks, BENCHMARKS_PLOT)
    print(
        f"evaluate: perplexity {metrics['perplexity']:.2f}, bits/byte {metrics['bits_per_byte']:.4f} "
        f"over {metrics['eval_tokens']} tokens (run {run_id}, evaluation {step}) -> {EVAL_METRICS}"
    )
    for task in evaluation.tasks:
        figures = ", ".join(f"{key.partition('/')[2]} {value:.4g}" for key, value in tasks.items()
                            if key.startswith(f"{task.name}/") and not key.endswith("_stderr"))  # fmt: skip
        print(f"evaluate: {task.name}: {figures}")


if __name__ == "__main__":
    run_cli(main)
