"""The sweep's study: Optuna's storage, sampler and pruner from params.yaml's `sweep:` (the pruner stops the trials'
training: tasks.training.pruning), the trial budget shared by every worker, trials a dead worker left behind, and
what a study shows at its end (a table, plots, the best params).

`gpt2-pipeline sweep` (flows/sweep.py) runs each trial as a DVC experiment through the stages up to evaluate; this
module holds what is Optuna's. The study lives in SQLite in the project (sweeps.db) unless sweep.storage names a
database that workers on many machines share (PostgreSQL); a password belongs in PGPASSWORD or ~/.pgpass, and is
redacted wherever a URI is printed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tasks.plumbing.errors import PipelineError
from tasks.plumbing.params import Params, SweepParams
from tasks.plumbing.paths import SWEEP_DB
from tasks.plumbing.redaction import redact
from tasks.training.pruners import study_pruner

HEARTBEAT_SECONDS = 20  # a worker's running trial says it is alive this often
GRACE_SECONDS = 90  # a running trial silent this long belonged to a worker that died: failed, and run again
SQLITE_WAIT_SECONDS = 60  # a worker waits this long for another's write to the SQLite study
WORKER_ATTR = "worker"  # a trial's user attribute: host, pid and process group of the worker running it
RETRY_OF_ATTR = "retry_of"  # a trial that runs again the params of one a dead worker left unfinished
WORKERS_ATTR = "workers"  # a study's user attribute: how many workers have opened it (each seeds its sampler apart)


def optuna_module():
    try:
        import optuna
    except ImportError:
        raise PipelineError("gpt2-pipeline sweep needs Optuna: pip install 'gpt2-pipeline[sweep]'") from None
    import warnings

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # heartbeats, fail_stale_trials and the matplotlib plots are marked experimental since Optuna 2.9 and 2.2
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # Optuna's heartbeat thread runs inside Study.optimize; the sweep asks and tells, and beats itself (heartbeat())
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    return optuna


def storage_url(params: SweepParams, project: Path) -> str:
    """sweep.storage, or the project's SQLite file.

    A plain postgresql:// names psycopg2, the driver the project installs (and MLflow's server uses): SQLAlchemy 2.1
    would take it as psycopg 3."""
    url = params.storage or f"sqlite:///{(project / SWEEP_DB).resolve()}"
    scheme, separator, rest = url.partition("://")
    return f"postgresql+psycopg2://{rest}" if separator and scheme in ("postgresql", "postgres") else url


def shown(url: str) -> str:
    return redact(url)


def open_storage(url: str):
    """Optuna's database storage with heartbeats, so another worker can tell a trial whose worker died."""
    optuna = optuna_module()
    engine = {"connect_args": {"timeout": SQLITE_WAIT_SECONDS}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS
        )
    except Exception as exc:
        raise PipelineError(
            f"sweep.storage {shown(url)}: cannot open the study's database ({type(exc).__name__}: "
            f"{redact(str(exc).splitlines()[0] if str(exc) else '')}); check the address, and that the server runs"
        ) from None


def _sampler(params: SweepParams, worker: int = 0):
    """The sampler of the study's `worker`-th worker: sweep.seed for the first, the next seeds for the others, so
    that workers starting together do not draw the same params."""
    optuna = optuna_module()
    seed = None if params.seed is None else params.seed + worker
    if params.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(params.startup_trials, 1))


def open_study(params: SweepParams, storage, resume: bool):
    """The study sweep.study names: a new one, or with --resume the existing one (or a new one where none is)."""
    optuna = optuna_module()
    url = storage.url if hasattr(storage, "url") else str(storage)
    with budget_lock(url, params.study):  # workers starting together: one makes the study, each has its number
        exists = params.study in optuna.get_all_study_names(storage)
        if exists and not resume:
            raise PipelineError(
                f"sweep.study {params.study}: already in {shown(url)}; pass --resume to continue it (its finished "
                "trials are kept), or name a new study in sweep.study"
            )
        study = optuna.create_study(
            study_name=params.study,
            storage=storage,
            pruner=study_pruner(params.pruner, params.startup_trials),
            direction=params.direction,
            load_if_exists=True,
        )
        worker = study.user_attrs.get(WORKERS_ATTR, 0)
        study.set_user_attr(WORKERS_ATTR, worker + 1)
    study.sampler = _sampler(params, worker)
    if study.direction.name.lower() != params.direction:
        raise PipelineError(
            f"sweep.direction: {params.direction}, but study {params.study} in {shown(url)} was made to "
            f"{study.direction.name.lower()}; name a new study in sweep.study"
        )
    return study


