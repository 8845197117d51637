"""Stage `train`: a GPT2LMHeadModel, from scratch (GPT2Config) or pretrained, trained with the transformers Trainer.

Writes models/gpt2/ (save_pretrained: safetensors, config, generation config, tokenizer, and mlflow_run.json: the
model's MLflow run), metrics/train.json and plots/ (the loss curves). Creates the model's MLflow run
(tasks/tracking/mlflow_runs.py) and logs to it the params, the ingest/tokenize figures and the curve as train/*.
Every weight trains (train.method: full), or LoRA adapters merged into the weights at the end (tasks/training/lora.py).
Run: python -m tasks.train
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tasks.plumbing.errors import PipelineError, Stopped, TrialPruned
from tasks.plumbing.outputs import atomic_output, read_json, write_json
from tasks.plumbing.params import Params, TrainParams, load_params
from tasks.plumbing.paths import (
    CHECKPOINT_DIR,
    DATA_STATS,
    FRAMING_FIGURE,
    MODEL_DIR,
    PLOTS_DIR,
    TOKENIZED_DIR,
    TOKENIZER_DIR,
    TRAIN_METRICS,
)
from tasks.plumbing.stage import run_cli
from tasks.tracking import mlflow_runs
from tasks.tracking.charts import COLORS, line_chart
from tasks.tracking.loading import resolve_device
from tasks.training import checkpoints, launch, lora, memory, pruning, throughput
from tasks.training.callbacks import MlflowLogger, StopOnSignal, kept
from tasks.training.launch import Role
from tasks.training.model import build_model, for_training

# What a run is rather than how it went: one value each, so run tags (MLflow draws a metric as a chart).
RUN_FACTS = (
    "steps", "tokens_seen", "seconds", "parameters", "trainable_parameters", "processes", "device", "precision",
    "mfu_peak",
)  # fmt: skip

# On the CPU, bf16 autocast pays only where the CPU computes bf16 natively (AMX or AVX512_BF16; elsewhere it is
# emulated, ~36x slower) and the matmuls are wide enough to outweigh the casts around them. Measured through the
# Trainer on a 2-core Xeon with AMX (docs/benchmarks.md): n_embd 128 trains 0.83x as fast in bf16, 256 1.17x, 512 1.42x.
CPU_BF16_MIN_WIDTH = 256


def native_bf16() -> str | None:
    """The CPU feature that computes bf16 natively (torch's own check, else /proc/cpuinfo's flags), or None."""
    flags = throughput.cpu_facts()[0]
    for flag, check in (("amx_bf16", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported")):
        supported = getattr(torch.cpu, check, None)
        if flag in flags or (supported is not None and supported()):
            return flag
    return None


def resolve_precision(setting: str, device: str, width: int, native: Callable[[], str | None] = native_bf16):
    """(precision, why): `auto` is bf16 on a GPU that supports it, fp16 on an older GPU.

    On the CPU bf16 where it computes bf16 natively and the model is at least CPU_BF16_MIN_WIDTH wide, else fp32."""
    if setting != "auto":
        if setting == "fp16" and device == "cpu":
            raise PipelineError("train.precision: fp16 needs a GPU; use fp32 or bf16 on the CPU")
        return setting, f"train.precision is {setting}"
    if device == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: the GPU supports bf16"
        return "fp16", "auto: the GPU has no bf16"
    flag = native()
    if flag is None:
        return "fp32", "auto: the CPU has no native bf16 (neither amx_bf16 nor avx512_bf16), where bf16 is emulated"
    if width < CPU_BF16_MIN_WIDTH:
        return "fp32", (
            f"auto: the CPU has native bf16 ({flag}), but at n_embd {width} (under {CPU_BF16_MIN_WIDTH}) "
            "bf16 autocast costs more in casts than it saves"
        )
    return "bf16", f"auto: the CPU has native bf16 ({flag}) and n_embd {width} is at least {CPU_BF16_MIN_WIDTH}"


def _collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Blocks are all block_size long: stack them; the model shifts labels itself.

    The first label of each block is masked: no token predicts it, and the Trainer divides the summed loss by
    the number of unmasked labels, which would otherwise understate the loss by a factor (T-1)/T.
    """
    ids = torch.stack([row["input_ids"] for row in rows]).long()
    labels = ids.clone()
    labels[:, 0] = -100
    return {"input_ids": ids, "labels": labels}


