"""The pydantic models of params.yaml: the only place the pipeline's settings are parsed and checked.

`load_params()` turns any problem into one `PipelineError` line that names the key, e.g.
`params.yaml: train.learning_rate: must be greater than 0 (got 0)`.

Longer than the house's ~300 lines on purpose: every section of params.yaml is declared here, next to the loader
that reads it, because this file is the one source of each key's type, default, bounds and description (the
reference and the JSON Schema in docs/reference/ are generated from it).
"""

from __future__ import annotations

import copy
import hashlib
import posixpath
import re
import reprlib
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from tasks.plumbing.errors import PipelineError
from tasks.plumbing.paths import TASK_DATA_DIR
from tasks.plumbing.specials import EOS, SEP, UNK

PARAMS_FILE = Path("params.yaml")
# tokenizer.framing: auto, then the conventions tasks/data/framing.py defines (the same names, in that order)
FRAMING_CHOICES = ("auto", "eos", "uer", "gpt2-chinese", "chitchat")
CHAR_SPECIALS = (UNK, EOS, SEP)  # the char tokenizer's special tokens, in id order
BYTE_ALPHABET = 256  # byte-level BPE starts from every byte value
GPT2_DEFAULT_POSITIONS = 1024
PARAMS_MAX_BYTES = 1 << 20  # a params file is settings, not data: larger is a mistake or an attack
# GPT-2's activations in transformers' ACT2FN that take no arguments (tests check each is there).
ACTIVATIONS = (
    "gelu_new", "gelu", "gelu_fast", "gelu_pytorch_tanh", "gelu_accurate", "quick_gelu", "relu", "relu2", "relu6",
    "silu", "swish", "mish", "tanh", "sigmoid", "linear",
)  # fmt: skip
# Upper bounds on sizes: far above any model this pipeline trains (GPT-3 175B: 96 layers of 12288), low enough
# that a typo (an extra 0) or a hostile value is refused with the params instead of exhausting memory later.
MAX_LAYERS = 256
MAX_WIDTH = 65_536  # n_embd, n_inner
MAX_POSITIONS = 131_072  # n_positions, block_size, max_new_tokens
MAX_VOCAB = 1 << 20
MAX_STEPS = 100_000_000
MAX_BATCH = 65_536
MAX_NODES = 4096
# Settings that change how fast a stage runs, never what it writes (its outputs are the same bytes for any): no
# stage lists them among its DVC params, so changing one reruns nothing (tests/unit/test_dvc_yaml.py checks).
SPEED_ONLY = ("data.workers", "data.executor", "data.ray_address")


def short(value: Any) -> str:
    """A bad value as an error line shows it: a few items and characters, however large or deep the value is."""
    shown = reprlib.Repr()
    shown.maxlevel, shown.maxlist, shown.maxtuple, shown.maxdict = 2, 3, 3, 3
    shown.maxstring = shown.maxother = 30
    return shown.repr(value)


