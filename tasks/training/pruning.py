"""A sweep trial's training reports its validation loss to the Optuna trial, which may stop it early (pruning).

Used only when `gpt2-pipeline sweep` runs the stage (tasks.tracking.lineage.SWEEP_TRIAL_ENV names the trial, its
storage and sweep.pruner); a pruned training raises TrialPruned, so the stage exits with PRUNED_EXIT and writes no
model. Under torchrun the first process decides and every process stops at the same step (one that stopped alone
would leave the others waiting in their next all-reduce); the workers then end as finished, since torchrun reports
any other exit as a failure, and their launcher reads the verdict from the trial (PRUNED_ATTR).
"""

from __future__ import annotations

from transformers import TrainerCallback

from tasks.plumbing.errors import PipelineError, TrialPruned
from tasks.tracking.lineage import sweep_trial
from tasks.training.pruners import study_pruner

PRUNED_ATTR = "pruned"  # the trial's user attribute that keeps the pruning's one line


class ReportToTrial(TrainerCallback):
    """Each evaluation's eval_loss, at its step, to the trial; stop when the study's pruner says so."""

    def __init__(self, trial, study: str):
        self.trial, self.study = trial, study
        self.verdict: str | None = None  # why the training was pruned, once it is

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")
        if loss is None:
            return
        verdict = None
        if state.is_world_process_zero:
            self.trial.report(loss, state.global_step)
            if self.trial.should_prune():
                verdict = (
                    f"train: pruned at step {state.global_step} by sweep {self.study}: its validation loss "
                    f"{loss:.4f} trails the other trials' at this step; no model was written"
                )
                self.trial.set_user_attr(PRUNED_ATTR, verdict)
        if args.world_size > 1:
            verdict = first_process(verdict)
        if verdict is None:
            return
        self.verdict = verdict
        if args.world_size == 1:
            raise TrialPruned(verdict)
        control.should_training_stop, control.should_save = True, False  # train raises once every process stopped


def first_process(value):
    """The first process's value, in every process of the job (each calls this at the same step)."""
    import torch.distributed as dist

    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def _trial(spec: dict):
    """The Optuna trial the sweep's spec names, in its study with sweep.pruner."""
    try:
        import optuna
    except ImportError:
        raise PipelineError("train: a sweep trial needs Optuna: pip install 'gpt2-pipeline[sweep]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Without its pruner, load_study gives Optuna's default (a median pruner after 5 trials), not sweep.pruner.
    pruner = study_pruner(spec["pruner"], spec["startup_trials"])
    study = optuna.load_study(study_name=spec["study"], storage=spec["storage"], pruner=pruner)
    return optuna.trial.Trial(study, spec["trial_id"])


def trial_reporter() -> ReportToTrial | None:
    """The callback for the sweep trial this stage runs for, or None outside a sweep."""
    spec = sweep_trial()
    return None if spec is None else ReportToTrial(_trial(spec), spec["study"])


def raise_if_pruned() -> None:
    """For the launcher of torchrun workers that all ended as finished: TrialPruned if they stopped for the pruner."""
    spec = sweep_trial()
    verdict = None if spec is None else _trial(spec).user_attrs.get(PRUNED_ATTR)
    if verdict:
        raise TrialPruned(verdict)
