"""Resumable training checkpoints: kept outside the DVC outputs so that a killed train stage resumes.

A checkpoint folder belongs to one set of training settings (its fingerprint): a rerun with other params or
other data starts afresh instead of resuming someone else's optimizer state, and a finished run clears it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from tasks.plumbing.outputs import hash_file
from tasks.plumbing.params import Params
from tasks.plumbing.paths import in_number_order

FINGERPRINT_FILE = "fingerprint.txt"
# The shape of what a checkpoint holds beyond the params: changed when the training model's layout changes, so
# that a checkpoint from before is started afresh rather than resumed into weights of another shape.
# 2: embedding rows padded to a multiple of 128 while training (they were saved padded to 64).
CHECKPOINT_LAYOUT = 2


def fingerprint(params: Params, tokenized_dir: Path) -> str:
    """A hash of everything that shapes the training trajectory.

    Model, train and tokenizer params and the training blocks themselves."""
    digest = hashlib.sha256()
    settings = {
        "model": params.model.model_dump(),
        "train": params.train.model_dump(),
        "tokenizer": params.tokenizer.model_dump(),
        "layout": CHECKPOINT_LAYOUT,
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for arrow in in_number_order((tokenized_dir / "train").glob("*.arrow")):
        hash_file(digest, arrow)
    return digest.hexdigest()


def last_checkpoint(folder: Path) -> str | None:
    """The complete checkpoint-N folder with the highest N, or None.

    The Trainer writes trainer_state.json last: a checkpoint killed while being written lacks it (or holds half
    of it) and is passed over for the one before.
    """
    steps = sorted(
        (int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*") if p.name.split("-")[1].isdigit()),
        reverse=True,
    )
    for step in steps:
        try:
            json.loads((folder / f"checkpoint-{step}" / "trainer_state.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        return str(folder / f"checkpoint-{step}")
    return None


def prepare(folder: Path, print_: str, clean: bool = True) -> str | None:
    """The checkpoint to resume from when the folder holds checkpoints of the same settings.

    Otherwise (with clean) empty the folder and mark it with these settings."""
    marker = folder / FINGERPRINT_FILE
    if marker.exists() and marker.read_text().strip() == print_:
        return last_checkpoint(folder)
    if clean:
        clear(folder)
        folder.mkdir(parents=True)
        marker.write_text(print_ + "\n")
    return None


def clear(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