class Section(BaseModel):
    """A params.yaml section: unknown keys are errors, values are not coerced across types."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class DataParams(Section):
    sources: list[str] = Field(
        default_factory=lambda: ["data/samples/tinyshakespeare.txt"],
        min_length=1,
        description="paths, globs or hf:<dataset>[:<config>], project-relative",
    )
    text_field: str | list[str] = Field(
        "text", description="record field(s) holding the text (JSON, CSV, Parquet); several are joined by lines"
    )
    validation_sources: list[str] = Field(
        default_factory=list,
        description="files held out whole for validation (run_clm's validation_file); []: a share of data.sources",
    )
    validation_fraction: float = Field(
        0.1, gt=0, lt=1, description="share of records held out for validation (without validation_sources)"
    )
    seed: int = Field(0, description="seeds the split: a record's side depends only on its text and this")
    min_chars: int = Field(1, ge=0, description="records shorter than this (after normalizing) are dropped")
    format: Literal["text", "dialog"] = Field("text", description="dialog: each record is a list of turns")
    allow_outside_project: bool = Field(
        False, description="read sources (and promote.eval_path) outside the project; the files read are logged"
    )
    max_record_bytes: int = Field(
        16 << 20, ge=1024, le=1 << 30, description="longest record: a JSONL line, an item of a .json list"
    )
    hub_records: int | None = Field(None, gt=0, description="records read from each hf: source; null: all")
    shard_mb: int = Field(
        64, ge=1, le=4096, description="input read as one unit, and so the size of each prepared shard, in MB"
    )
    workers: int = Field(
        0, ge=0, le=1024, description="cores ingest and tokenize use; 0: every core (same outputs for any)"
    )
    executor: Literal["local", "ray"] = Field(
        "local", description="local: this machine's cores; ray: a Ray cluster's (pip install 'gpt2-pipeline[ray]')"
    )
    ray_address: str | None = Field(
        None, max_length=256, description="the Ray cluster for executor ray (host:port, auto); null: RAY_ADDRESS"
    )


class TokenizerParams(Section):
    kind: Literal["bpe", "char", "pretrained"] = Field(
        "bpe", description="bpe: byte-level BPE; char: one token a character; pretrained: model.name_or_path's"
    )
    framing: Literal[FRAMING_CHOICES] = Field(  # type: ignore[valid-type]
        "auto", description="special tokens around each record: the model family's convention (tasks/data/framing.py)"
    )
    vocab_size: int = Field(4096, gt=0, le=MAX_VOCAB, description="tokens the trained tokenizer may hold at most")
    min_frequency: int = Field(2, ge=1, description="a merge (bpe) or character (char) must occur this often")
    block_size: int = Field(128, ge=2, le=MAX_POSITIONS, description="tokens per training sequence")


# model.config's defaults: the small model params.yaml ships, trained in minutes on a CPU (not GPT2Config's 124M)
# and initializer_range, which the study in params/recipe-search.yaml chose with train's schedule (docs/training.md)
SCRATCH_DEFAULTS = {
    "n_layer": 4,
    "n_head": 4,
    "n_embd": 128,
    "n_positions": 128,
    "dropout": 0.0,
    "initializer_range": 0.038,
}


class GPT2ConfigParams(Section):
    """model.config: the GPT2Config fields a user may set.

    model.config: the GPT2Config fields a user may set, typed and bounded, plus `dropout`, which sets the three
    dropout rates at once. A model from scratch takes this section's values (SCRATCH_DEFAULTS for a key left out); a
    pretrained one only the keys params.yaml sets to a value. Only those reach MLflow's params."""

    n_layer: int = Field(SCRATCH_DEFAULTS["n_layer"], gt=0, le=MAX_LAYERS, description="transformer blocks")
    n_head: int = Field(SCRATCH_DEFAULTS["n_head"], gt=0, le=MAX_LAYERS, description="attention heads a block")
    n_embd: int = Field(SCRATCH_DEFAULTS["n_embd"], gt=0, le=MAX_WIDTH, description="width; a multiple of n_head")
    n_positions: int = Field(
        SCRATCH_DEFAULTS["n_positions"], gt=0, le=MAX_POSITIONS, description="longest sequence (>= block_size)"
    )
    n_inner: int | None = Field(None, gt=0, le=MAX_WIDTH, description="MLP width; null: 4 x n_embd")
    activation_function: Literal[ACTIVATIONS] | None = Field(  # type: ignore[valid-type]
        None, description="the MLP's activation; null: GPT2Config's (gelu_new)"
    )
    resid_pdrop: float | None = Field(None, ge=0, lt=1, description="dropout after attention and MLP; null: dropout")
    embd_pdrop: float | None = Field(None, ge=0, lt=1, description="dropout on the embeddings; null: dropout")
    attn_pdrop: float | None = Field(None, ge=0, lt=1, description="dropout on attention weights; null: dropout")
    dropout: float | None = Field(
        SCRATCH_DEFAULTS["dropout"], ge=0, lt=1, description="the three dropout rates at once (0 for pretraining)"
    )
    layer_norm_epsilon: float | None = Field(None, gt=0, le=1, description="null: GPT2Config's (1e-5)")
    initializer_range: float | None = Field(
        SCRATCH_DEFAULTS["initializer_range"], gt=0, le=1, description="weights' init std; null: GPT2Config's (0.02)"
    )
    scale_attn_weights: bool | None = Field(None, description="divide attention scores by sqrt(head width)")
    scale_attn_by_inverse_layer_idx: bool | None = Field(None, description="also by 1 / (layer index + 1)")
    reorder_and_upcast_attn: bool | None = Field(None, description="attention scores in fp32 under autocast")
    tie_word_embeddings: bool | None = Field(None, description="the LM head shares the token embeddings")

    @model_validator(mode="wrap")
    @classmethod
    def _only_mappings(cls, value: Any, handler):
        if not isinstance(value, dict):
            raise ValueError("must be a mapping of GPT2Config fields, e.g. {n_layer: 4}")
        return handler(value)

    @model_serializer(mode="wrap")
    def _set_keys_only(self, handler) -> dict[str, Any]:
        dumped = handler(self)
        # null means "not set" (GPT2Config's or the checkpoint's value), as a key left out does
        return {
            key: dumped[key]
            for key in type(self).model_fields
            if key in self.model_fields_set and dumped[key] is not None
        }

    def overrides(self, scratch: bool = False) -> dict[str, Any]:
        """As GPT2Config takes them.

        The keys params.yaml sets to a value (null keeps the checkpoint's), and for a model from scratch every
        value this section has (its defaults for the keys left out)."""
        if not scratch:
            return self.model_dump()
        return {name: value for name in type(self).model_fields if (value := getattr(self, name)) is not None}


