"""Stage `train`: a GPT2LMHeadModel, from scratch (GPT2Config) or pretrained, trained with the transformers Trainer.

Writes models/gpt2/ (save_pretrained: safetensors, config, generation config, tokenizer, and mlflow_run.json: the
model's MLflow run), metrics/train.json and plots/ (the loss curves). Creates the model's MLflow run (tasks/runs.py)
and logs to it the params, the ingest/tokenize figures and the curve as train/*.
Run: python -m tasks.train
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import TrainerCallback

from tasks import checkpoints, loss, memory, runs, throughput
from tasks.charts import COLORS, line_chart
from tasks.errors import OUTPUTS_ELSEWHERE_EXIT, PipelineError, Stopped
from tasks.framing import FRAMINGS, Framing
from tasks.loading import load_pretrained, resolve_device
from tasks.outputs import atomic_output, read_json, write_json
from tasks.params import ModelParams, Params, TrainParams, load_params
from tasks.paths import (
    CHECKPOINT_DIR,
    DATA_STATS,
    FRAMING_FIGURE,
    MODEL_DIR,
    PLOTS_DIR,
    RUN_RECORD,
    TOKENIZED_DIR,
    TOKENIZER_DIR,
    TRAIN_METRICS,
)
from tasks.stage import run_cli

# What a run is rather than how it went: one value each, so run tags (MLflow draws a metric as a chart).
RUN_FACTS = ("steps", "tokens_seen", "seconds", "parameters", "processes", "device", "precision", "mfu_peak")
# While training, the embedding rows are padded to a multiple of 128 (50304 for GPT-2's 50257): matmul shapes
# the GPU's tensor cores take whole, as nanoGPT and llm.c pad. The saved model has the tokenizer's size again,
# so generation can never sample a padding id.
VOCAB_MULTIPLE = 128


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
    """(precision, why): `auto` is bf16 on a GPU that supports it, fp16 on an older GPU; on the CPU bf16 where
    it computes bf16 natively and the model is at least CPU_BF16_MIN_WIDTH wide, else fp32."""
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


def padded_vocab(size: int) -> int:
    return math.ceil(size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def config_overrides(model_params: ModelParams) -> dict[str, Any]:
    """model.config as this init takes it, with `dropout` spread over GPT-2's three dropout rates."""
    overrides = model_params.gpt2_config()
    if "dropout" in overrides:
        rate = overrides.pop("dropout")
        for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            overrides.setdefault(key, rate)
    return overrides


def build_model(model_params: ModelParams, tokenizer, block_size: int, framing_name: str = "eos"):
    """A GPT2LMHeadModel matching the tokenizer: config-initialized, or pretrained with embeddings resized; it
    stops generating at the tokenizer's eos_token (the framing's end marker) and frames prompts as tokenize
    framed records."""
    from transformers import GPT2Config, GPT2LMHeadModel

    eos = tokenizer.eos_token_id
    if model_params.init == "scratch":
        config = GPT2Config(
            vocab_size=len(tokenizer),
            bos_token_id=eos,
            eos_token_id=eos,
            attn_implementation="sdpa",
            **config_overrides(model_params),
        )
        model = GPT2LMHeadModel(config)
    else:
        model, _ = load_pretrained(
            model_params.name_or_path, attn_implementation="sdpa", **config_overrides(model_params)
        )
        if model.config.n_positions < block_size:
            raise PipelineError(
                f"tokenizer.block_size: {block_size} exceeds the n_positions "
                f"({model.config.n_positions}) of {model_params.name_or_path!r}; lower block_size"
            )
        if model.config.vocab_size != len(tokenizer):  # a model saved padded by an earlier version: trimmed
            print(
                f"train: resizing token embeddings from {model.config.vocab_size} to {len(tokenizer)} "
                "to match the tokenizer"
            )
            model.resize_token_embeddings(len(tokenizer))
    frame(model, tokenizer, FRAMINGS[framing_name])
    return model


def for_training(model) -> None:
    """The model as it trains: vocabulary rows padded to VOCAB_MULTIPLE (the padding columns masked out of the
    loss) and the loss computed chunk by chunk from the hidden states (tasks/loss.py). _save trims the padding
    off again (to the tokenizer's size)."""
    size = model.config.vocab_size
    model.resize_token_embeddings(padded_vocab(size), mean_resizing=False)  # padding rows: never looked up
    loss.use_chunked_loss(model, size)


def frame(model, tokenizer, framing: Framing) -> None:
    """The framing in the model's config: the start marker as the prompt prefix (transformers' text-generation
    pipeline reads it too), the end marker as the stop token (a uer checkpoint's config names GPT-2's 50256,
    outside its vocabulary), and the framing's name for the model card."""
    eos = tokenizer.eos_token_id
    model.config.eos_token_id = model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos
    model.config.prefix = getattr(tokenizer, framing.start) if framing.start else None
    if framing.start:
        model.config.bos_token_id = model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.config.framing = framing.name


