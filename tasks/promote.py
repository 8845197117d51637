"""Promotion: `@champion` moves to `@challenger` only when the challenger meets every rule of promote.gate.

Both models are scored on the same frozen text (the challenger's validation split, or promote.eval_path), each
with its own tokenizer, in bits per byte (which compares models across tokenizers) and perplexity, and on the
benchmark tasks the gate's rules name (evaluate.tasks' settings, through lm-evaluation-harness). Each rule compares
one metric of the two; the decision, both models' figures and each rule's verdict are recorded as tags on the
challenger's version and in the report. A file lock serializes promotions from one
workspace, and the champion is read again inside it, so two promotions at once never leave `@champion` on the
model that lost. Rollback moves `@champion` back to `@previous-champion`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.plumbing.errors import PipelineError
from tasks.plumbing.outputs import inside_project
from tasks.plumbing.params import TEXT_METRICS, BenchmarkTask, EvaluateParams, GateRule, Params
from tasks.plumbing.paths import PREPARED_DIR, in_number_order
from tasks.tracking import report, store
from tasks.tracking.registry import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS,
    alias_version,
    describe_champion,
    set_alias,
    tag_version,
)

LOCK_FILE = Path(".promote.lock")
DEFAULT_TEXT = PREPARED_DIR / "validation"  # its shards


def text_path(params: Params, root: Path = Path()) -> Path:
    """The text promotion scores on.

    promote.eval_path, or the validation split, in the project at root; a path outside the project only where
    data.allow_outside_project says so."""
    path = root / (params.promote.eval_path or DEFAULT_TEXT)
    if not params.data.allow_outside_project:
        inside_project(path, "promote.eval_path", "data.allow_outside_project")
    return path


def frozen_texts(path: Path) -> list[str]:
    """The records of a prepared JSONL file, or of a folder of them such as a split's shards (one {"text": ...} a line).

    The text both models are scored on."""
    if not path.exists():
        raise PipelineError(f"{path}: not found; run the pipeline first or set promote.eval_path")
    files = in_number_order(path.glob("*.jsonl")) if path.is_dir() else [path]
    lines = (line for file in files for line in file.read_text(encoding="utf-8").splitlines())
    return [json.loads(line)["text"] for line in lines if line.strip()]


@dataclass
class Measured:
    """What promotion measured of one model: its figures by metric name, which way each is better, its samples."""

    figures: dict[str, float]
    samples: list[dict[str, str]]
    higher_is_better: dict[str, bool] = field(default_factory=dict)  # a task metric's; the text's are lower better


def gate_tasks(params: Params) -> list[BenchmarkTask]:
    """The evaluate.tasks that a gate rule names: the only ones promotion scores."""
    named = {rule.metric.partition("/")[0] for rule in params.promote.gate if "/" in rule.metric}
    return [task for task in params.evaluate.tasks if task.name in named]


def measure(uri: str, texts: list[str], block_size: int, evaluation: EvaluateParams, root: Path = Path()) -> Measured:
    """A model's figures on texts (tokenized with its own tokenizer) and on the gate's tasks, and its samples.

    The text's bits per byte, perplexity..., the tasks' metrics (evaluation.tasks: those the gate names), and
    samples for the evaluation prompts and seed: what the gate and the report read of each model."""
    # Here, not at the top: a rollback, or a challenger that is already champion, never loads a model, and
    # torch with transformers is most of what this module would otherwise cost to import.
    import torch

    from tasks.data.blocks import encode_and_group
    from tasks.evaluate import sample, score
    from tasks.evaluation import harness
    from tasks.tracking.loading import load_pretrained

    model, tokenizer = load_pretrained(uri, key=uri)
    block = min(block_size, model.config.n_positions)
    blocks = {key: torch.tensor(value) for key, value in encode_and_group({"text": texts}, tokenizer, block).items()}
    if not len(blocks["input_ids"]):
        raise PipelineError(f"the promotion text is shorter than one block of {block} tokens for {uri}")
    figures = score(model, blocks, block, block, evaluation.batch_size, "cpu").metrics()
    tasks = harness.evaluate(model, tokenizer, evaluation.tasks, evaluation.batch_size, root)
    samples = sample(model, tokenizer, evaluation.prompts, evaluation.generation)
    return Measured({**figures, **tasks.metrics}, samples, tasks.higher_is_better)


def check_metrics(gate: list[GateRule], measured: Measured) -> None:
    """Every rule's metric is one the model was measured on; else one line, before anything moves."""
    for index, rule in enumerate(gate):
        if rule.metric not in measured.figures:
            task = rule.metric.partition("/")[0]
            has = sorted(key.partition("/")[2] for key in measured.higher_is_better if key.startswith(f"{task}/"))
            raise PipelineError(
                f"promote.gate.{index}.metric: {rule.metric}: the version has no such metric "
                f"({task} gives {', '.join(has) or 'none'}); name one it has"
            )


