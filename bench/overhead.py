"""What the pipeline's machinery costs on top of the work.

(a) a no-op `dvc repro`; (b) the Prefect flow beyond its stages, on a running Prefect server and on the ephemeral
one; (c) MLflow logging of every step's metrics over 10,000 training steps; (d) registering a GPT-2 124M-sized
model against `save_pretrained`.

Everything runs in a copy of the project (its committed and new files, tiny params) in a temporary folder,
with its own SQLite MLflow store. Each figure has a bare reference from the same run:
  (a) a no-op `dvc repro` of a one-stage DVC project (DVC's own start-up and lock check), alternating; (b) the
  same five `dvc repro --single-item <stage>` commands in a plain loop, alternating with the flow; (c) the same
  training with the MLflow calls made no-ops; (d) `save_pretrained` of the same model. Children run with this
  interpreter's tools first on PATH.
Run: python bench/overhead.py [--only noop,flow,logging,register] [--steps 10000] [--unbatched]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import add_save_option, machine, save
from tools.project import BIN, copy_project, tool_env

TINY = {
    "tokenizer.vocab_size": 512,
    "tokenizer.block_size": 64,
    "model.config": {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 64, "dropout": 0.0},
    "train.max_steps": 100,
    "train.batch_size": 8,
    "train.eval_steps": 50,
    "train.checkpoint_every": 50,
}
RESULT = "RESULT "  # marks the line a child prints its figures on


def timed(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(
            f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )
    return seconds, result.stdout + result.stderr


def prepare(parent: Path) -> Path:
    """A project copy with tiny params, reproduced once (about a minute on two cores)."""
    from tasks.plumbing.params import apply_overrides, read_raw

    project = copy_project(parent)
    params = apply_overrides(read_raw(project / "params.yaml"), TINY)
    (project / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False))
    timed([str(BIN / "dvc"), "repro"], project, tool_env())
    return project


def one_stage_project(parent: Path, env: dict[str, str]) -> Path:
    """The smallest DVC project: one stage copying one file, reproduced once."""
    folder = parent / "one-stage"
    folder.mkdir()
    (folder / "in.txt").write_text("text\n")
    (folder / "dvc.yaml").write_text(
        "stages:\n  copy:\n    cmd: cp in.txt out.txt\n    deps: [in.txt]\n    outs: [out.txt]\n"
    )
    for args in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"], [str(BIN / "dvc"), "repro"]):
        timed(args, folder, env)
    return folder


def noop(dvc: str, project: Path, env: dict[str, str]) -> float:
    seconds, output = timed([dvc, "repro"], project, env)
    if "up to date" not in output:
        raise SystemExit(f"dvc repro in {project} was not a no-op:\n{output[-2000:]}")
    return seconds


def noop_repro(project: Path, rounds: int) -> dict:
    """The pipeline's no-op `dvc repro` against a one-stage project's, alternating (DVC's fixed cost in both)."""
    env, dvc = tool_env(), str(BIN / "dvc")
    reference = one_stage_project(project.parent, env)
    repro, one_stage = [], []
    for _ in range(rounds):
        repro.append(noop(dvc, project, env))
        one_stage.append(noop(dvc, reference, env))
    row = {"noop_repro_s": statistics.median(repro), "one_stage_noop_s": statistics.median(one_stage)}
    row["ratio"] = row["noop_repro_s"] / row["one_stage_noop_s"]
    print(
        f"(a) no-op dvc repro {row['noop_repro_s']:.2f} s (median of {rounds}); "
        f"a one-stage project's {row['one_stage_noop_s']:.2f} s ({row['ratio']:.2f} x)"
    )
    return row


FLOW_CHILD = """
import json, subprocess, sys, time
from pathlib import Path
from flows.pipeline import stage_env, stages, training_pipeline
from flows.server import start_local

def bare():
    started = time.perf_counter()
    for stage in stages(Path.cwd()):
        subprocess.run([sys.executable, "-m", "dvc", "repro", "--single-item", stage], env=stage_env({}),
                       capture_output=True, check=True)
    return time.perf_counter() - started

def flow():
    started = time.perf_counter()
    start_local()  # as `gpt2-pipeline run` does: the temporary server, with the project's start budget
    training_pipeline()
    return time.perf_counter() - started

rounds = []
for _ in range(int(sys.argv[1])):
    rounds.append({"bare": bare(), "flow": flow()})
print("RESULT " + json.dumps(rounds))
"""


def flow_overhead(project: Path, rounds: int) -> dict:
    """Flow wall time minus the same stages' wall time in a plain loop, per round.

    The first round of the ephemeral server includes starting it."""
    row = {}
    with prefect_server(project.parent) as api_url:
        row["running"] = flow_rounds(project, rounds, tool_env(PREFECT_API_URL=api_url))
    # A new PREFECT_HOME first creates the ephemeral server's database; later processes only start the server.
    home = tool_env(PREFECT_HOME=str(project.parent / "prefect-ephemeral"))
    row["ephemeral-new-home"], row["ephemeral"] = flow_rounds(project, 1, home), flow_rounds(project, rounds, home)
    for mode in ("running", "ephemeral-new-home", "ephemeral"):
        rounds_ = row[mode]
        extra = [r["flow"] - r["bare"] for r in rounds_]
        row[f"{mode}_overhead_first_s"], row[f"{mode}_overhead_s"] = extra[0], statistics.median(extra[1:] or extra)
        print(
            f"(b) Prefect flow, {mode} server: "
            f"stages alone {statistics.median(r['bare'] for r in rounds_):.2f} s, "
            f"flow {statistics.median(r['flow'] for r in rounds_):.2f} s; overhead first run {extra[0]:.2f} s, "
            f"then {row[f'{mode}_overhead_s']:.2f} s (median of {len(extra[1:] or extra)})"
        )
    return row


def flow_rounds(project: Path, rounds: int, env: dict[str, str]) -> list[dict]:
    output = timed([sys.executable, "-c", FLOW_CHILD, str(rounds)], project, env)[1]
    return last_json(output)


def last_json(output: str):
    """The child's result, its line marked RESULT (libraries print progress and warnings around it)."""
    return json.loads(next(line for line in reversed(output.splitlines()) if line.startswith(RESULT))[len(RESULT) :])


@contextlib.contextmanager
def prefect_server(parent: Path):
    """`prefect server start` on a free loopback port with its own home and SQLite database."""
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = tool_env(PREFECT_HOME=str(parent / "prefect-server"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    log = (parent / "prefect-server.log").open("w")
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).read()  # noqa: S310  # nosec B310: loopback
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"prefect server did not start; see {log.name}") from None
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)
        log.close()