class ModelParams(Section):
    init: Literal["scratch", "pretrained"] = Field(
        "scratch", description="scratch: a GPT2Config from model.config; pretrained: from_pretrained(name_or_path)"
    )
    name_or_path: str = Field(
        "gpt2", description="for init pretrained: a hub id, a save_pretrained folder or models:/<name>@<alias>"
    )
    config: GPT2ConfigParams = Field(default_factory=GPT2ConfigParams, description="GPT2Config values")

    def gpt2_config(self) -> dict[str, Any]:
        """model.config as GPT2Config takes it for this init (see GPT2ConfigParams.overrides)."""
        return self.config.overrides(scratch=self.init == "scratch")


# GPT-2's Conv1D layers that LoRA can adapt: attention's qkv (c_attn) and output (c_proj, a name the MLP's output
# shares), the MLP's input (c_fc). Not lm_head: the training loss reads its weight directly (tasks/training/loss.py).
LORA_TARGETS = ("c_attn", "c_proj", "c_fc")


class LoraParams(Section):
    """train.lora: peft's low-rank adapters, for train.method: lora."""

    rank: int = Field(8, gt=0, le=MAX_WIDTH, description="the rank r of each adapter (two matrices of r x width)")
    alpha: float = Field(16.0, gt=0, description="the adapters' update is scaled by alpha / rank")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapters' input")
    target_modules: list[Literal[LORA_TARGETS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(LORA_TARGETS),
        min_length=1,
        description="GPT-2's layers that get adapters (c_proj: attention's output and the MLP's)",
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def gpt2_layers(cls, value: Any) -> Any:
        if isinstance(value, list):
            unknown = [name for name in value if name not in LORA_TARGETS]
            if unknown:
                raise ValueError(f"{short(unknown[0])} is not a GPT-2 layer LoRA adapts; use {', '.join(LORA_TARGETS)}")
            if len(set(value)) < len(value):
                raise ValueError("names a layer twice")
        return value


class TrainParams(Section):
    method: Literal["full", "lora"] = Field(
        "full",
        description="full: every weight trains; lora: adapters (train.lora) on frozen weights, merged at the end",
    )
    max_steps: int = Field(800, le=MAX_STEPS, description="optimizer steps; -1 trains for `epochs` instead")
    epochs: float = Field(1.0, gt=0, description="passes over the data when max_steps is -1")
    batch_size: int = Field(16, gt=0, le=MAX_BATCH, description="sequences a step, per process")
    grad_accum: int = Field(1, gt=0, le=MAX_BATCH, description="micro-batches accumulated into one step")
    learning_rate: float = Field(3e-3, gt=0, description="AdamW's peak learning rate")
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = Field(
        "cosine", description="the learning rate after warmup"
    )
    warmup_steps: int = Field(150, ge=0, le=MAX_STEPS, description="steps of linear warmup from 0")
    weight_decay: float = Field(0.12, ge=0, description="AdamW's decoupled weight decay")
    max_grad_norm: float = Field(2.0, gt=0, description="gradients clipped to this norm")
    seed: int = Field(42, description="seeds initialization, data order and dropout")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present, else the CPU")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on a GPU that has it; on the CPU bf16 with native bf16 and n_embd >= 256"
    )
    logging_steps: int = Field(20, gt=0, le=MAX_STEPS, description="steps between logged training losses")
    eval_steps: int = Field(200, gt=0, le=MAX_STEPS, description="steps between validation losses")
    checkpoint_every: int = Field(
        200, gt=0, le=MAX_STEPS, description="steps between resumable checkpoints; a multiple of eval_steps"
    )
    keep_checkpoints: int = Field(2, gt=0, le=1000, description="checkpoints kept in checkpoints/train")
    early_stopping_patience: int | None = Field(None, gt=0, description="evaluations without improvement; null: never")
    num_processes: int = Field(1, gt=0, le=1024, description="> 1 runs data-parallel under torchrun (per node)")
    nodes: int = Field(1, gt=0, le=MAX_NODES, description="> 1: torchrun across nodes, one c10d rendezvous")
    rendezvous: str | None = Field(
        None, description="host:port where the nodes meet; null: the scheduler's (PET_RDZV_ENDPOINT or MASTER_ADDR)"
    )
    torch_compile: bool = Field(False, description="compile the model with torch.compile (GPUs gain most)")
    loss_kernel: Literal["chunked", "cut_cross_entropy"] = Field(
        "chunked",
        description="the loss: chunk by chunk, or cut-cross-entropy's fused kernel on CUDA (the CPU: chunked)",
    )
    fp8_lm_head: bool = Field(
        False, description="the output projection in FP8 (torchao; GPUs of compute capability 8.9+)"
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations: less memory, more time")
    dataloader_workers: int = Field(0, ge=0, le=256, description="processes that feed batches; 0: the main one")
    check_memory: bool = Field(
        True, description="refuse a model whose estimated training memory exceeds the machine's (or the GPU's)"
    )
    lora: LoraParams = Field(default_factory=LoraParams, description="the adapters of train.method: lora")

    @field_validator("rendezvous")
    @classmethod
    def host_and_port(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9_.\-\[\]:]+:[0-9]{1,5}", value):
            raise ValueError("must be host:port, as node-0.train:29500 or 10.0.0.5:29500")
        return value

    @field_validator("max_steps")
    @classmethod
    def steps_or_epochs(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError(f"must be a positive number of steps, or -1 to train for `epochs` (got {value})")
        return value


class GenerationParams(Section):
    max_new_tokens: int = Field(64, gt=0, le=MAX_POSITIONS, description="tokens generated after the prompt")
    temperature: float = Field(0.8, ge=0, description="0: greedy")
    top_k: int = Field(50, ge=0, le=MAX_VOCAB, description="sample among the k likeliest tokens; 0: all")
    top_p: float = Field(0.95, gt=0, le=1, description="sample among the likeliest tokens holding this mass")
    repetition_penalty: float = Field(1.0, gt=0, description="> 1 discourages repeating tokens")
    seed: int = Field(0, description="the same seed and settings give the same text")


MAX_TASKS = 32
TASK_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class BenchmarkTask(Section):
    """One lm-evaluation-harness task that evaluate scores the model on."""

    name: str = Field(
        ..., pattern=TASK_NAME, max_length=100, description="an lm-evaluation-harness task (`lm-eval ls tasks`)"
    )
    data: str | None = Field(
        None, description="folder of its split files (<split>.jsonl, under data/tasks); null: data/tasks/<name>"
    )
    limit: int | None = Field(None, ge=1, le=1_000_000, description="examples scored, the split's first; null: all")
    num_fewshot: int = Field(0, ge=0, le=32, description="solved examples shown before each one")

    @field_validator("data")
    @classmethod
    def under_task_data(cls, value: str | None) -> str | None:
        # The evaluate stage depends on data/tasks in dvc.yaml: data elsewhere would change unseen by dvc repro.
        if value is not None and not posixpath.normpath(value).startswith(f"{TASK_DATA_DIR}/"):
            raise ValueError(f"must be a folder under {TASK_DATA_DIR}/ (the evaluate stage's data), got {value!r}")
        return value

    @property
    def folder(self) -> Path:
        return Path(self.data) if self.data else TASK_DATA_DIR / self.name


class EvaluateParams(Section):
    batch_size: int = Field(32, gt=0, le=MAX_BATCH, description="sequences scored at once")
    prompts: list[str] = Field(
        default_factory=lambda: ["ROMEO:", "First Citizen:"], description="sample generations, logged to MLflow"
    )
    generation: GenerationParams = Field(
        default_factory=GenerationParams, description="how samples are generated (and the served model's defaults)"
    )
    stride: int | None = Field(None, gt=0, description="sliding-window step; null: block_size (no overlap)")
    tasks: list[BenchmarkTask] = Field(
        default_factory=list,
        max_length=MAX_TASKS,
        description="benchmark tasks scored through lm-evaluation-harness (pip install 'gpt2-pipeline[eval]')",
    )

    @field_validator("tasks")
    @classmethod
    def distinct_tasks(cls, value: list[BenchmarkTask]) -> list[BenchmarkTask]:
        names = [task.name for task in value]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"{', '.join(repeated)} listed more than once")
        return value


# What MLflow's registry and tracking store accept (mlflow/utils/validation.py, the SQL stores' column sizes),
# checked with the params so a bad name is refused before any work, not at register after training.
MAX_MODEL_NAME = 256
MAX_EXPERIMENT_NAME = 500


def _printable_name(value: str, limit: int) -> str:
    if value != value.strip() or not value.isprintable():
        raise ValueError(f"must not start or end with spaces nor hold control characters (got {value!r})")
    if len(value) > limit:
        raise ValueError(f"must be at most {limit} characters (got {len(value)})")
    return value


class RegisterParams(Section):
    model_name: str = Field("gpt2-lm", min_length=1, description="the registered model's name in MLflow")

    @field_validator("model_name")
    @classmethod
    def registry_name(cls, value: str) -> str:
        # MLflow refuses '/' and ':' and path-like names; '@' would split models:/<name>@<alias> in two.
        if any(char in value for char in "/:@") or posixpath.normpath(value) != value or value.startswith("."):
            raise ValueError(f"must be a plain name without '/', ':', '@' or a leading '.', as gpt2-lm (got {value!r})")
        return _printable_name(value, MAX_MODEL_NAME)


# The figures promotion measures both models by on the same text (tasks/promote.py), lower better; a gate rule
# may also name `<task>/<metric>` of a task evaluate.tasks lists (tasks/evaluation/harness.py).
TEXT_METRICS = ("bits_per_byte", "bits_per_char", "perplexity", "eval_loss")
MAX_RULES = 32


class GateRule(Section):
    """One condition the challenger must meet against @champion to be promoted."""

    metric: str = Field(
        ..., max_length=200, description="bits_per_byte, perplexity, ... or <task>/<metric> of evaluate.tasks"
    )
    require: Literal["improve", "not_worse"] = Field(
        "improve", description="improve: better by more than margin; not_worse: worse by at most margin"
    )
    margin: float = Field(0.0, ge=0, le=1e6, description="in the unit below; improve also needs a change above 0")
    unit: Literal["fraction", "absolute", "stderr"] = Field(
        "fraction", description="of the champion's value; as is; standard errors of the difference (tasks)"
    )

    @model_validator(mode="after")
    def known_metric(self) -> GateRule:
        task, _, metric = self.metric.partition("/")
        if not metric and self.metric not in TEXT_METRICS:
            raise ValueError(f"metric {self.metric!r}: one of {', '.join(TEXT_METRICS)}, or <task>/<metric>")
        if metric and not (re.fullmatch(TASK_NAME, task) and re.fullmatch(r"[A-Za-z0-9_]+", metric)):
            raise ValueError(f"metric {self.metric!r}: a task's is <task>/<metric>, as hellaswag/acc_norm")
        if self.unit == "stderr" and not metric:
            raise ValueError(f"{self.metric}: unit stderr is for a task's metric (the harness gives its error)")
        return self


class PromoteParams(Section):
    gate: list[GateRule] = Field(
        default_factory=lambda: [GateRule(metric="bits_per_byte", require="improve", margin=0.01, unit="fraction")],
        min_length=1,
        max_length=MAX_RULES,
        description="rules the challenger must all meet; by default 1% fewer bits per byte than @champion",
    )

    @model_validator(mode="before")
    @classmethod
    def former_threshold(cls, data: Any) -> Any:
        if isinstance(data, dict) and "min_improvement" in data:
            margin = data["min_improvement"]
            raise ValueError(
                f"min_improvement is now a rule of promote.gate: write gate: [{{metric: bits_per_byte, "
                f"require: improve, margin: {margin}}}]"
            )
        return data

    eval_path: str | None = Field(
        None, description="a prepared-style JSONL file, or a folder of them, to score on; null: the validation split"
    )


class MlflowParams(Section):
    experiment: str = Field("gpt2-pipeline", min_length=1, description="the MLflow experiment the runs go to")

    @field_validator("experiment")
    @classmethod
    def experiment_name(cls, value: str) -> str:
        return _printable_name(value, MAX_EXPERIMENT_NAME)


# The params a sweep trial may change: what makes the model it trains and evaluates.
SWEEPABLE_SECTIONS = ("data", "tokenizer", "model", "train")
# metrics/eval.json's figures a sweep may optimize (tasks/evaluate.py writes them).
OBJECTIVES = ("bits_per_byte", "bits_per_char", "perplexity", "eval_loss")
MAX_TRIALS = 100_000
TRIAL_CONTEXT = "sweep_trial"
Scalar = str | int | float | bool | None


class Distribution(Section):
    """How a sweep samples one params key: Optuna's float (uniform or log), int (with a step) or categorical."""

    type: Literal["float", "int", "categorical"] = Field(description="float, int or categorical")
    low: int | float | None = Field(None, description="float and int: the smallest value")
    high: int | float | None = Field(None, description="float and int: the largest value")
    log: bool = Field(False, description="float and int: sample on a log scale (learning rates)")
    step: int | float | None = Field(None, gt=0, description="float and int: values low, low + step, ...")
    choices: list[Scalar] | None = Field(None, min_length=1, description="categorical: the values to try")

    @model_validator(mode="after")
    def a_range(self) -> Distribution:
        if self.type == "categorical":
            if self.choices is None or self.low is not None or self.high is not None:
                raise ValueError("categorical takes choices (a list of values), not low and high")
            if len({repr(choice) for choice in self.choices}) < len(self.choices):
                raise ValueError(f"choices repeat a value ({short(self.choices)})")
            return self
        if self.choices is not None or self.low is None or self.high is None:
            raise ValueError(f"{self.type} takes low and high, not choices")
        if self.type == "int" and not all(isinstance(v, int) for v in (self.low, self.high, self.step or 1)):
            raise ValueError(f"int takes whole numbers for low, high and step (got {self.low}, {self.high})")
        if not self.low < self.high:
            raise ValueError(f"low must be below high, an empty range otherwise (got {self.low} and {self.high})")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("log needs low > 0 and no step")
        return self

    def values(self) -> list[Scalar]:
        """The values that bound this distribution: each must be a value its key accepts."""
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]


def _default_space() -> dict[str, Distribution]:
    """The optimizer's settings: a search that fits any recipe (a model's shape belongs to a recipe's own space)."""
    return {
        "train.learning_rate": Distribution(type="float", low=5e-4, high=1e-2, log=True),
        "train.warmup_steps": Distribution(type="int", low=0, high=200, step=50),
        "train.weight_decay": Distribution(type="float", low=0.0, high=0.1),
    }


class SweepParams(Section):
    study: str = Field("sweep", min_length=1, description="the Optuna study's name in its storage")
    storage: str | None = Field(
        None,
        max_length=1024,
        description="null: sweeps.db (SQLite) in the project; postgresql://... for workers on many machines",
    )
    space: dict[str, Distribution] = Field(
        default_factory=_default_space, description="params key (data, tokenizer, model, train) -> distribution"
    )
    objective: Literal[OBJECTIVES] = Field("bits_per_byte", description="the metrics/eval.json figure to optimize")
    direction: Literal["minimize", "maximize"] = Field("minimize", description="lower or higher is better")
    trials: int = Field(20, gt=0, le=MAX_TRIALS, description="trials the study holds when done, all workers together")
    timeout_minutes: float | None = Field(None, gt=0, description="no new trial after this long; null: no limit")
    sampler: Literal["tpe", "random"] = Field("tpe", description="Optuna's sampler")
    seed: int | None = Field(0, description="seeds the sampler; null: a different sequence each time")
    pruner: Literal["median", "successive_halving", "hyperband", "none"] = Field(
        "median", description="stops a trial whose validation loss trails the others at the same step"
    )
    startup_trials: int = Field(2, ge=0, le=MAX_TRIALS, description="trials that finish before any is pruned")

    @field_validator("study")
    @classmethod
    def study_name(cls, value: str) -> str:
        # the study's trials are DVC experiments named <study>-<number>: a git ref name
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}", value):
            raise ValueError("must be letters, digits, '-' or '_' (at most 100), as lr-search")
        return value

    @field_validator("space")
    @classmethod
    def some_keys(cls, value: dict[str, Distribution]) -> dict[str, Distribution]:
        if not value:
            raise ValueError("must name at least one params key to search")
        for key in value:
            if key.split(".")[0] not in SWEEPABLE_SECTIONS:
                raise ValueError(
                    f"{key}: a trial searches what makes its model, keys of {', '.join(SWEEPABLE_SECTIONS)}"
                )
        return value