def distributions(params: SweepParams) -> dict[str, Any]:
    """sweep.space as Optuna's distributions, by dotted params key."""
    optuna = optuna_module()
    made = {}
    for key, spec in params.space.items():
        if spec.type == "categorical":
            made[key] = optuna.distributions.CategoricalDistribution(spec.choices)
        elif spec.type == "int":
            made[key] = optuna.distributions.IntDistribution(spec.low, spec.high, log=spec.log, step=spec.step or 1)
        else:
            made[key] = optuna.distributions.FloatDistribution(spec.low, spec.high, log=spec.log, step=spec.step)
    return made


@contextlib.contextmanager
def budget_lock(url: str, study: str) -> Iterator[None]:
    """One worker at a time counts the study's trials and starts the next, so together they start exactly the budget.

    PostgreSQL: an advisory lock of the study's database; SQLite (one machine): a lock on a file beside it."""
    if url.startswith("sqlite:///"):
        with open(f"{url.removeprefix('sqlite:///')}.lock", "a+", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield
        return
    import sqlalchemy

    key = int.from_bytes(hashlib.sha256(f"gpt2-pipeline sweep {study}".encode()).digest()[:8], "big", signed=True)
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
    finally:
        engine.dispose()


def counted(study) -> tuple[int, int]:
    """(trials that count toward the budget: finished, pruned, running or waiting; failed trials)."""
    states = [trial.state.name for trial in study.get_trials(deepcopy=False)]
    return len(states) - states.count("FAIL"), states.count("FAIL")


def next_trial(study, params: SweepParams, url: str):
    """The next trial to run (a waiting one first), or None when the study holds sweep.trials trials."""
    with budget_lock(url, study.study_name):
        active, failed = counted(study)
        waiting = study.get_trials(deepcopy=False, states=(optuna_module().trial.TrialState.WAITING,))
        if not waiting and active >= params.trials:
            return None
        if not waiting and failed >= params.trials:
            raise PipelineError(
                f"sweep {study.study_name}: {failed} trials failed, as many as sweep.trials; see their lines above"
            )
        trial = study.ask(distributions(params))
        trial.set_user_attr(WORKER_ATTR, {"host": socket.gethostname(), "pid": os.getpid(), "pgid": None})
        # Beat once now: Optuna finds a trial stale only once it has a heartbeat, and its worker may die before the
        # heartbeat thread starts (its trial would then stay running, and --register-best wait for it).
        trial.storage.record_heartbeat(trial._trial_id)
        return trial


def overrides(trial) -> dict[str, Any]:
    return dict(trial.params)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_interrupted(study, url: str) -> list:
    """Mark failed the trials whose worker is gone, and queue each one's params to run again; returns them.

    A worker on this machine whose process is gone (kill -9 included) at once, its trial's processes stopped; a
    worker elsewhere once its heartbeat is older than GRACE_SECONDS (Optuna's own check)."""
    optuna = optuna_module()
    state = optuna.trial.TrialState
    with budget_lock(url, study.study_name):
        running = [trial.number for trial in study.get_trials(deepcopy=False, states=(state.RUNNING,))]
        optuna.storages.fail_stale_trials(study)
        here = socket.gethostname()
        for trial in study.get_trials(deepcopy=False, states=(state.RUNNING,)):
            worker = trial.user_attrs.get(WORKER_ATTR) or {}
            if worker.get("host") == here and not _alive(worker.get("pid", 0)):
                _stop_group(worker.get("pgid"))
                study.tell(trial.number, state=state.FAIL, skip_if_finished=True)
        trials = study.get_trials(deepcopy=False)
        retried = {trial.user_attrs.get(RETRY_OF_ATTR) for trial in trials}
        failed = [trials[number] for number in running if trials[number].state == state.FAIL]
        for trial in failed:
            if trial.number not in retried:
                study.enqueue_trial(trial.params, user_attrs={RETRY_OF_ATTR: trial.number})
        return failed


@contextlib.contextmanager
def heartbeat(storage, trial) -> Iterator[None]:
    """The trial's heartbeat while the block runs, so workers elsewhere know it is alive (Optuna's own record)."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):  # a missed beat is no failure; GRACE_SECONDS allows several
                storage.record_heartbeat(trial._trial_id)
            stop.wait(HEARTBEAT_SECONDS)

    thread = threading.Thread(target=beat, name="sweep-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _stop_group(pgid: int | None) -> None:
    """Stop what a dead worker's trial left running (its `dvc exp run` and the stage under it)."""
    if not pgid:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, 9)