def logging_share(project: Path, steps: int, unbatched: bool) -> dict:
    """Training `steps` steps with every step's metrics logged, against the same training with MLflow calls made no-ops.

    Also the seconds training waits on MLflow (in the logger's flushes; the metrics go out from a thread of their own)
    and the seconds inside the MLflow calls themselves, wherever they run."""
    from tasks import train
    from tasks.plumbing.params import apply_overrides, parse_params, read_raw
    from tasks.tracking import mlflow_runs, store

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{project.parent}/logging-bench.db"
    every_step = {"train.max_steps": steps, "train.logging_steps": 1, "train.eval_steps": 10**6,
                  "train.checkpoint_every": 10**6, "train.warmup_steps": 0}  # fmt: skip
    params = parse_params(apply_overrides(read_raw(project / "params.yaml"), every_step))
    client = store.client()
    experiment = client.create_experiment("overhead", artifact_location=(project.parent / "logging-art").as_uri())
    send, flush, spent, waited = mlflow_runs.log_metric_steps, train.MlflowLogger.flush, [0.0], [0.0]

    def timed_send(run_id, entries):
        started = time.perf_counter()
        send(run_id, entries)
        spent[0] += time.perf_counter() - started

    def timed_flush(logger, wait: bool = True):
        started = time.perf_counter()
        flush(logger, wait)
        waited[0] += time.perf_counter() - started

    def run(sender, flush_seconds: float) -> float:
        mlflow_runs.log_metric_steps, train.MlflowLogger.FLUSH_SECONDS = sender, flush_seconds
        spent[0], waited[0], run_id = 0.0, 0.0, client.create_run(experiment).info.run_id
        with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(open(os.devnull, "w")):
            out = Path(out)
            seconds = train.train(params, run_id, project / "models/tokenizer", project / "data/tokenized",
                                  out / "model", out / "curve.csv", out / "checkpoints")["seconds"]  # fmt: skip
        logged = len(client.get_metric_history(run_id, "train/loss")) if sender is timed_send else steps
        if logged != steps:
            raise SystemExit(f"{logged} of {steps} steps reached MLflow")
        return seconds

    batched = train.MlflowLogger.FLUSH_SECONDS
    train.MlflowLogger.flush = timed_flush
    try:
        # Alternating, each side's fastest of two: the first training in a process pays warm-ups the others do not.
        bares, loggeds = [], []
        for _ in range(2):
            bares.append(run(lambda run_id, entries: None, batched))
            loggeds.append(run(timed_send, batched))
        bare, logged, last = min(bares), min(loggeds), loggeds[-1]  # last: the run whose waits and calls are counted
        row = {"steps": steps, "bare_s": bare, "logged_s": logged, "in_mlflow_s": spent[0], "waited_s": waited[0]}
        if unbatched:
            row["unbatched_s"], row["unbatched_in_mlflow_s"] = run(timed_send, 0.0), spent[0]
    finally:
        mlflow_runs.log_metric_steps, train.MlflowLogger.FLUSH_SECONDS = send, batched
        train.MlflowLogger.flush = flush
    row["share_in_calls"], row["share_waited"] = row["in_mlflow_s"] / last, row["waited_s"] / last
    row["share_ab"] = logged / bare - 1
    print(
        f"(c) {steps:,} steps, every step logged: training {last:.1f} s, of it {row['waited_s']:.2f} s waiting on "
        f"MLflow ({row['share_waited']:.2%}; {row['in_mlflow_s']:.2f} s in MLflow calls in their thread); without "
        f"MLflow {bare:.1f} s ({row['share_ab']:+.2%})"
    )
    if unbatched:
        print(
            f"    one request a step: {row['unbatched_s']:.1f} s, {row['unbatched_in_mlflow_s']:.1f} s in MLflow calls"
        )
    return row