with warnings.catch_warnings():
    # `register` is a stage name (and params section) that pydantic notes also names ABCMeta.register.
    warnings.filterwarnings("ignore", message='Field name "register"')

    class Params(Section):
        data: DataParams = Field(
            default_factory=DataParams, description="ingest: where the text comes from and how it is split"
        )
        tokenizer: TokenizerParams = Field(default_factory=TokenizerParams, description="tokenize: the vocabulary")
        model: ModelParams = Field(default_factory=ModelParams, description="the GPT-2 that train builds")
        train: TrainParams = Field(default_factory=TrainParams, description="train: the optimizer and the run")
        evaluate: EvaluateParams = Field(default_factory=EvaluateParams, description="evaluate: scoring, samples")
        register: RegisterParams = Field(default_factory=RegisterParams, description="register: the MLflow model")
        promote: PromoteParams = Field(default_factory=PromoteParams, description="promote: @champion's bar")
        mlflow: MlflowParams = Field(default_factory=MlflowParams, description="where the runs are recorded")
        sweep: SweepParams = Field(
            default_factory=SweepParams, description="gpt2-pipeline sweep: an Optuna study over params keys"
        )

        @model_validator(mode="after")
        def consistent(self, info: ValidationInfo) -> Params:
            cfg = self.model.gpt2_config()
            if self.model.init == "scratch":
                positions = cfg["n_positions"]
                if self.tokenizer.block_size > positions:
                    raise ValueError(
                        f"tokenizer.block_size: {self.tokenizer.block_size} exceeds model.config.n_positions "
                        f"({positions}); lower block_size or raise n_positions"
                    )
            n_embd, n_head = cfg.get("n_embd", 768), cfg.get("n_head", 12)
            if n_embd % n_head:
                raise ValueError(f"model.config.n_embd ({n_embd}) must be divisible by model.config.n_head ({n_head})")
            if self.train.checkpoint_every % self.train.eval_steps:
                raise ValueError(
                    f"train.checkpoint_every: {self.train.checkpoint_every} must be a multiple of train.eval_steps "
                    f"({self.train.eval_steps}), so that the best evaluated model is always in a checkpoint"
                )
            if self.evaluate.stride and self.evaluate.stride > self.tokenizer.block_size:
                raise ValueError(
                    f"evaluate.stride: {self.evaluate.stride} exceeds tokenizer.block_size "
                    f"({self.tokenizer.block_size}); tokens between windows would never be scored"
                )
            if self.tokenizer.kind != "pretrained" and self.tokenizer.framing not in ("auto", "eos"):
                raise ValueError(
                    f"tokenizer.framing: {self.tokenizer.framing} is the framing of a BERT-vocabulary checkpoint "
                    f"(tokenizer.kind: pretrained); the {self.tokenizer.kind} tokenizer this pipeline trains ends "
                    f"records with {EOS}: use auto or eos"
                )
            if self.tokenizer.kind == "char" and self.tokenizer.vocab_size <= len(CHAR_SPECIALS):
                raise ValueError(
                    f"tokenizer.vocab_size: {self.tokenizer.vocab_size} leaves no room for characters beside "
                    f"the special tokens {', '.join(CHAR_SPECIALS)}"
                )
            if self.tokenizer.kind == "bpe" and self.tokenizer.vocab_size < BYTE_ALPHABET + 2:
                raise ValueError(
                    f"tokenizer.vocab_size: {self.tokenizer.vocab_size} is too small for byte-level BPE; "
                    f"it needs at least {BYTE_ALPHABET + 2} (256 bytes, {EOS} and {SEP})"
                )
            _check_gate(self)
            if not (info.context or {}).get(TRIAL_CONTEXT):  # a trial's values, checked without a search of its own
                _check_space(self)
            return self