def record_group(trial, pgid: int) -> None:
    worker = dict(trial.user_attrs.get(WORKER_ATTR) or {})
    worker["pgid"] = pgid
    trial.set_user_attr(WORKER_ATTR, worker)


def best(study) -> Any | None:
    """The best finished trial, or None."""
    try:
        return study.best_trial
    except ValueError:
        return None


def best_params_file(params_path: Path, best_overrides: dict[str, Any], output: Path) -> Path:
    """params_path with the best trial's values, as a params file under params/ that `dvc repro` can use."""
    from tasks.plumbing.params import apply_overrides, read_raw

    raw = apply_overrides(read_raw(params_path), best_overrides)
    text = yaml.safe_dump(raw, allow_unicode=True, sort_keys=False)
    header = "# yaml-language-server: $schema=../docs/reference/params.schema.json\n"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(header + text, encoding="utf-8")
    return output


def space_summary(params: Params) -> dict[str, str]:
    """The sweep's settings as MLflow params of the study's run."""
    sweep = params.sweep
    logged = {f"sweep.{key}": str(value) for key, value in sweep.model_dump(exclude={"space", "storage"}).items()}
    for key, spec in sweep.space.items():
        logged[f"sweep.space.{key}"] = json.dumps(spec.model_dump(exclude_none=True), sort_keys=True)
    return logged


PLOTS = {  # file name -> Optuna's matplotlib plot of the study
    "optimization_history.svg": "plot_optimization_history",
    "param_importances.svg": "plot_param_importances",
    "parallel_coordinate.svg": "plot_parallel_coordinate",
    "slice.svg": "plot_slice",
    "intermediate_values.svg": "plot_intermediate_values",
}


def write_plots(study, folder: Path) -> tuple[list[Path], list[str]]:
    """The study's plots as SVG files (they open offline); returns the files and a line for each plot left out."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    optuna = optuna_module()
    folder.mkdir(parents=True, exist_ok=True)
    written, skipped = [], []
    for name, function in PLOTS.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna's matplotlib plots are marked experimental
                drawn = getattr(optuna.visualization.matplotlib, function)(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # too few finished trials to draw it
            skipped.append(f"{name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            continue
        figure = (drawn.flat[0] if hasattr(drawn, "flat") else drawn).figure
        figure.savefig(folder / name, bbox_inches="tight")
        plt.close(figure)
        written.append(folder / name)
    return written, skipped


def trials_table(study, objective: str) -> str:
    """Every trial of the study: its state, objective and params, as a text table."""
    from rich.console import Console
    from rich.table import Table

    keys = sorted({key for trial in study.trials for key in trial.params})
    table = Table(title=f"study {study.study_name}: {len(study.trials)} trials")
    for column in ("trial", "state", objective, "seconds", *keys):
        table.add_column(column)
    for trial in study.trials:
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() if trial.datetime_complete else None
        table.add_row(
            str(trial.number),
            trial.state.name.lower(),
            f"{trial.value:.4f}" if trial.state.name == "COMPLETE" else "",  # a pruned trial's is a loss
            "" if seconds is None else f"{seconds:.0f}",
            *(_shown_value(trial.params.get(key)) for key in keys),
        )
    console = Console(width=160, record=True, file=io.StringIO())  # rendered to text, not to a terminal
    console.print(table)
    return console.export_text()


def _shown_value(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def dvc_tracked(project: Path, relative: str) -> bool:
    """Whether a `.dvc` file tracks this path or a folder above it (`dvc add data/corpora/x`)."""
    parts = Path(relative).parts
    return any(
        (project / Path(*parts[:end])).with_name(parts[end - 1] + ".dvc").is_file() for end in range(1, len(parts) + 1)
    )
