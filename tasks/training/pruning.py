"""A sweep trial's training reports its validation loss to the Optuna trial, which may stop it early (pruning).

Used only when `gpt2-pipeline sweep` runs the stage (tasks.tracking.lineage.SWEEP_TRIAL_ENV names the trial, its
storage and sweep.pruner); a pruned training raises TrialPruned, so the stage exits with PRUNED_EXIT and writes no
model.
"""

from __future__ import annotations

from transformers import TrainerCallback

from tasks.plumbing.errors import PipelineError, TrialPruned
from tasks.tracking.lineage import sweep_trial
from tasks.training.pruners import study_pruner


class ReportToTrial(TrainerCallback):
    """Each evaluation's eval_loss, at its step, to the trial; stop when the study's pruner says so."""

    def __init__(self, trial, study: str):
        self.trial, self.study = trial, study

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")
        if loss is None or not state.is_world_process_zero:
            return
        self.trial.report(loss, state.global_step)
        if self.trial.should_prune():
            raise TrialPruned(
                f"train: pruned at step {state.global_step} by sweep {self.study}: its validation loss {loss:.4f} "
                "trails the other trials' at this step; no model was written"
            )


def trial_reporter() -> ReportToTrial | None:
    """The callback for the sweep trial this stage runs for, or None outside a sweep."""
    trial = sweep_trial()
    if trial is None:
        return None
    try:
        import optuna
    except ImportError:
        raise PipelineError("train: a sweep trial needs Optuna: pip install 'gpt2-pipeline[sweep]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Without its pruner, load_study gives Optuna's default (a median pruner after 5 trials), not sweep.pruner.
    pruner = study_pruner(trial["pruner"], trial["startup_trials"])
    study = optuna.load_study(study_name=trial["study"], storage=trial["storage"], pruner=pruner)
    return ReportToTrial(optuna.trial.Trial(study, trial["trial_id"]), trial["study"])