def _check_gate(params: Params) -> None:
    """A gate rule on a task's metric names a task that evaluate.tasks scores: the models have nothing else."""
    tasks = {task.name for task in params.evaluate.tasks}
    for index, rule in enumerate(params.promote.gate):
        task, _, metric = rule.metric.partition("/")
        if metric and task not in tasks:
            raise ValueError(
                f"promote.gate.{index}.metric: {rule.metric} names task {task}, which evaluate.tasks does not list; "
                f"add it there ({', '.join(sorted(tasks)) or 'none listed'})"
            )


def _check_space(params: Params) -> None:
    """Every key sweep.space names is a key of the pipeline, and each bound or choice a value it accepts."""
    for key, distribution in params.sweep.space.items():
        *parents, leaf = key.split(".")
        section: Any = params
        for part in parents:
            section = getattr(section, part, None) if part in type(section).model_fields else None
            if not isinstance(section, Section):
                break
        if (
            not isinstance(section, Section)
            or leaf not in type(section).model_fields
            or isinstance(getattr(section, leaf), Section)
        ):
            raise ValueError(f"sweep.space.{key}: not a params key; check its spelling against params.yaml")
        for value in distribution.values():
            trial = params.model_dump(exclude={"sweep"})
            target = trial
            for part in parents:
                target = target.setdefault(part, {})
            target[leaf] = value
            try:
                Params.model_validate(trial, context={TRIAL_CONTEXT: True})
            except ValidationError as exc:
                reason = _describe(exc.errors()[0])
                raise ValueError(f"sweep.space.{key}: {short(value)} is not a value it takes ({reason})") from None


