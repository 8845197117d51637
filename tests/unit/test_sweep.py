"""The sweep's study on a real Optuna SQLite storage: the exact trial budget, a dead worker's trial failed and run
again once, a study that exists refused without --resume, and a trial's training pruned when it trails."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
from transformers import TrainerControl

from tasks import sweep
from tasks.plumbing.errors import PipelineError
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


def reporter(monkeypatch, url: str, trial, pruner: str):
    """The train stage's callback for this trial, as a sweep's trial environment names it."""
    from tasks.tracking.lineage import SWEEP_TRIAL_ENV
    from tasks.training.pruning import trial_reporter

    spec = {"study": "unit", "storage": url, "trial_id": trial._trial_id, "pruner": pruner, "startup_trials": 1}
    monkeypatch.setenv(SWEEP_TRIAL_ENV, json.dumps(spec))
    return trial_reporter(SimpleNamespace(world_size=1, process_index=0))


@pytest.mark.parametrize("pruner", ["median", "none"])
def test_a_training_that_trails_the_finished_trials_is_pruned_by_sweep_pruner(storage, monkeypatch, pruner):
    """The training's pruner is sweep.pruner with sweep.startup_trials (Optuna's default would wait for 5 trials)."""
    url, opened = storage
    study = sweep.open_study(settings(startup_trials=1), opened, resume=False)
    first = sweep.next_trial(study, settings(startup_trials=1), url)
    first.report(3.0, 20)
    study.tell(first, 2.0)
    second = sweep.next_trial(study, settings(startup_trials=1), url)
    state, args = SimpleNamespace(global_step=20), SimpleNamespace(world_size=1)
    callback, control = reporter(monkeypatch, url, second, pruner), TrainerControl()
    callback.on_evaluate(args, state, control, metrics={"eval_loss": 5.0})  # trails
    if pruner == "none":
        assert not control.should_training_stop and callback.verdict is None  # and goes on
        return
    assert control.should_training_stop and not control.should_save
    assert callback.verdict.startswith("train: pruned at step 20 by sweep unit")
    assert study.trials[second.number].user_attrs["pruned"] == callback.verdict  # what a torchrun launcher reads
    third, control = sweep.next_trial(study, settings(startup_trials=1), url), TrainerControl()
    reporter(monkeypatch, url, third, pruner).on_evaluate(args, state, control, metrics={"eval_loss": 2.5})  # ahead
    assert not control.should_training_stop


def test_register_best_waits_for_the_trials_other_workers_still_run(storage, capsys):
    """--register-best registers the study's best: a worker whose budget is spent waits while another worker's trial
    runs, doing its share (failing gone workers' trials, running retries) after each pause, then sees that value."""
    from flows.sweep import await_other_workers

    url, opened = storage
    study = sweep.open_study(settings(trials=2), opened, resume=False)
    mine = sweep.next_trial(study, settings(trials=2), url)
    study.tell(mine, 3.0)
    theirs = sweep.next_trial(study, settings(trials=2), url)  # another worker's: running, its process alive
    pauses, shares = [], []

    def pause():
        pauses.append(len(shares))
        if len(pauses) == 2:
            study.tell(theirs, 1.0)

    await_other_workers(study, lambda: shares.append(1), None, pause)
    assert pauses == [0, 1] and len(shares) == 2
    assert sweep.best(study).number == theirs.number
    assert capsys.readouterr().out.count(f"trials {theirs.number}: other workers still run them") == 1


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
    """dvc exp run --temp copies what git and DVC track: an untracked corpus is passed with --copy-paths (as its
    folder where the copy lacks that folder: DVC copies a file only into one it has), a committed or `dvc add`-ed
    one is not (DVC brings it), and a trial's own data.sources override counts. A real `dvc exp run --temp` with
    those paths then reads them."""
    import yaml

    from flows.sweep import copy_paths
    from tests.helpers import ROOT
    from tools.project import BIN, tool_env

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(sources=["data/corpora/mine/*.txt", "data/kept.txt"], validation_sources=["held.txt"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for name in ("data/corpora/mine/a.txt", "data/corpora/mine/b.txt", "data/kept.txt", "held.txt", "big/x.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"{name}\n")
    (tmp_path / "big.dvc").write_text("outs:\n- path: big\n")
    stage = {"cmd": "cat data/corpora/mine/a.txt data/corpora/mine/b.txt held.txt > read.txt", "outs": ["read.txt"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"read": stage}}))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    for command in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"], ["git", "add", "data/kept.txt", "dvc.yaml",
                    "params.yaml", ".dvc"], [*git, "commit", "-qm", "project"]):  # fmt: skip
        subprocess.run(command, cwd=tmp_path, check=True, env=tool_env())
    paths = copy_paths(tmp_path, {})
    assert paths == ["data/corpora/mine", "held.txt"]
    assert copy_paths(tmp_path, {"data.sources": ["big/x.txt"], "data.validation_sources": []}) == []
    run = [str(BIN / "dvc"), "exp", "run", "--temp", *(f"--copy-paths={path}" for path in paths)]
    ran = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, env=tool_env())
    assert ran.returncode == 0, ran.stdout + ran.stderr


def test_a_sweep_whose_trials_all_fail_stops_with_one_line(tmp_path):
    """A setting that fails every trial (a field the corpus lacks) would fail trial after trial, since failed ones do
    not count toward the budget: the worker stops after three in a row, with the last trial's error on one line and
    no traceback (Prefect's logs included)."""
    from tests.helpers import BIN, copy_project, default_params, tool_env, write_params

    project = copy_project(tmp_path)
    params = default_params()
    params["data"].update(sources=["data/samples/tang300.json"], text_field="body")
    params["sweep"].update(trials=5, study="broken")
    write_params(project, params)
    env = tool_env()
    subprocess.run(["git", "commit", "-qam", "broken"], cwd=project, env=env, check=True)
    ran = subprocess.run([str(BIN / "gpt2-pipeline"), "sweep"], cwd=project, env=env, capture_output=True, text=True)
    output = ran.stdout + ran.stderr
    assert ran.returncode == 2 and "Traceback" not in output, output[-3000:]
    errors = [line for line in ran.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output[-3000:]
    assert errors[0].startswith(
        "error: sweep broken: 3 trials in a row failed, the last with: data/samples/tang300.json: record 0: record "
        "has no field 'body'"
    ), errors
    trials = optuna.load_study(study_name="broken", storage=f"sqlite:///{project / 'sweeps.db'}").trials
    assert [trial.state.name for trial in trials] == ["FAIL"] * 3
