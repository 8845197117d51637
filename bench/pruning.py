"""A sweep with pruning against the same sweep without: wall time, trials pruned and the best value found.

A copy of the project (tools.copy_project) with a small model on the bundled Shakespeare, its data prepared and
tokenized once (every trial's DVC experiment then runs train and evaluate only), runs `gpt2-pipeline sweep` twice
with the same trials, space, sampler and seed: once with sweep.pruner none (every trial trains to the end: the
reference) and once with the pruner under test. Each is timed from the command's start to its end in a child process
of its own, and each study's trials are read back from its SQLite storage.
Run: python bench/pruning.py [--trials 8 --steps 200 --pruner median]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from bench.measure import add_save_option, machine, run_measured, save
from tools.project import BIN, copy_project, tool_env

# Wide on purpose: a sweep's first guesses are often poor, and those are what pruning stops early.
SPACE = {
    "train.learning_rate": {"type": "float", "low": 1.0e-4, "high": 3.0e-2, "log": True},
    "train.warmup_steps": {"type": "int", "low": 0, "high": 100, "step": 25},
}


def prepared_project(args, parent: Path) -> Path:
    """The project copy with the small model's params, its data tokenized and committed."""
    project = copy_project(parent)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tokenizer"].update(vocab_size=1024, block_size=64)
    params["model"]["config"].update(n_layer=2, n_head=2, n_embd=64, n_positions=64)
    params["train"].update(max_steps=args.steps, batch_size=16, eval_steps=args.steps // 8, checkpoint_every=args.steps)
    params["sweep"].update(trials=args.trials, space=SPACE, startup_trials=args.startup, seed=0)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    for command in (
        [str(BIN / "dvc"), "repro", "tokenize"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "bench"],
    ):
        subprocess.run(command, cwd=project, env=tool_env(), check=True, capture_output=True)
    return project


def study_figures(project: Path, study: str) -> dict:
    import optuna

    trials = optuna.load_study(study_name=study, storage=f"sqlite:///{project / 'sweeps.db'}").trials
    states = [trial.state.name for trial in trials]
    values = [trial.value for trial in trials if trial.state.name == "COMPLETE"]
    steps = [max(trial.intermediate_values, default=0) for trial in trials]
    return {
        "trials": len(trials),
        "complete": states.count("COMPLETE"),
        "pruned": states.count("PRUNED"),
        "failed": states.count("FAIL"),
        "best": min(values),
        "steps_trained": sum(steps),
    }


def run_study(project: Path, name: str, pruner: str) -> dict:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["sweep"].update(study=name, pruner=pruner)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    measured = run_measured(["-m", "flows.cli", "sweep"], project, tool_env())
    figures = {"pruner": pruner, "seconds": measured.seconds, **study_figures(project, name)}
    print(f"{pruner}: {figures}", flush=True)
    return figures


def options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200, help="training steps of a trial that is not pruned")
    parser.add_argument("--startup", type=int, default=2, help="trials that finish before any is pruned")
    parser.add_argument("--pruner", default="median", choices=["median", "successive_halving", "hyperband"])
    add_save_option(parser)
    return parser


def main() -> None:
    args = options().parse_args()
    print(machine(), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-pruning-") as folder:
        project = prepared_project(args, Path(folder))
        studies = [run_study(project, "full", "none"), run_study(project, "pruned", args.pruner)]
    save(args.save, {"trials": args.trials, "steps": args.steps, "startup": args.startup, "studies": studies})


if __name__ == "__main__":
    main()
