"""The sweep's study on a real Optuna SQLite storage: the exact trial budget, a dead worker's trial failed and run
again once, a study that exists refused without --resume, and a trial's training pruned when it trails."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from tasks import sweep
from tasks.plumbing.errors import PipelineError, TrialPruned
from tasks.plumbing.params import parse_params

optuna = pytest.importorskip("optuna")


def settings(**sweep_keys):
    return parse_params({"sweep": {"study": "unit", "trials": 3, **sweep_keys}}).sweep


@pytest.fixture
def storage(tmp_path):
    url = f"sqlite:///{tmp_path / 'sweeps.db'}"
    return url, sweep.open_storage(url)


def test_workers_together_start_exactly_the_budget_and_a_retry_counts_toward_it(storage):
    url, opened = storage
    study = sweep.open_study(settings(), opened, resume=False)
    started = []
    while (trial := sweep.next_trial(study, settings(), url)) is not None:
        started.append(trial.number)
        study.tell(trial, 1.0 + trial.number)
    assert started == [0, 1, 2]
    assert sweep.next_trial(study, settings(trials=4), url).number == 3


def test_a_dead_workers_trial_is_failed_and_its_params_run_again_once(storage):
    url, opened = storage
    study = sweep.open_study(settings(), opened, resume=False)
    trial = sweep.next_trial(study, settings(), url)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    sweep.record_group(trial, 0)
    trial.set_user_attr(sweep.WORKER_ATTR, {**trial.user_attrs[sweep.WORKER_ATTR], "pid": int(dead.stdout)})
    assert [t.number for t in sweep.fail_interrupted(study, url)] == [0]
    assert sweep.fail_interrupted(study, url) == []  # a second worker resuming queues no second retry
    retry = sweep.next_trial(study, settings(), url)
    assert retry.params == trial.params and retry.user_attrs[sweep.RETRY_OF_ATTR] == 0
    assert [t.state.name for t in study.trials] == ["FAIL", "RUNNING"]


def test_a_study_that_exists_is_continued_only_with_resume(storage):
    _, opened = storage
    sweep.open_study(settings(), opened, resume=False)
    with pytest.raises(PipelineError, match=r"already in .*pass --resume"):
        sweep.open_study(settings(), opened, resume=False)
    with pytest.raises(PipelineError, match=r"sweep\.direction: maximize"):
        sweep.open_study(settings(direction="maximize"), opened, resume=True)


def test_a_training_that_trails_the_finished_trials_is_pruned(storage):
    from tasks.training.pruning import ReportToTrial

    url, opened = storage
    study = sweep.open_study(settings(startup_trials=1), opened, resume=False)
    first = sweep.next_trial(study, settings(startup_trials=1), url)
    first.report(3.0, 20)
    study.tell(first, 2.0)
    second = sweep.next_trial(study, settings(startup_trials=1), url)
    callback = ReportToTrial(second, "unit")
    state = SimpleNamespace(global_step=20, is_world_process_zero=True)
    with pytest.raises(TrialPruned, match="pruned at step 20 by sweep unit"):
        callback.on_evaluate(None, state, None, metrics={"eval_loss": 5.0})
    third = sweep.next_trial(study, settings(startup_trials=1), url)
    ReportToTrial(third, "unit").on_evaluate(None, state, None, metrics={"eval_loss": 2.5})  # ahead: goes on