class _AnchorRefused(Exception):
    def __init__(self, anchor: str, line: int):
        super().__init__(f"YAML anchors and aliases (&{anchor}, *{anchor}) are not accepted; write the value out")
        self.line = line


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where `1e-3` is a string; accept it as a float, as YAML 1.2 does.

    Anchors and aliases are refused before any node is built: ten nested aliases to ten items each expand to 10^10
    values (a "billion laughs" bomb) when the params are walked, validated or logged."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise _AnchorRefused(event.anchor, event.start_mark.line + 1)
        return super().compose_node(parent, index)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _describe(error: dict[str, Any]) -> str:
    """One readable line for one pydantic error."""
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key; check its spelling against the documented params"
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "value_error" and not key:
        return message
    return f"{key}: {message.lower()[:1] + message[1:]} (got {short(error.get('input'))})"


def parse_params(raw: Any, source: str = str(PARAMS_FILE)) -> Params:
    """Validate an already loaded params mapping; raise PipelineError with one line on the first problem."""
    if not isinstance(raw, dict):
        raise PipelineError(f"{source}: expected a mapping of sections (data, tokenizer, model, ...)")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise PipelineError(f"{source}: {_describe(exc.errors()[0])}") from None


def _read_yaml(text: str, source: str, lines: bool = True) -> Any:
    """text read by _Loader; a problem is one PipelineError naming source (and the line, for a file)."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506  # nosec B506
    except _AnchorRefused as exc:
        line, problem = exc.line, str(exc)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line, problem = mark.line + 1 if mark else None, f"not valid YAML ({getattr(exc, 'problem', exc)})"
    raise PipelineError(f"{source}{f':{line}' if lines and line else ''}: {problem}") from None


def load_params(path: Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml."""
    try:
        size = path.stat().st_size
        if size > PARAMS_MAX_BYTES:
            raise PipelineError(
                f"{path}: {size:,} bytes is over the {PARAMS_MAX_BYTES:,}-byte limit of a params file; "
                "list data in data.sources instead of writing it into params"
            )
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found; run from the project root, next to dvc.yaml") from None
    return parse_params(_read_yaml(text, str(path)), str(path))


