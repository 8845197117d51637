"""A sweep trial's training reports its validation loss to the Optuna trial, which may stop it early (pruning).

Used only when `gpt2-pipeline sweep` runs the stage (tasks.tracking.lineage.SWEEP_TRIAL_ENV names the trial, its
storage and sweep.pruner); a pruned training raises TrialPruned, so the stage exits with PRUNED_EXIT and writes no
model. Under torchrun the first process talks to the study and every process stops at the step it is pruned (one
that stopped alone would leave the others waiting in their next all-reduce); the workers then end as finished, since
torchrun reports any other exit as a failure, and their launcher reads the verdict from the trial (PRUNED_ATTR).
"""

from __future__ import annotations

from transformers import TrainerCallback

from tasks.plumbing.errors import PipelineError, TrialPruned
from tasks.tracking.lineage import sweep_trial
from tasks.training.pruners import study_pruner

PRUNED_ATTR = "pruned"  # the trial's user attribute that keeps the pruning's one line


class ReportToTrial(TrainerCallback):
    """Each evaluation's eval_loss, at its step, to the trial (trial: None in the processes after the first); the
    training stops where the study's pruner says so, and `verdict` says why."""

    def __init__(self, trial, study: str):
        self.trial, self.study = trial, study
        self.verdict: str | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")
        if loss is None:  # the same in every process: the metrics are gathered across them
            return
        verdict = None
        if self.trial is not None:
            self.trial.report(loss, state.global_step)
            if self.trial.should_prune():
                verdict = (
                    f"train: pruned at step {state.global_step} by sweep {self.study}: its validation loss "
                    f"{loss:.4f} trails the other trials' at this step; no model was written"
                )
                self.trial.set_user_attr(PRUNED_ATTR, verdict)
        if args.world_size > 1:
            verdict = first_process(verdict)
        if verdict is not None:
            self.verdict = verdict
            control.should_training_stop, control.should_save = True, False  # train() then raises TrialPruned


def first_process(value):
    """The first process's value, in every process of the job (each calls this at the same point)."""
    import torch.distributed as dist

    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def _optuna():
    try:
        import optuna
    except ImportError:
        raise PipelineError("train: a sweep trial needs Optuna: pip install 'gpt2-pipeline[sweep]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def trial_reporter(args) -> ReportToTrial | None:
    """The callback for the sweep trial this stage runs for, or None outside a sweep (args: its TrainingArguments).

    Every process takes the first one's trial (a node another scheduler started may lack the variable), and only
    the first talks to the study."""
    spec = sweep_trial()
    if args.world_size > 1:
        spec = first_process(spec)
    if spec is None:
        return None
    if args.process_index != 0:
        return ReportToTrial(None, spec["study"])
    optuna = _optuna()
    # Without its pruner, load_study gives Optuna's default (a median pruner after 5 trials), not sweep.pruner.
    pruner = study_pruner(spec["pruner"], spec["startup_trials"])
    study = optuna.load_study(study_name=spec["study"], storage=spec["storage"], pruner=pruner)
    return ReportToTrial(optuna.trial.Trial(study, spec["trial_id"]), spec["study"])


def raise_if_pruned() -> None:
    """For the launcher of torchrun workers that all ended as finished: TrialPruned if they stopped for the pruner."""
    spec = sweep_trial()
    if spec is None:
        return
    attrs = _optuna().storages.get_storage(spec["storage"]).get_trial_user_attrs(spec["trial_id"])
    if attrs.get(PRUNED_ATTR):
        raise TrialPruned(attrs[PRUNED_ATTR])