def _collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Blocks are all block_size long: stack them; the model shifts labels itself.

    The first label of each block is masked: no token predicts it, and the Trainer divides the summed loss by
    the number of unmasked labels, which would otherwise understate the loss by a factor (T-1)/T.
    """
    ids = torch.stack([row["input_ids"] for row in rows]).long()
    labels = ids.clone()
    labels[:, 0] = -100
    return {"input_ids": ids, "labels": labels}


class MlflowLogger(TrainerCallback):
    """Each logging step to the pipeline's MLflow run, by id: loss, learning rate, gradient norm, eval loss,
    tokens/s and MFU, and one readable line on stdout. The metrics are sent in batches, every FLUSH_SECONDS,
    before each checkpoint and at the end. After a resume, steps the run already holds are skipped, so no
    metric step is logged twice."""

    KEYS: ClassVar[dict[str, str]] = {
        "loss": "train/loss",
        "eval_loss": "train/eval_loss",
        "learning_rate": "train/learning_rate",
        "grad_norm": "train/grad_norm",
    }

    FLUSH_SECONDS = 5.0  # one request every few seconds, not one a logging step (docs/benchmarks.md, (c))

    def __init__(self, run_id: str, meter: throughput.Meter, max_steps: int):
        self.run_id, self.meter, self.max_steps = run_id, meter, max_steps
        self.logged: dict[str, int] = {}
        self.pending: list[tuple[int, int, dict[str, float]]] = []
        self.flushed_at = -math.inf  # the first logging step goes out at once: the UI shows the run started

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            keys = [*self.KEYS.values(), "train/tokens_per_second", "train/mfu"]
            self.logged = runs.last_logged_steps(self.run_id, keys)

    def on_step_begin(self, args, state, control, **kwargs):
        self.meter.step_began()

    def on_step_end(self, args, state, control, **kwargs):
        self.meter.step_ended()
        if control.should_save:  # flushed before each checkpoint (see on_log)
            self.flush()

    def on_log(self, args, state, control, logs=None, **kwargs):
        check_finite(logs or {}, state.global_step)
        if not state.is_world_process_zero or not logs:
            return
        step = state.global_step
        metrics = {self.KEYS[key]: value for key, value in logs.items() if key in self.KEYS}
        if "loss" in logs:
            metrics.update(self.meter.interval())
            print(
                f"train: step {step}/{self.max_steps} loss {logs['loss']:.4f} lr {logs.get('learning_rate', 0):.2e} "
                f"{metrics.get('train/tokens_per_second', 0):.0f} tokens/s MFU {metrics.get('train/mfu', 0):.1%}"
            )
        if "eval_loss" in logs:
            print(f"train: step {step} eval_loss {logs['eval_loss']:.4f}")
        fresh = {key: value for key, value in metrics.items() if step > self.logged.get(key, -1)}
        if fresh:
            self.pending.append((step, int(time.time() * 1000), fresh))
        # A run resumed from a checkpoint logs only the steps after it: what came before must be sent first.
        if control.should_save or time.monotonic() - self.flushed_at >= self.FLUSH_SECONDS:
            self.flush()

    def on_train_end(self, args, state, control, **kwargs):
        self.flush()

    def flush(self) -> None:
        if self.pending:
            runs.log_metric_steps(self.run_id, self.pending)
            self.pending = []
        self.flushed_at = time.monotonic()


class StopOnSignal(TrainerCallback):
    """SIGTERM during training ends it at the next step boundary with a checkpoint, so a rerun resumes there."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = signal.signal(signal.SIGTERM, self._note)

    def release(self) -> None:
        """After training, SIGTERM stops the stage at once again (saving and plotting are run_cli's to unwind)."""
        signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)

    def _note(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def on_step_end(self, args, state, control, **kwargs):
        if self.signum is not None:
            control.should_save = True
            control.should_training_stop = True


def check_finite(logs: dict[str, float], step: int) -> None:
    """Stop at the first logged loss that is nan or inf: nothing after it can be trusted or registered."""
    for key in ("loss", "eval_loss"):  # not grad_norm: fp16 loss scaling skips inf-gradient steps by design
        value = logs.get(key)
        if value is not None and not math.isfinite(value):
            raise PipelineError(
                f"train: {key} became {value} at step {step}; lower train.learning_rate, raise "
                "train.warmup_steps or keep train.max_grad_norm set (fp32 is the most stable precision); "
                f"{kept(MODEL_DIR)} and nothing was registered"
            )


def kept(model_dir: Path) -> str:
    """What a stopped or failed training left in model_dir, in words."""
    if (model_dir / "model.safetensors").exists():
        return f"{model_dir} keeps the previous model"
    return f"there is no model in {model_dir} yet"


def training_arguments(params: TrainParams, device: str, precision: str, output_dir: Path = CHECKPOINT_DIR):
    """The Trainer's settings: checkpoints every checkpoint_every steps, the best evaluated model kept, and on a
    GPU the fast path (TF32 matmuls, fused AdamW, pinned memory)."""
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
    """Train (from the checkpoint resume_from, if any), save the model folder with its run's record and the loss
    curve; returns the train metrics. Under torchrun only the first process writes and logs."""
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
    for_training(model)
    precision, why = resolve_precision(params.train.precision, device, model.config.n_embd)
    args = training_arguments(params.train, device, precision, checkpoint_dir)
    tokens_per_step = params.train.batch_size * params.train.grad_accum * params.tokenizer.block_size * args.world_size
    meter = throughput.Meter(model, tokens_per_step, params.tokenizer.block_size, args.world_size, device, precision)
    stop, logger = StopOnSignal(), MlflowLogger(run_id, meter, params.train.max_steps)
    callbacks = [stop, logger]  # the logger sees the stop's checkpoint request and flushes before it
    if params.train.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=params.train.early_stopping_patience))
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
        print(
            f"train: {model.num_parameters():,} parameters on {device} ({precision}) x {args.world_size} process(es), "
            f"{len(blocks['train'])} blocks of {params.tokenizer.block_size}"
            + (f", resuming from {resume_from}" if resume_from else "")
            + f"\ntrain: precision {precision} ({why})"
        )
        runs.log_params_once(run_id, {"train.precision_chosen": precision, "train.precision_reason": why})
    started = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    except BaseException:
        with contextlib.suppress(Exception):  # keep what was measured before a nan or a crash; the error wins
            logger.flush()
        raise
    finally:
        stop.release()
    seconds = time.perf_counter() - started
    if stop.signum is not None:
        raise Stopped(
            f"train stopped by SIGTERM at step {result.global_step}; its checkpoint is in {checkpoint_dir} and "
            f"{kept(model_dir)}",
            stop.signum,
        )
    curve = [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    curve = curve or [(result.global_step, result.training_loss)]  # fewer steps than logging_steps
    if not math.isfinite(curve[-1][1]):
        raise PipelineError("train: the loss is not finite; lower train.learning_rate or check the data")
    if not trainer.is_world_process_zero():
        return {}
    _save(trainer.model, tokenizer, model_dir, run_id)
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
        "parameters": model.num_parameters(),
        "processes": args.world_size,
        "device": device,
        "precision": precision,
    }


