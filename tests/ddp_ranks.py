"""Run under torchrun in a trained project: the train stage's own train(), with a callback that records a digest
of each rank's weights before training and after every optimizer step, written to <folder>/<rank>.json.

Usage: python -m torch.distributed.run --standalone --nproc-per-node=2 tests/ddp_ranks.py <folder>
(tests/integration/test_training.py compares the ranks' digests)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import transformers

from tasks import runs
from tasks.params import load_params
from tasks.train import train


class RankWeights(transformers.TrainerCallback):
    def __init__(self, folder: Path):
        self.folder, self.digests = folder, {}

    def record(self, step: int, model) -> None:
        digest = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
        self.digests[str(step)] = digest.hexdigest()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.record(0, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.record(state.global_step, model)

    def on_train_end(self, args, state, control, **kwargs):
        self.folder.mkdir(exist_ok=True)
        (self.folder / f"{os.environ['RANK']}.json").write_text(json.dumps(self.digests))


def with_rank_weights(folder: Path) -> None:
    """Every Trainer made from here on also runs RankWeights (train() builds its Trainer when called)."""
    original = transformers.Trainer.__init__

    def init(self, *args, callbacks=None, **kwargs):
        original(self, *args, callbacks=[*(callbacks or []), RankWeights(folder)], **kwargs)

    transformers.Trainer.__init__ = init


if __name__ == "__main__":
    with_rank_weights(Path(sys.argv[1]))
    params = load_params()
    if os.environ["RANK"] == "0":  # only rank 0 logs, here to a run of its own
        run_id = runs.create_run(params)
        with runs.active(run_id):
            train(params, run_id)
    else:
        train(params, "")
