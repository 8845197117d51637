"""What each data-parallel rank did, recorded from inside the train stage's own Trainer: a digest of its weights
before training and after every optimizer step, and of the blocks it trained on at each step, written to
<folder>/<global rank>.json as {"weights": {step: digest}, "blocks": {step: digest}}.

sitecustomize.py (beside this file) installs it in the ranks of a train stage that a test starts;
tests/integration/test_training.py compares the ranks' records."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import transformers


def digest(tensors: dict) -> str:
    found = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        found.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    return found.hexdigest()


class RankWeights(transformers.TrainerCallback):
    def __init__(self, folder: Path):
        self.folder, self.seen = folder, {"weights": {}, "blocks": {}}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.seen["weights"]["0"] = digest(model.state_dict())

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.seen["weights"][str(state.global_step)] = digest(model.state_dict())

    def on_train_end(self, args, state, control, **kwargs):
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"{os.environ['RANK']}.json").write_text(json.dumps(self.seen))


def with_rank_weights(folder: Path) -> None:
    """Every Trainer made from here on also records its rank's weights and blocks (the train stage builds its
    Trainer after the interpreter has started)."""
    init, training_step = transformers.Trainer.__init__, transformers.Trainer.training_step
    recorder = RankWeights(folder)

    def recording_init(self, *args, callbacks=None, **kwargs):
        init(self, *args, callbacks=[*(callbacks or []), recorder], **kwargs)

    def recording_step(self, model, inputs, *args, **kwargs):
        recorder.seen["blocks"][str(self.state.global_step + 1)] = digest({"input_ids": inputs["input_ids"]})
        return training_step(self, model, inputs, *args, **kwargs)

    transformers.Trainer.__init__ = recording_init
    transformers.Trainer.training_step = recording_step