REGISTER_CHILD = """
import json, sys, time
from pathlib import Path
mode = sys.argv[1]
if mode == "save":
    import tempfile
    from transformers import GPT2LMHeadModel
    model = GPT2LMHeadModel.from_pretrained("models/gpt2", use_safetensors=True)
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        model.save_pretrained(scratch)
        print("RESULT " + json.dumps({"seconds": time.perf_counter() - started}))
else:
    from tasks.tracking import mlflow_runs
    from tasks.plumbing.params import load_params
    from tasks.register import register
    params = load_params()
    run_id = mlflow_runs.create_run(params)
    started = time.perf_counter()
    registered = register(params, run_id)
    print("RESULT " + json.dumps({"seconds": time.perf_counter() - started, "version": registered["version"]}))
"""


def register_ratio(project: Path, rounds: int) -> dict:
    """Registering a GPT-2 124M against save_pretrained of the same model.

    GPT-2 124M (GPT2Config's defaults) in models/gpt2, registered by the register stage's function, against
    save_pretrained of the same model; alternating, medians."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config())
    shutil.rmtree(project / "models/gpt2")
    model.save_pretrained(str(project / "models/gpt2"))
    for name in (project / "models/tokenizer").iterdir():
        shutil.copy2(name, project / "models/gpt2" / name.name)
    parameters = model.num_parameters()
    del model
    env, saves, registers = tool_env(), [], []
    for _ in range(rounds):
        for mode, into in (("save", saves), ("register", registers)):
            output = timed([sys.executable, "-c", REGISTER_CHILD, mode], project, env)[1]
            into.append(last_json(output)["seconds"])
    row = {"parameters": parameters, "save_s": statistics.median(saves), "register_s": statistics.median(registers)}
    row["ratio"] = row["register_s"] / row["save_s"]
    print(
        f"(d) GPT-2 {parameters / 1e6:.0f}M: register {row['register_s']:.2f} s, "
        f"save_pretrained {row['save_s']:.2f} s, "
        f"ratio {row['ratio']:.2f} (medians of {rounds})"
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="noop,flow,logging,register", help="comma-separated parts")
    parser.add_argument("--steps", type=int, default=10_000, help="training steps for (c)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--unbatched", action="store_true", help="(c) also with one MLflow request a step")
    add_save_option(parser)
    args = parser.parse_args()
    parts = args.only.split(",")
    print(f"machine: {machine()}")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as scratch:
        project = prepare(Path(scratch))
        if "noop" in parts:
            rows["noop"] = noop_repro(project, args.rounds)
        if "flow" in parts:
            rows["flow"] = flow_overhead(project, args.rounds)
        if "logging" in parts:
            rows["logging"] = logging_share(project, args.steps, args.unbatched)
        if "register" in parts:
            rows["register"] = register_ratio(project, max(2, args.rounds - 1))
    save(args.save, rows)


if __name__ == "__main__":
    main()
