"""Hostile params refused fast, and a stage that cannot unwind still ends after SIGTERM.

Each params case runs a real stage process (`python -m tasks.ingest`, the lightest) on a project folder holding
only the hostile params.yaml: exit 2 and one line, with the process limited to 1 GiB of memory, so a bomb that got
past the loader would fail the test with a MemoryError instead of passing slowly.
"""

from __future__ import annotations

import re
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tasks.plumbing.errors import BAD_INPUT_EXIT
from tasks.plumbing.params import PARAMS_MAX_BYTES
from tests.helpers import BIN, ROOT, tiny_params, tool_env

MEMORY_LIMIT = 1 << 30

# Nine levels of nine: 9^9 (387 million) strings once expanded. Indented to sit under `data:` or `config:`.
LAUGHS = "\n".join(
    ["lol0: &lol0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"lol{n}: &lol{n} [{', '.join([f'*lol{n - 1}'] * 9)}]" for n in range(1, 9)]
)


def bomb_in(section_line: str, key: str) -> str:
    """params.yaml text with the bomb's anchors above and `key: *lol8` under section_line."""
    text = yaml.safe_dump(tiny_params(), sort_keys=False)
    return f"x-laughs:\n{textwrap.indent(LAUGHS, '  ')}\n" + text.replace(
        f"{section_line}\n", f"{section_line}\n  {key}: *lol8\n", 1
    )


def limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def ingest(folder, params_text: str) -> subprocess.CompletedProcess:
    (folder / "params.yaml").write_text(params_text)
    return subprocess.run(
        [str(BIN / "python"), "-m", "tasks.ingest"],
        cwd=folder,
        env={**tool_env(), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limited,  # the child only sets its own limit before exec
    )


HOSTILE = {
    "alias bomb in data.sources": (
        lambda: bomb_in("data:", "sources").replace("  sources:\n  - data/samples/tinyshakespeare.txt\n", ""),
        r"^error: params\.yaml:2: YAML anchors and aliases \(&lol0, \*lol0\) are not accepted; write the value out$",
    ),
    "alias bomb in model.config.dropout": (
        lambda: bomb_in("  config:", "  dropout"),
        r"^error: params\.yaml:2: YAML anchors and aliases \(&lol0, \*lol0\) are not accepted",
    ),
    "a large value written out in model.config.dropout": (
        lambda: yaml.safe_dump({**tiny_params(), "model": {"config": {"dropout": [["lol"] * 99 for _ in range(99)]}}}),
        r"^error: params\.yaml: model\.config\.dropout: input should be a valid number "
        r"\(got \[\['lol', 'lol', 'lol', \.\.\.\], .*, \.\.\.\]\)$",
    ),
    "a huge size": (
        lambda: yaml.safe_dump({**tiny_params(), "model": {"config": {"n_embd": 10**12}}}),
        r"^error: params\.yaml: model\.config\.n_embd: input should be less than or equal to 65536 "
        r"\(got 1000000000000\)$",
    ),
    "an oversized file": (
        lambda: yaml.safe_dump(tiny_params()) + "#" * PARAMS_MAX_BYTES + "\n",
        r"^error: params\.yaml: 1,0\d\d,\d{3} bytes is over the 1,048,576-byte limit of a params file",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_params_end_the_stage_at_once_with_one_line(tmp_path, case):
    text, message = HOSTILE[case]
    result = ingest(tmp_path, text())
    lines = result.stderr.strip().splitlines()
    assert result.returncode == BAD_INPUT_EXIT and len(lines) == 1, result.stderr[-2000:]
    assert len(lines[0]) < 300, lines[0]  # a bad value is shown short, however large
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "data").exists()  # refused before anything was read or written


STUCK_STAGE = """
import ctypes, sys
import tasks.plumbing.stopping as stopping
from tasks.plumbing.stage import run_cli
stopping.STOP_GRACE_SECONDS = 1  # the stage's own is a minute
def main():
    mutex = ctypes.create_string_buffer(64)  # zeroed: an unlocked default pthread mutex
    libc = ctypes.CDLL(None)
    libc.pthread_mutex_lock(mutex)
    print("stuck", flush=True)
    libc.pthread_mutex_lock(mutex)  # locks itself out: a futex wait no signal ends, no Python handler runs
run_cli(main)
"""


def wait_in_futex(pid: int, timeout: float = 60) -> None:
    """Until the process's main thread sleeps in the kernel's futex wait (its wchan names it)."""
    wchan, deadline = Path(f"/proc/{pid}/wchan"), time.monotonic() + timeout
    while "futex" not in wchan.read_text():
        assert time.monotonic() < deadline, f"the stage never blocked (wchan {wchan.read_text()!r})"
        time.sleep(0.01)


def test_a_stage_stuck_where_no_handler_runs_still_ends_after_sigterm(tmp_path):
    stage = subprocess.Popen(
        [str(BIN / "python"), "-c", STUCK_STAGE],
        cwd=tmp_path,
        env={**tool_env(), "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert stage.stdout.readline() == "stuck\n"
        wait_in_futex(stage.pid)  # a signal sent before the second lock would still reach Python's handler
        # The stage's watchdog: the stage's child whose arguments name the stage.
        watchdogs = [p for p in psutil.Process(stage.pid).children() if str(stage.pid) in p.cmdline()[1:]]
        assert len(watchdogs) == 1, psutil.Process(stage.pid).children()
        stage.send_signal(signal.SIGTERM)
        _, stderr = stage.communicate(timeout=60)
    finally:
        stage.kill()
    assert stage.returncode == -signal.SIGKILL
    assert stderr.strip().splitlines() == [
        "error: the stage did not stop within 1 s of SIGTERM; killed it (SIGKILL), its previous outputs are kept"
    ]
    psutil.wait_procs(watchdogs, timeout=30)
    assert [p for p in watchdogs if p.is_running() and p.status() != "zombie"] == []


def test_a_finished_stage_leaves_no_watchdog_behind(tmp_path):
    """In a test process (run in-process by tests/reliability) as in a stage's own: the watchdog ends with it."""
    from tasks.plumbing.stage import run_cli

    before = {p.pid for p in psutil.Process().children()}
    with pytest.raises(SystemExit) as exit_status:
        run_cli(lambda: sys.exit(0))
    assert exit_status.value.code == 0
    started = [p for p in psutil.Process().children() if p.pid not in before]
    psutil.wait_procs(started, timeout=30)
    assert [p for p in started if p.is_running() and p.status() != "zombie"] == []


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder (it has a dvc.yaml) with one text file, as the working directory, and a file beside it."""
    root = tmp_path / "project"
    (root / "data").mkdir(parents=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "data/inside.txt").write_text("Inside the project.\n")
    (tmp_path / "secret.txt").write_text("Outside the project.\n")
    monkeypatch.chdir(root)
    return root


OUTSIDE = {
    "an absolute path": (lambda project: str(project.parent / "secret.txt"), "{outside}/secret.txt"),
    "a path through ..": (lambda project: "../secret.txt", "{outside}/secret.txt"),
    "a symlink inside to a file outside": (
        lambda project: (project / "data/link.txt").symlink_to(project.parent / "secret.txt") or "data/link.txt",
        "{outside}/secret.txt",
    ),
}


@pytest.mark.parametrize("case", list(OUTSIDE))
def test_data_sources_outside_the_project_are_refused(project, case):
    from tasks.data.sources import resolve_sources
    from tasks.plumbing.errors import PipelineError

    make, target = OUTSIDE[case]
    source = make(project)
    with pytest.raises(PipelineError) as refused:
        resolve_sources(["data/inside.txt", source])
    resolved = target.format(outside=project.parent.resolve())
    assert str(refused.value) == (
        f"data.sources[1]: {source!r} resolves to {resolved}, outside the project ({project.resolve()}); "
        "copy it into the project, or set data.allow_outside_project: true to read it where it is"
    )


def test_a_glob_outside_the_project_is_refused_before_it_walks_anything(project, monkeypatch):
    import glob

    from tasks.data.sources import resolve_sources
    from tasks.plumbing.errors import PipelineError

    monkeypatch.setattr(glob, "glob", lambda *args, **kwargs: pytest.fail(f"walked {args}"))
    with pytest.raises(PipelineError, match=r"^data\.sources\[0\]: '/usr/share/\*\*/\*\.txt' resolves to /usr/share, "):
        resolve_sources(["/usr/share/**/*.txt"])


def test_outside_files_are_read_only_when_params_allow_it_and_are_listed(project, capsys):
    from tasks.data.sources import resolve_sources

    assert resolve_sources(["data/*.txt", "../secret.txt"], outside=True) == ["data/inside.txt", "../secret.txt"]
    outside = project.parent.resolve() / "secret.txt"
    assert capsys.readouterr().out == (
        f"ingest: data.allow_outside_project: reading 1 files outside the project: ['{outside}']\n"
    )


def test_a_run_workspace_reads_its_project_s_files(project, monkeypatch):
    """.runs/<hash> (and DVC's temporary copies) are projects inside the project: its files are inside."""
    from tasks.data.sources import resolve_sources

    workspace = project / ".runs/abc123"
    workspace.mkdir(parents=True)
    (workspace / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(workspace)
    assert resolve_sources([str(project / "data/inside.txt")]) == [str(project / "data/inside.txt")]


def test_promotion_text_and_workdir_stay_in_the_project(project):
    from flows.promote import promote_model
    from tasks.plumbing.errors import PipelineError
    from tasks.plumbing.params import parse_params
    from tasks.promote import text_path

    outside = str(project.parent.resolve() / "secret.txt")
    params = parse_params({"data": {"sources": ["data/inside.txt"]}, "promote": {"eval_path": outside}})
    with pytest.raises(PipelineError, match=rf"^promote\.eval_path: '{outside}' resolves to {outside}, outside the"):
        text_path(params)
    allowed = parse_params({**params.model_dump(), "data": {"sources": ["x"], "allow_outside_project": True}})
    assert text_path(allowed) == Path(outside)
    with pytest.raises(PipelineError, match=r"^workdir: '/etc' resolves to /etc, outside the project \(.+\); copy"):
        promote_model.fn(workdir="/etc")


HUNDRED_MB = 100 << 20
BAD_FILES = {
    # name: (file name, writer of the file, the error line it must give)
    "a 100 MB single-line JSONL record": (
        "big.jsonl",
        lambda handle: handle.write(b'{"text": "' + b"x" * HUNDRED_MB + b'"}\n'),
        r"^error: data/big\.jsonl:1: a record over 16,777,216 bytes \(data\.max_record_bytes\); split it",
    ),
    "a 100 MB single-line JSON file": (
        "big.json",
        lambda handle: handle.write(b'[{"text": "' + b"x" * HUNDRED_MB + b'"}]'),
        r"^error: data/big\.json:1: a record over 16,777,216 bytes \(data\.max_record_bytes\); split it",
    ),
    "JSONL nested 200,000 deep": (
        "deep.jsonl",
        lambda handle: handle.write(b'{"text": "fine"}\n' + b"[" * 200_000 + b"]" * 200_000 + b"\n"),
        r"^error: data/deep\.jsonl:2: JSON nested more than 500 levels deep, too deep to read; flatten the record$",
    ),
    "JSON nested 200,000 deep": (
        "deep.json",
        lambda handle: handle.write(b'[\n{"text": "[fine]"},\n' + b"[" * 200_000 + b"]" * 200_000 + b"\n]"),
        r"^error: data/deep\.json:3: JSON nested more than 500 levels deep",
    ),
}


@pytest.mark.slow  # 100 MB files: kept out of the edit-test loop
@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_are_refused_in_bounded_memory_with_file_and_line(tmp_path, case):
    name, write, message = BAD_FILES[case]
    (tmp_path / "data").mkdir()
    with (tmp_path / "data" / name).open("wb") as handle:
        write(handle)
    params = {**tiny_params(), "data": {**tiny_params()["data"], "sources": [f"data/{name}"]}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    # A fresh interpreter whose only child is the stage, so its peak RSS is the stage's own.
    measure = (
        "import resource, subprocess, sys; code = subprocess.run([sys.executable, '-m', 'tasks.ingest']).returncode; "
        "print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)"
    )
    result = subprocess.run(
        [str(BIN / "python"), "-c", measure],
        cwd=tmp_path,
        env={**tool_env(), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    code, peak_mib = map(int, result.stdout.split())
    lines = result.stderr.strip().splitlines()
    assert code == BAD_INPUT_EXIT and len(lines) == 1, result.stderr[-2000:]
    assert re.search(message, lines[0]), lines[0]
    assert peak_mib < 300, f"peak RSS {peak_mib} MiB"


def test_a_hub_source_reads_only_its_record_limit(tmp_path):
    import datasets

    from tasks.data.sources import read_source
    from tasks.plumbing.params import DataParams

    folder = tmp_path / "local-dataset"
    datasets.Dataset.from_dict({"text": [f"record {n}" for n in range(50)]}).to_parquet(str(folder / "train.parquet"))
    limited = DataParams(sources=["x"], hub_records=7)
    records = [record["text"] for _, record in read_source(f"hf:{folder}", ["text"], limited)]
    assert records == [f"record {n}" for n in range(7)]
    assert len(list(read_source(f"hf:{folder}", ["text"], DataParams(sources=["x"])))) == 50
