"""Stage `train`: a GPT2LMHeadModel, from scratch (GPT2Config) or pretrained, trained with the transformers Trainer.

Writes models/gpt2/ (save_pretrained: safetensors, config, generation config, tokenizer), metrics/train.json
and plots/train_loss.csv; logs the curve to the pipeline's MLflow run as train/*.
Run: python -m tasks.train
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Any

import torch

from tasks import tracking
from tasks.common import PipelineError, atomic_output, run_cli, write_json
from tasks.params import ModelParams, Params, TrainParams, load_params
from tasks.tokenize import TOKENIZED_DIR, TOKENIZER_DIR

MODEL_DIR = Path("models/gpt2")
METRICS_FILE = Path("metrics/train.json")
PLOT_FILE = Path("plots/train_loss.csv")
CHECKPOINT_DIR = Path("checkpoints/train")
VOCAB_MULTIPLE = 64  # embedding rows padded to a multiple of 64: faster matmuls, as nanoGPT does
LOGGED = {
    "loss": "train/loss",
    "eval_loss": "train/eval_loss",
    "learning_rate": "train/learning_rate",
    "grad_norm": "train/grad_norm",
}


def resolve_device(setting: str) -> str:
    """`auto` is CUDA when present, else the CPU; asking for CUDA without it is an error."""
    if setting == "cuda" and not torch.cuda.is_available():
        raise PipelineError("train.device: cuda was asked for but no CUDA device is visible; use auto or cpu")
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def resolve_precision(setting: str, device: str) -> str:
    """`auto` is bf16 on a GPU that supports it, fp16 on an older GPU, fp32 on the CPU."""
    if setting != "auto":
        if setting == "fp16" and device == "cpu":
            raise PipelineError("train.precision: fp16 needs a GPU; use fp32 or bf16 on the CPU")
        return setting
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def padded_vocab(size: int) -> int:
    return math.ceil(size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def config_overrides(model_params: ModelParams) -> dict[str, Any]:
    """model.config with `dropout` spread over GPT-2's three dropout rates."""
    overrides = dict(model_params.config)
    if "dropout" in overrides:
        rate = overrides.pop("dropout")
        for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            overrides.setdefault(key, rate)
    return overrides


def build_model(model_params: ModelParams, tokenizer, block_size: int):
    """A GPT2LMHeadModel matching the tokenizer: config-initialized, or pretrained with embeddings resized."""
    from transformers import GPT2Config, GPT2LMHeadModel

    eos = tokenizer.eos_token_id
    if model_params.init == "scratch":
        config = GPT2Config(
            vocab_size=padded_vocab(len(tokenizer)),
            bos_token_id=eos,
            eos_token_id=eos,
            **config_overrides(model_params),
        )
        model = GPT2LMHeadModel(config)
    else:
        try:
            model = GPT2LMHeadModel.from_pretrained(
                model_params.name_or_path, use_safetensors=True, **config_overrides(model_params)
            )
        except OSError as exc:
            raise PipelineError(
                f"model.name_or_path: cannot load {model_params.name_or_path!r} ({str(exc).splitlines()[0]}); "
                "offline, point it at a local save_pretrained folder"
            ) from None
        if model.config.n_positions < block_size:
            raise PipelineError(
                f"tokenizer.block_size: {block_size} exceeds the n_positions "
                f"({model.config.n_positions}) of {model_params.name_or_path!r}; lower block_size"
            )
        if model.config.vocab_size != len(tokenizer):
            print(
                f"train: resizing token embeddings from {model.config.vocab_size} to {len(tokenizer)} "
                "to match the tokenizer"
            )
            model.resize_token_embeddings(len(tokenizer))
    model.generation_config.pad_token_id = eos
    return model


def _collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Blocks are all block_size long: stack them; the model shifts labels itself."""
    ids = torch.stack([row["input_ids"] for row in rows]).long()
    return {"input_ids": ids, "labels": ids}


def _callback(run_id: str, curve: list[tuple[int, float]], max_steps: int):
    from transformers import TrainerCallback

    class MlflowCurve(TrainerCallback):
        """Sends each logging step to the pipeline's run (by id) and keeps the loss curve for plots/."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            metrics = {LOGGED[key]: value for key, value in logs.items() if key in LOGGED}
            if metrics:
                tracking.log_metrics(run_id, metrics, step=state.global_step)
            if "loss" in logs:
                curve.append((state.global_step, logs["loss"]))
                print(
                    f"train: step {state.global_step}/{max_steps} loss {logs['loss']:.4f} "
                    f"lr {logs.get('learning_rate', 0):.2e}"
                )
            if "eval_loss" in logs:
                print(f"train: step {state.global_step} eval_loss {logs['eval_loss']:.4f}")

    return MlflowCurve()