def _save(model, tokenizer, model_dir: Path, run_id: str) -> None:
    model.resize_token_embeddings(len(tokenizer))  # the padding rows go: the model as its tokenizer sizes it
    with atomic_output(model_dir) as tmp:
        model.save_pretrained(str(tmp))  # safetensors weights, config.json, generation_config.json
        tokenizer.save_pretrained(str(tmp))
        runs.write_record(tmp, run_id)  # the model's run travels with it: evaluate and register log there


def write_plots(curve: list[tuple[int, float]], evals: list[tuple[int, float]], plots_dir: Path) -> None:
    """The loss curves' points (train_loss.csv, eval_loss.csv) and both curves as an image (loss.svg), the DVC
    plot: `dvc plots show` draws it offline, where plots of the CSVs would load Vega from a CDN."""
    for name, column, points in (("train_loss.csv", "loss", curve), ("eval_loss.csv", "eval_loss", evals)):
        with atomic_output(plots_dir / name) as tmp, tmp.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["step", column])
            writer.writerows(points)
    series = [("training loss", COLORS[0], curve), ("validation loss", COLORS[1], evals)]
    with atomic_output(plots_dir / "loss.svg") as tmp:
        tmp.write_text(line_chart(series, "loss by step"), encoding="utf-8")


def launch_processes(params: Params, run_id: str | None) -> int:
    """Rerun this stage under torchrun: train.num_processes workers on this machine, all writing to the run run_id;
    or, with train.nodes > 1, this node's share of a c10d rendezvous (run_id None: the worker that becomes global
    rank 0, on whichever node, creates the run and writes the outputs)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if run_id is not None:
        env[runs.RUN_ID_ENV] = run_id
    return subprocess.run(torchrun_command(params), env=env, check=False).returncode


def torchrun_command(params: Params) -> list[str]:
    train = params.train
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={train.num_processes}"]
    if train.nodes == 1:
        command.append("--standalone")
    else:
        # The same id on every node, and another for other params or data: nodes of different jobs never meet.
        job = checkpoints.fingerprint(params, TOKENIZED_DIR)[:16]
        endpoint = rendezvous_endpoint(train, os.environ)
        command += [f"--nnodes={train.nodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={job}"]
    return [*command, "-m", "tasks.train"]


def rendezvous_endpoint(train: TrainParams, environ: Mapping[str, str]) -> str:
    """Where the nodes meet: train.rendezvous, else the scheduler's (torchrun's own PET_RDZV_ENDPOINT, or the
    MASTER_ADDR and MASTER_PORT a PyTorchJob sets)."""
    if train.rendezvous:
        return train.rendezvous
    if environ.get("PET_RDZV_ENDPOINT"):
        return environ["PET_RDZV_ENDPOINT"]
    if environ.get("MASTER_ADDR"):
        return f"{environ['MASTER_ADDR']}:{environ.get('MASTER_PORT', '29500')}"
    raise PipelineError(
        f"train.nodes: {train.nodes} nodes need a place to meet: set train.rendezvous to host:port of the first "
        "node (the same on every node), or run where the scheduler sets MASTER_ADDR and MASTER_PORT"
    )


def train_on_nodes(params: Params) -> None:
    """This node's launcher of a multi-node training. c10d may give global rank 0 to any node: the node where it
    ran holds the model and the run; any other node exits OUTPUTS_ELSEWHERE_EXIT, so that DVC does not record
    its old outputs as this training's."""
    record = MODEL_DIR / RUN_RECORD

    def written() -> tuple[int, int] | None:  # a model swapped in is a new file, even for a resumed run's id
        return (record.stat().st_ino, record.stat().st_mtime_ns) if record.exists() else None

    before = written()
    code = launch_processes(params, None)
    if code:
        raise PipelineError(f"train: a torchrun worker failed (exit status {code}); see its output above")
    if written() in (None, before):
        print(
            f"train: this node's {params.train.num_processes} process(es) trained; global rank 0 ran on another node, "
            f"which saved {MODEL_DIR} and logged the run: evaluate and register there"
        )
        sys.exit(OUTPUTS_ELSEWHERE_EXIT)


