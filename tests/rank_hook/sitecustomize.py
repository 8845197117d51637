"""Loaded by every Python process whose PYTHONPATH starts with this folder (tests/integration/test_training.py sets
it for the train stages it starts): in a process that torchrun started (RANK set), the train stage's own Trainer
also records its rank's weights and blocks to $RECORD_RANKS_TO (rank_records.py, beside this file). Other
processes (DVC, the stage's launcher) import nothing more."""

import os

if os.environ.get("RANK") is not None and os.environ.get("RECORD_RANKS_TO"):
    from pathlib import Path

    from rank_records import with_rank_weights

    with_rank_weights(Path(os.environ["RECORD_RANKS_TO"]))