def verdict(rule: GateRule, challenger: Measured, champion: Measured) -> dict[str, Any]:
    """One rule applied: both values, the change in the rule's unit (positive: better) and whether it is met."""
    new, old = challenger.figures[rule.metric], champion.figures[rule.metric]
    higher = rule.metric not in TEXT_METRICS and challenger.higher_is_better.get(rule.metric, True)
    gain = (new - old) if higher else (old - new)
    if rule.unit == "fraction":
        change = gain / abs(old) if old else math.copysign(math.inf, gain) if gain else 0.0
    elif rule.unit == "stderr":  # the standard error of the difference of two independent estimates
        error = math.hypot(*(m.figures.get(f"{rule.metric}_stderr", 0.0) for m in (challenger, champion)))
        change = gain / error if error else math.copysign(math.inf, gain) if gain else 0.0
    else:
        change = gain
    met = (change >= rule.margin and gain > 0) if rule.require == "improve" else (change >= -rule.margin)
    return {"metric": rule.metric, "champion": old, "challenger": new, "change": change, "met": met,
            "text": describe(rule, old, new, change, met)}  # fmt: skip


def describe(rule: GateRule, old: float, new: float, change: float, met: bool) -> str:
    """A verdict in words: "bits_per_byte 1.9571 → 1.92, 1.90% better (must improve by at least 1.00%): met"."""

    def amount(value: float) -> str:
        if rule.unit == "fraction":
            return f"{value:.2%}"
        return f"{value:.3g} standard errors" if rule.unit == "stderr" else f"{value:.4g}"

    moved = "no change" if change == 0 else f"{amount(abs(change))} {'better' if change > 0 else 'worse'}"
    need = "improve by more than 0" if rule.margin == 0 else f"improve by at least {amount(rule.margin)}"
    if rule.require == "not_worse":
        need = "not be worse" if rule.margin == 0 else f"be worse by at most {amount(rule.margin)}"
    return f"{rule.metric} {old:.4g} → {new:.4g}, {moved} (must {need}): {'met' if met else 'NOT met'}"


def decide(gate: list[GateRule], challenger: Measured, champion: Measured | None) -> tuple[bool, str, list[dict]]:
    """Whether the challenger is promoted, the reason in words, and each rule's verdict.

    Promoted when there is no champion, or when it meets every rule; the reason names the rules not met."""
    if champion is None:
        return True, "no champion yet", []
    verdicts = [verdict(rule, challenger, champion) for rule in gate]
    missed = [v["text"] for v in verdicts if not v["met"]]
    if missed:
        return False, "; ".join(missed), verdicts
    return True, "; ".join(v["text"] for v in verdicts), verdicts


def view(
    uri: str, role: str, texts: list[str], params: Params, root: Path = Path()
) -> tuple[report.ModelView, Measured]:
    evaluation = params.evaluate.model_copy(update={"tasks": gate_tasks(params)})
    measured = measure(uri, texts, params.tokenizer.block_size, evaluation, root)
    check_metrics(params.promote.gate, measured)
    return report.model_view(uri, role, measured.figures, measured.samples), measured


