"""Optuna's pruner that sweep.pruner names, for the sweep's study and a trial's training alike.

The training asks it whether to stop (tasks.training.pruning); the sweep's sampler reads it too (a hyperband
pruner's brackets). Apart from pruning.py so that the sweep's process builds it without importing transformers.
"""

from __future__ import annotations


def study_pruner(kind: str, startup_trials: int):
    """The pruner: median (after startup_trials finished trials), successive halving, hyperband, or none."""
    import optuna

    kinds = {
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=startup_trials),
        "successive_halving": lambda: optuna.pruners.SuccessiveHalvingPruner(),
        "hyperband": lambda: optuna.pruners.HyperbandPruner(),
        "none": lambda: optuna.pruners.NopPruner(),
    }
    return kinds[kind]()