def training_arguments(params: TrainParams, device: str, precision: str):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(CHECKPOINT_DIR),
        max_steps=params.max_steps,
        num_train_epochs=params.epochs,
        per_device_train_batch_size=params.batch_size,
        per_device_eval_batch_size=params.batch_size,
        gradient_accumulation_steps=params.grad_accum,
        learning_rate=params.learning_rate,
        lr_scheduler_type=params.lr_scheduler,
        warmup_steps=params.warmup_steps,
        weight_decay=params.weight_decay,
        max_grad_norm=params.max_grad_norm,
        seed=params.seed,
        data_seed=params.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device == "cpu",
        logging_steps=params.logging_steps,
        eval_strategy="steps",
        eval_steps=params.eval_steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_pin_memory=device == "cuda",
    )


def train(
    params: Params,
    run_id: str,
    tokenizer_dir: Path = TOKENIZER_DIR,
    tokenized_dir: Path = TOKENIZED_DIR,
    model_dir: Path = MODEL_DIR,
    plot_file: Path = PLOT_FILE,
) -> dict[str, Any]:
    """Train, save the model folder and the loss curve; returns the train metrics."""
    import datasets
    from transformers import AutoTokenizer, PrinterCallback, Trainer, set_seed

    if not (tokenized_dir / "dataset_dict.json").exists():
        raise PipelineError(f"{tokenized_dir}: not found; run the tokenize stage first (dvc repro)")
    device = resolve_device(params.train.device)
    precision = resolve_precision(params.train.precision, device)
    set_seed(params.train.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    blocks = datasets.load_from_disk(str(tokenized_dir)).select_columns(["input_ids"]).with_format("torch")
    model = build_model(params.model, tokenizer, params.tokenizer.block_size)
    args = training_arguments(params.train, device, precision)
    curve: list[tuple[int, float]] = []
    trainer = Trainer(
        model=model,
        args=args,
        data_collator=_collate,
        train_dataset=blocks["train"],
        eval_dataset=blocks["validation"],
        callbacks=[_callback(run_id, curve, params.train.max_steps)],
    )
    trainer.remove_callback(PrinterCallback)  # our callback prints one readable line per logging step
    print(
        f"train: {model.num_parameters():,} parameters on {device} ({precision}), "
        f"{len(blocks['train'])} blocks of {params.tokenizer.block_size}"
    )
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
    if not curve or not math.isfinite(curve[-1][1]):
        raise PipelineError("train: the loss is not finite; lower train.learning_rate or check the data")
    _save(model, tokenizer, model_dir)
    _write_curve(curve, plot_file)
    steps = result.global_step
    tokens = steps * params.train.batch_size * params.train.grad_accum * params.tokenizer.block_size
    return {
        "train_loss": curve[-1][1],
        "train_loss_first": curve[0][1],
        "steps": steps,
        "tokens_seen": tokens,
        "tokens_per_second": tokens / seconds,
        "seconds": seconds,
        "parameters": model.num_parameters(),
        "device": device,
        "precision": precision,
    }


def _save(model, tokenizer, model_dir: Path) -> None:
    with atomic_output(model_dir) as tmp:
        model.save_pretrained(str(tmp))  # safetensors weights, config.json, generation_config.json
        tokenizer.save_pretrained(str(tmp))


def _write_curve(curve: list[tuple[int, float]], plot_file: Path) -> None:
    with atomic_output(plot_file) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "loss"])
        writer.writerows(curve)


def main() -> None:
    params = load_params()
    run_id = tracking.pipeline_run(params)
    metrics = train(params, run_id)
    write_json(METRICS_FILE, metrics)
    numeric = {f"train/{k}": v for k, v in metrics.items() if isinstance(v, int | float) and k != "train_loss"}
    tracking.log_metrics(run_id, numeric, step=metrics["steps"])
    print(
        f"train: {metrics['steps']} steps, loss {metrics['train_loss_first']:.3f} -> {metrics['train_loss']:.3f}, "
        f"{metrics['tokens_per_second']:.0f} tokens/s -> {MODEL_DIR}"
    )


if __name__ == "__main__":
    run_cli(main)
