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


def test_a_postgresql_storage_uses_the_installed_driver(tmp_path):
    """SQLAlchemy 2.1 reads postgresql:// as psycopg 3, which is not installed: the URL names psycopg2."""
    url = sweep.storage_url(settings(storage="postgresql://optuna@db:5432/optuna"), tmp_path)
    assert url == "postgresql+psycopg2://optuna@db:5432/optuna"
    assert (
        sweep.storage_url(settings(storage="postgresql+psycopg2://x@db/o"), tmp_path) == "postgresql+psycopg2://x@db/o"
    )
    assert sweep.storage_url(settings(), tmp_path) == f"sqlite:///{tmp_path.resolve() / 'sweeps.db'}"
    import sqlalchemy

    assert sqlalchemy.create_engine(url).dialect.driver == "psycopg2"


def test_workers_of_one_study_draw_different_params_and_the_first_keeps_the_seed(storage):
    """Each worker's sampler is seeded apart (sweep.seed + its number): two workers with one seed would draw the
    same startup params, trial for trial."""
    _, opened = storage
    first = sweep.open_study(settings(), opened, resume=False)
    second = sweep.open_study(settings(), opened, resume=True)
    drawn = [study.ask(sweep.distributions(settings())).params for study in (first, second)]
    assert drawn[0] != drawn[1]
    alone = optuna.create_study(storage=None, sampler=sweep._sampler(settings()))
    assert alone.ask(sweep.distributions(settings())).params == drawn[0]


def test_a_trial_copies_the_corpus_files_that_neither_git_nor_dvc_tracks(tmp_path):
    """dvc exp run --temp copies what git and DVC track: an untracked corpus is passed with --copy-paths, a
    committed or `dvc add`-ed one is not (DVC brings it), and a trial's own data.sources override counts."""
    import yaml

    from flows.sweep import untracked_sources
    from tests.helpers import ROOT

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(sources=["data/corpora/mine/*.txt", "data/kept.txt"], validation_sources=["held.txt"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for name in ("data/corpora/mine/a.txt", "data/corpora/mine/b.txt", "data/kept.txt", "held.txt", "big/x.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("text\n")
    (tmp_path / "big.dvc").write_text("outs:\n- path: big\n")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "add", "data/kept.txt"], cwd=tmp_path, check=True)
    assert untracked_sources(tmp_path, {}) == ["data/corpora/mine/a.txt", "data/corpora/mine/b.txt", "held.txt"]
    assert untracked_sources(tmp_path, {"data.sources": ["big/x.txt"], "data.validation_sources": []}) == []