@contextmanager
def promotion_lock(path: Path = LOCK_FILE) -> Iterator[None]:
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def promote(params: Params, text_path: Path, version: str | None = None, root: Path = Path()) -> dict[str, Any]:
    """Compare a challenger with @champion and move @champion when the challenger meets promote.gate.

    The decision, with the report logged to the challenger's run. The challenger is `version` (a pipeline run's
    promotion judges the version that run registered: @challenger may name another run's by then), else @challenger.
    root: the project, whose data/tasks the gate's tasks read."""
    name = params.register.model_name
    texts = frozen_texts(text_path)
    text_hash = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    with promotion_lock():
        challenger = version or alias_version(name, CHALLENGER)
        if challenger is None:
            raise PipelineError(f"{name} has no @{CHALLENGER}; run the pipeline to register one")
        champion = alias_version(name, CHAMPION)
        if champion == challenger:
            return {
                "promoted": False,
                "reason": f"version {challenger} is already @{CHAMPION}",
                "challenger_version": challenger,
                "champion_version": champion,
            }
        new, new_measured = view(f"models:/{name}/{challenger}", CHALLENGER, texts, params, root)
        old, old_measured = (
            view(f"models:/{name}/{champion}", CHAMPION, texts, params, root) if champion else (None, None)
        )
        promoted, reason, verdicts = decide(params.promote.gate, new_measured, old_measured)
        if promoted:
            if champion:
                set_alias(name, PREVIOUS, champion)
            set_alias(name, CHAMPION, challenger)
            describe_champion(name, challenger)
        decision = {
            "promoted": promoted,
            "reason": reason,
            "challenger_version": challenger,
            "champion_version": champion,
            "challenger_bits_per_byte": new.bits_per_byte,
            "champion_bits_per_byte": old.bits_per_byte if old else None,
            "eval_text_sha256": text_hash,
            "gate": verdicts,
        }
        decision["report"] = log_report(new, old, decision)
        tag_version(name, challenger, version_tags(decision))
    return decision


def version_tags(decision: dict[str, Any]) -> dict[str, object]:
    """The decision as the challenger's version tags: promotion_<key>, and each rule's verdict as promotion_rule_<n>."""
    tags = {f"promotion_{key}": value for key, value in decision.items() if key != "gate"}
    tags.update({f"promotion_rule_{index}": v["text"] for index, v in enumerate(decision["gate"], 1)})
    return tags


def log_report(challenger: report.ModelView, champion: report.ModelView | None, decision: dict) -> str | None:
    """Log the report to the challenger's run; its artifact URI (None when the version has no run here)."""
    if challenger.run_id is None:
        return None
    path = f"promotion/v{challenger.version}-vs-v{champion.version if champion else 'none'}.html"
    store.client().log_text(challenger.run_id, report.render(champion, challenger, decision), path)
    return f"runs:/{challenger.run_id}/{path}"


def compare(reference: str, candidate: str, params: Params, text_path: Path, root: Path = Path()) -> tuple[str, dict]:
    """The promotion report for any two models, and its decision.

    The promotion report for any two models, the candidate judged against the reference by promote.gate as
    promotion would judge a challenger against the champion; (HTML, decision)."""
    texts = frozen_texts(text_path)
    (old, old_measured), (new, new_measured) = (
        view(uri, role, texts, params, root) for uri, role in ((reference, "A"), (candidate, "B"))
    )
    promoted, reason, verdicts = decide(params.promote.gate, new_measured, old_measured)
    decision = {"promoted": promoted, "reason": reason, "gate": verdicts}
    return report.render(old, new, decision), decision


def rollback(name: str) -> dict[str, str]:
    """Move @champion back to @previous-champion."""
    with promotion_lock():
        previous = alias_version(name, PREVIOUS)
        current = alias_version(name, CHAMPION)
        if previous is None:
            raise PipelineError(f"{name} has no @{PREVIOUS} to roll back to")
        set_alias(name, CHAMPION, previous)
        describe_champion(name, previous)
        store.client().delete_registered_model_alias(name, PREVIOUS)
        if current:
            tag_version(name, current, {"rolled_back_from_champion": "true"})
    return {"champion_version": previous, "replaced_version": current or ""}
