"""What the benchmarks share.

Timing a child process with the peak RSS of its whole process tree, the machine a figure was measured on, and
saving a run's figures as bench/results/<name>.json, from which tools/bench_tables.py writes docs/benchmarks.md's
tables. The project copy, its tools and the synthetic corpora, which the tests use too, are in tools/."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench/results"


@dataclass
class Measured:
    seconds: float
    peak_rss: int  # bytes, the largest sum over the child and all its descendants seen while it ran
    peak_private: int  # the same for RSS less file-backed shared pages (memory-mapped Arrow files count in RSS)
    output: str


def run_measured(
    args: list[str], cwd: Path | None = None, env: dict | None = None, poll: float = 0.05, memory_limit: int = 0
) -> Measured:
    """Run `python args...` and sample the RSS of its tree (map workers included) until it exits.

    With memory_limit (bytes) it runs in a memory cgroup of that size, page cache included, as a container would."""
    started = time.perf_counter()
    # A file, not a pipe: a chatty child never blocks on a full pipe while only its memory is being read.
    with memory_cgroup(memory_limit) as join, tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            [sys.executable, *args], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=join
        )
        measured = _sample(proc, poll)
        log.seek(0)
        output = log.read()
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child {' '.join(args)} failed ({proc.returncode}):\n{output[-3000:]}")
    return Measured(time.perf_counter() - started, *measured, output)


def _sample(proc: subprocess.Popen, poll: float) -> tuple[int, int]:
    root, peak, private = psutil.Process(proc.pid), 0, 0
    while proc.poll() is None:
        try:
            memory = [p.memory_info() for p in [root, *root.children(recursive=True)]]
            peak = max(peak, sum(m.rss for m in memory))
            private = max(private, sum(m.rss - m.shared for m in memory))
        except psutil.Error:
            pass  # a worker ended between listing and reading it
        time.sleep(poll)
    return peak, private


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[Callable[[], None] | None]:
    """A child cgroup (v1 memory controller, or v2) limited to `limit` bytes.

    Yields a preexec function that moves the child into it. Needs root and a writable cgroup tree (a refusal names
    the path)."""
    if not limit:
        yield None
        return
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    v1 = [line.split(":", 2)[2] for line in lines if line.split(":")[1] == "memory"]
    base, limit_file = (
        (Path("/sys/fs/cgroup/memory") / v1[0].lstrip("/"), "memory.limit_in_bytes")
        if v1 else (Path("/sys/fs/cgroup") / lines[0].split(":", 2)[2].lstrip("/"), "memory.max")
    )  # fmt: skip
    group = base / f"gpt2-bench-{os.getpid()}"
    try:
        group.mkdir()
        (group / limit_file).write_text(str(limit))
    except OSError as exc:
        raise SystemExit(
            f"cannot make a memory cgroup at {group} ({exc}); run as root or drop --memory-limit-mb"
        ) from None

    def join() -> None:
        (group / "cgroup.procs").write_text(str(os.getpid()))

    try:
        yield join
    finally:
        with contextlib.suppress(OSError):
            group.rmdir()


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> str:
    import torch

    return (
        f"{psutil.cpu_count()} cores ({cpu_model()}), {psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"python {platform.python_version()}, torch {torch.__version__}"
    )


def measured_on() -> dict[str, Any]:
    """The machine and library versions a result was measured with, and the day: the tables' "measured on" line."""
    import torch
    import transformers

    from tasks.train import native_bf16

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date": datetime.date.today().isoformat(),
        "cores": psutil.cpu_count(),
        "cpu": cpu_model(),
        "native_bf16": bool(native_bf16()),  # the train stage's own check: what train.precision auto goes by
        "memory_gib": round(psutil.virtual_memory().total / 2**30),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def add_save_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--save",
        metavar="NAME",
        help="also save the figures as bench/results/NAME.json (docs/benchmarks.md's tables come from these)",
    )


def save(name: str | None, figures: Any) -> None:
    """bench/results/<name>.json: the figures, the command that measured them, and where."""
    if not name:
        return
    script = Path(sys.argv[0]).resolve().relative_to(ROOT)
    result = {"command": " ".join(["python", str(script), *sys.argv[1:]]), "measured_on": measured_on()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({**result, "figures": figures}, indent=2) + "\n")
    print(f"saved bench/results/{name}.json")