def read_raw(path: Path = PARAMS_FILE) -> dict[str, Any]:
    """params.yaml as a plain mapping, validated first so that a bad file is reported as itself."""
    load_params(path)
    return _read_yaml(path.read_text(encoding="utf-8"), str(path))


def parse_override(text: str) -> tuple[str, Any]:
    """`train.max_steps=5` -> ("train.max_steps", 5): the value is read as YAML, as `dvc exp run -S` does."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise PipelineError(f"override {text!r}: expected KEY=VALUE, for example train.max_steps=200")
    return key.strip(), _read_yaml(value, f"override {key.strip()}", lines=False)


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of raw params with dotted-key overrides set; every key must name a key params.yaml has."""
    merged = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        section = merged
        for depth, part in enumerate(parents):
            section = section.get(part) if isinstance(section, dict) else None
            if not isinstance(section, dict):
                raise PipelineError(f"override {dotted}: {'.'.join(parents[: depth + 1])} is not a section of params")
        if leaf not in section:
            known = ", ".join(sorted(section)) or "none"
            raise PipelineError(f"override {dotted}: unknown key; keys there: {known}")
        section[leaf] = value
    parse_params(merged, source="override")
    return merged


def params_hash(path: Path = PARAMS_FILE) -> str:
    """Short content hash of params.yaml: lineage that says exactly which settings made a model."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def flatten(params: Params) -> dict[str, str]:
    """`{"train.learning_rate": "0.001", ...}`: the MLflow params of a run."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            flat[prefix] = str(value)

    walk("", params.model_dump())
    return flat
