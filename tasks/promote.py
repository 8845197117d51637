"""Promotion: `@champion` moves to `@challenger` only when the challenger is measurably better.

Both models are scored on the same frozen text (the challenger's validation split, or promote.eval_path), each
with its own tokenizer, in bits per byte, which compares models across tokenizers. The decision, both scores
and the threshold are recorded as tags on the challenger's version. A file lock serializes promotions from one
workspace, and the champion is read again inside it, so two promotions at once never leave `@champion` on the
model that lost. Rollback moves `@champion` back to `@previous-champion`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tasks.plumbing.errors import PipelineError
from tasks.plumbing.outputs import inside_project
from tasks.plumbing.params import EvaluateParams, Params
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


def measure(uri: str, texts: list[str], block_size: int, evaluation: EvaluateParams) -> tuple[float, list[dict]]:
    """Bits per byte of a model on texts, and its samples.

    Bits per byte of a model on texts (tokenized with the model's own tokenizer), and its samples for the evaluation
    prompts and seed: what the report shows of each model."""
    # Here, not at the top: a rollback, or a challenger that is already champion, never loads a model, and
    # torch with transformers is most of what this module would otherwise cost to import.
    import torch

    from tasks.data.blocks import encode_and_group
    from tasks.evaluate import sample, score
    from tasks.tracking.loading import load_pretrained

    model, tokenizer = load_pretrained(uri, key=uri)
    block = min(block_size, model.config.n_positions)
    blocks = {key: torch.tensor(value) for key, value in encode_and_group({"text": texts}, tokenizer, block).items()}
    if not len(blocks["input_ids"]):
        raise PipelineError(f"the promotion text is shorter than one block of {block} tokens for {uri}")
    scored = score(model, blocks, block, block, evaluation.batch_size, "cpu").metrics()["bits_per_byte"]
    return scored, sample(model, tokenizer, evaluation.prompts, evaluation.generation)


def decide(
    challenger: float, champion: float | None, min_improvement: float, versus: str = "the champion"
) -> tuple[bool, str]:
    """Whether the challenger is promoted, and the reason in words.

    Promote when there is no champion, or when the challenger's bits per byte are lower by min_improvement (a
    fraction of the champion's); the reason in words, naming the champion as `versus`."""
    if champion is None:
        return True, "no champion yet"
    gain = (champion - challenger) / champion
    needs = f"promotion needs {min_improvement:.2%} fewer"
    if gain >= min_improvement:
        return True, f"{gain:.2%} fewer bits per byte than {versus} ({needs})"
    change = f"{gain:.2%} fewer" if gain >= 0 else f"{-gain:.2%} more"
    return False, f"{change} bits per byte than {versus}; {needs}"


def view(uri: str, role: str, texts: list[str], block_size: int, evaluation: EvaluateParams) -> report.ModelView:
    return report.model_view(uri, role, *measure(uri, texts, block_size, evaluation))


@contextmanager
def promotion_lock(path: Path = LOCK_FILE) -> Iterator[None]:
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def promote(
    name: str,
    min_improvement: float,
    text_path: Path,
    block_size: int,
    evaluation: EvaluateParams,
    version: str | None = None,
) -> dict[str, Any]:
    """Compare a challenger with @champion and move @champion when the challenger wins.

    The decision, with the report logged to the challenger's run. The challenger is `version` (a pipeline run's
    promotion judges the version that run registered: @challenger may name another run's by then), else @challenger."""
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
        new = view(f"models:/{name}/{challenger}", CHALLENGER, texts, block_size, evaluation)
        old = view(f"models:/{name}/{champion}", CHAMPION, texts, block_size, evaluation) if champion else None
        promoted, reason = decide(new.bits_per_byte, old.bits_per_byte if old else None, min_improvement)
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
            "min_improvement": min_improvement,
            "eval_text_sha256": text_hash,
        }
        decision["report"] = log_report(new, old, decision)
        tag_version(name, challenger, {f"promotion_{key}": value for key, value in decision.items()})
    return decision


def log_report(challenger: report.ModelView, champion: report.ModelView | None, decision: dict) -> str | None:
    """Log the report to the challenger's run; its artifact URI (None when the version has no run here)."""
    if challenger.run_id is None:
        return None
    path = f"promotion/v{challenger.version}-vs-v{champion.version if champion else 'none'}.html"
    store.client().log_text(challenger.run_id, report.render(champion, challenger, decision), path)
    return f"runs:/{challenger.run_id}/{path}"


def compare(reference: str, candidate: str, params: Params, text_path: Path) -> tuple[str, dict]:
    """The promotion report for any two models, and its decision.

    The promotion report for any two models, the candidate judged against the reference as promotion would judge a
    challenger against the champion; (HTML, decision)."""
    texts = frozen_texts(text_path)
    args = (texts, params.tokenizer.block_size, params.evaluate)
    old, new = view(reference, "A", *args), view(candidate, "B", *args)
    promoted, reason = decide(new.bits_per_byte, old.bits_per_byte, params.promote.min_improvement, versus="A")
    decision = {"promoted": promoted, "reason": reason, "min_improvement": params.promote.min_improvement}
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