def training_arguments(params: TrainParams, device: str, precision: str, output_dir: Path = CHECKPOINT_DIR):
    """The Trainer's settings.

    Checkpoints every checkpoint_every steps, the best evaluated model kept, and on a GPU the fast path (TF32
    matmuls, fused AdamW, pinned memory)."""
    from transformers import TrainingArguments

    cuda = device == "cuda"
    return TrainingArguments(
        output_dir=str(output_dir),
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
        fp16=precision == "fp16",  # the Trainer scales the loss for fp16
        use_cpu=not cuda,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        torch_compile=params.torch_compile,
        activation_checkpointing=params.gradient_checkpointing,
        logging_steps=params.logging_steps,
        eval_strategy="steps",
        eval_steps=params.eval_steps,
        save_strategy="steps",
        save_steps=params.checkpoint_every,
        save_total_limit=params.keep_checkpoints,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=params.dataloader_workers,
        dataloader_pin_memory=cuda,
        ddp_backend=("nccl" if cuda else "gloo") if "LOCAL_RANK" in os.environ else None,
        ddp_find_unused_parameters=False,
    )


def train(
    params: Params,
    run_id: str,
    tokenizer_dir: Path = TOKENIZER_DIR,
    tokenized_dir: Path = TOKENIZED_DIR,
    model_dir: Path = MODEL_DIR,
    plots_dir: Path = PLOTS_DIR,
    checkpoint_dir: Path = CHECKPOINT_DIR,
    resume_from: str | None = None,
) -> dict[str, Any]:
    """Train (from the checkpoint resume_from, if any), save the model folder with its run's record and the loss curve.

    Returns the train metrics. Under torchrun only the first process writes and logs."""
    import datasets
    from transformers import AutoTokenizer, EarlyStoppingCallback, PrinterCallback, Trainer, set_seed

    if not (tokenized_dir / "dataset_dict.json").exists():
        raise PipelineError(f"{tokenized_dir}: not found; run the tokenize stage first (dvc repro)")
    device = resolve_device(params.train.device)
    if device == "cuda":
        throughput.use_tf32()
    set_seed(params.train.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))  # nosec B615
    blocks = datasets.load_from_disk(str(tokenized_dir)).select_columns(["input_ids"]).with_format("torch")
    framing_name = read_json(tokenized_dir / DATA_STATS.name, "tokenize").get(FRAMING_FIGURE, "eos")
    model = build_model(params.model, tokenizer, params.tokenizer.block_size, framing_name)
    for_training(model, device, params.train.loss_kernel, params.train.fp8_lm_head)
    precision, why = resolve_precision(params.train.precision, device, model.config.n_embd)
    if params.train.method == "lora":
        model = lora.wrap(model, params.train.lora, scratch=params.model.init == "scratch")
    adapters = lora.trainable_parameters(model) if params.train.method == "lora" else None
    args = training_arguments(params.train, device, precision, checkpoint_dir)
    tokens_per_step = params.train.batch_size * params.train.grad_accum * params.tokenizer.block_size * args.world_size
    meter = throughput.Meter(model, tokens_per_step, params.tokenizer.block_size, args.world_size, device, precision)
    stop, logger = StopOnSignal(), MlflowLogger(run_id, meter, params.train.max_steps)
    callbacks = [stop, logger]  # the logger sees the stop's checkpoint request and flushes before it
    if params.train.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=params.train.early_stopping_patience))
    reporter = pruning.trial_reporter(args)  # a sweep trial: its validation losses go to the study, which may prune it
    if reporter is not None:
        callbacks.append(reporter)
    trainer = Trainer(
        model=model,
        args=args,
        data_collator=_collate,
        train_dataset=blocks["train"],
        eval_dataset=blocks["validation"],
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # MlflowLogger prints one readable line per logging step
    if args.process_index == 0:
        trains = f" ({adapters:,} of them in LoRA adapters, the rest frozen)" if adapters is not None else ""
        print(
            f"train: {model.num_parameters():,} parameters{trains} on {device} ({precision}) x {args.world_size} "
            f"process(es), {len(blocks['train'])} blocks of {params.tokenizer.block_size}"
            + (f", resuming from {resume_from}" if resume_from else "")
            + f"\ntrain: precision {precision} ({why})"
        )
        mlflow_runs.log_params_once(run_id, {"train.precision_chosen": precision, "train.precision_reason": why})
    started = time.perf_counter()
    trainer_log = logging.getLogger("transformers.trainer")
    if model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        trainer_log.addFilter(tied_head_is_not_missing)
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    except BaseException:
        with contextlib.suppress(Exception):  # keep what was measured before a nan or a crash; the error wins
            logger.flush()
        raise
    finally:
        stop.release()
        trainer_log.removeFilter(tied_head_is_not_missing)
    seconds = time.perf_counter() - started
    if stop.signum is not None:
        raise Stopped(
            f"train stopped by SIGTERM at step {result.global_step}; its checkpoint is in {checkpoint_dir} and "
            f"{kept(model_dir)}",
            stop.signum,
        )
    if reporter is not None and reporter.verdict:  # the sweep's pruner stopped it (every process at one step)
        raise TrialPruned(reporter.verdict)
    curve = [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    curve = curve or [(result.global_step, result.training_loss)]  # fewer steps than logging_steps
    if not math.isfinite(curve[-1][1]):
        raise PipelineError("train: the loss is not finite; lower train.learning_rate or check the data")
    if not trainer.is_world_process_zero():
        return {}
    # LoRA: the adapter alone to the run, then merged, so that what is saved and registered is a plain GPT-2
    trained = lora.merge(trainer.model, run_id) if params.train.method == "lora" else trainer.model
    _save(trained, tokenizer, model_dir, run_id)
    evals = [(entry["step"], entry["eval_loss"]) for entry in trainer.state.log_history if "eval_loss" in entry]
    write_plots(curve, evals, plots_dir)
    checkpoints.clear(checkpoint_dir)  # finished: the next run, with whatever params, starts afresh
    steps = result.global_step
    return {
        "train_loss": curve[-1][1],
        "train_loss_first": curve[0][1],
        "best_eval_loss": min(loss for _, loss in evals) if evals else None,
        "steps": steps,
        "tokens_seen": steps * meter.tokens_per_step,
        "tokens_per_second": meter.mean_tokens_per_second(),
        "mfu": meter.mean_mfu(),
        "mfu_peak": meter.peak_source,
        "seconds": seconds,
        "parameters": trained.num_parameters(),
        "trainable_parameters": trained.num_parameters() if adapters is None else adapters,
        "processes": args.world_size,
        "device": device,
        "precision": precision,
    }


def tied_head_is_not_missing(record: logging.LogRecord) -> bool:
    """Drops the Trainer's warning that the best checkpoint it loads back lacks lm_head.weight: the head is the
    embedding's weight (GPT-2 ties them), saved and loaded once under the embedding's name."""
    return "missing keys in the checkpoint model loaded: ['lm_head.weight']" not in record.getMessage()


def _save(model, tokenizer, model_dir: Path, run_id: str) -> None:
    model.resize_token_embeddings(len(tokenizer))  # the padding rows go: the model as its tokenizer sizes it
    with atomic_output(model_dir) as tmp:
        model.save_pretrained(str(tmp))  # safetensors weights, config.json, generation_config.json
        tokenizer.save_pretrained(str(tmp))
        mlflow_runs.write_record(tmp, run_id)  # the model's run travels with it: evaluate and register log there


def write_plots(curve: list[tuple[int, float]], evals: list[tuple[int, float]], plots_dir: Path) -> None:
    """The loss curves' points (train_loss.csv, eval_loss.csv) and both curves as an image (loss.svg).

    The points are dvc.yaml's plot `loss`, which `dvc plots diff` overlays across experiments; the image is for a
    page or a notebook without Vega."""
    for name, column, points in (("train_loss.csv", "loss", curve), ("eval_loss.csv", "eval_loss", evals)):
        with atomic_output(plots_dir / name) as tmp, tmp.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["step", column])
            writer.writerows(points)
    series = [("training loss", COLORS[0], curve), ("validation loss", COLORS[1], evals)]
    with atomic_output(plots_dir / "loss.svg") as tmp:
        tmp.write_text(line_chart(series, "loss by step"), encoding="utf-8")


def finish(run_id: str, metrics: dict[str, Any]) -> None:
    """metrics/train.json and the run's summary metrics, once the model is saved."""
    write_json(TRAIN_METRICS, metrics)
    facts = {f"train/{key}": metrics[key] for key in RUN_FACTS}
    measured = {k: v for k, v in metrics.items() if isinstance(v, int | float) and k not in (*RUN_FACTS, "train_loss")}
    numeric = {f"train/{key}": value for key, value in measured.items()}
    for key in ("tokens_per_second", "mfu"):  # the per-interval curves already use these names at this step
        numeric[f"train/mean_{key}"] = numeric.pop(f"train/{key}")
    mlflow_runs.log_metrics(run_id, numeric, step=metrics["steps"])
    mlflow_runs.set_tags(run_id, facts)
    print(
        f"train: {metrics['steps']} steps, loss {metrics['train_loss_first']:.3f} -> {metrics['train_loss']:.3f}, "
        f"{metrics['tokens_per_second']:.0f} tokens/s, MFU {metrics['mfu']:.1%} -> {MODEL_DIR}"
    )


def check_memory(params: Params, device: str, available: int | None = None) -> None:
    """Refuse a model that cannot train in the device's memory (or `available` bytes), counted at the precision the
    run will compute in."""
    dims = memory.shape(params)
    if dims is not None:
        precision, _ = resolve_precision(params.train.precision, device, dims["n_embd"])
        memory.check_fits(params, device, available, precision)


def main() -> None:
    params = load_params()
    device = resolve_device(params.train.device)
    check_memory(params, device)  # before a run, a checkpoint or a model exists
    me = launch.role(params.train, os.environ)
    try:
        run_role(params, me)
    except TrialPruned:
        if me not in (Role.WORKER, Role.GLOBAL_RANK_0):
            raise
        # Every process stopped at the same step. A torchrun worker ends as finished (torchrun calls any other exit a
        # failure); its launcher reads the verdict from the trial and exits as pruned.


def run_role(params: Params, me: Role) -> None:
    """This process's part of the stage."""
    if me is Role.NODE_LAUNCHER:
        launch.train_on_nodes(params)
        return
    fingerprint = checkpoints.fingerprint(params, TOKENIZED_DIR)
    if me is Role.WORKER:
        # Its launcher (launch_processes, or global rank 0 of a multi-node job) holds the run and has prepared the
        # checkpoint folder; only rank 0 writes and logs.
        launched = os.environ.get(mlflow_runs.RUN_ID_ENV, "")
        metrics = train(params, launched, resume_from=checkpoints.prepare(CHECKPOINT_DIR, fingerprint, False))
        if os.environ.get("RANK", "0") == "0":
            finish(launched, metrics)
        return
    resume_from = checkpoints.prepare(CHECKPOINT_DIR, fingerprint, clean=me is not Role.GLOBAL_RANK_0)
    figures = read_json(DATA_STATS, "tokenize")
    run_id = mlflow_runs.training_run(params, CHECKPOINT_DIR, resume_from is not None, figures)
    with mlflow_runs.active(run_id), mlflow_runs.system_metrics(run_id, resuming=resume_from is not None):
        if me is Role.LAUNCHER:
            code = launch.launch_processes(params, run_id)
            if code:
                raise PipelineError(f"train: a torchrun worker failed (exit status {code}); see its output above")
            return
        finish(run_id, train(params, run_id, resume_from=resume_from))


if __name__ == "__main__":
    run_cli(main)