def finish(run_id: str, metrics: dict[str, Any]) -> None:
    """metrics/train.json and the run's summary metrics, once the model is saved."""
    write_json(TRAIN_METRICS, metrics)
    facts = {f"train/{key}": metrics[key] for key in RUN_FACTS}
    measured = {k: v for k, v in metrics.items() if isinstance(v, int | float) and k not in (*RUN_FACTS, "train_loss")}
    numeric = {f"train/{key}": value for key, value in measured.items()}
    for key in ("tokens_per_second", "mfu"):  # the per-interval curves already use these names at this step
        numeric[f"train/mean_{key}"] = numeric.pop(f"train/{key}")
    runs.log_metrics(run_id, numeric, step=metrics["steps"])
    runs.set_tags(run_id, facts)
    print(
        f"train: {metrics['steps']} steps, loss {metrics['train_loss_first']:.3f} -> {metrics['train_loss']:.3f}, "
        f"{metrics['tokens_per_second']:.0f} tokens/s, MFU {metrics['mfu']:.1%} -> {MODEL_DIR}"
    )


def main() -> None:
    params = load_params()
    device = resolve_device(params.train.device)
    memory.check_fits(params, device, fp32=device == "cpu")  # before a run, a checkpoint or a model exists
    distributed = "LOCAL_RANK" in os.environ
    if params.train.nodes > 1 and not distributed:
        train_on_nodes(params)
        return
    first = os.environ.get("RANK", "0") == "0"
    fingerprint = checkpoints.fingerprint(params, TOKENIZED_DIR)
    launched = os.environ.get(runs.RUN_ID_ENV)
    if distributed and (launched or not first):
        # A torchrun worker: its launcher (launch_processes, or rank 0 of a multi-node job) holds the run and has
        # prepared the checkpoint folder; only rank 0 writes and logs.
        metrics = train(params, launched or "", resume_from=checkpoints.prepare(CHECKPOINT_DIR, fingerprint, False))
        if first:
            finish(launched or "", metrics)
        return
    resume_from = checkpoints.prepare(CHECKPOINT_DIR, fingerprint, clean=not distributed)
    figures = read_json(DATA_STATS, "tokenize")
    run_id = runs.training_run(params, CHECKPOINT_DIR, resume_from is not None, figures)
    with runs.active(run_id), runs.system_metrics(run_id, resuming=resume_from is not None):
        if params.train.num_processes > 1 and not distributed:
            code = launch_processes(params, run_id)
            if code:
                raise PipelineError(f"train: a torchrun worker failed (exit status {code}); see its output above")
            return
        finish(run_id, train(params, run_id, resume_from=resume_from))


if __name__ == "__main__":
    run_cli(main)
