"""One exit status contract (tasks.plumbing.errors): bad input 2, a fault 1, a stop 128 + the signal, for the stages,
the CLI and the flow's retry condition alike."""

from __future__ import annotations

import re
import signal
import subprocess

from prefect.states import Failed
from typer.testing import CliRunner

from flows.cli import app
from flows.pipeline import StageFailed, stage_status, worth_retrying
from tasks.plumbing.errors import (
    BAD_INPUT_EXIT,
    FAULT_EXIT,
    OUTPUTS_ELSEWHERE_EXIT,
    PRUNED_EXIT,
    PipelineError,
    Stopped,
    TrialPruned,
    report_error,
)
from tests.helpers import BIN, ROOT, copy_project, tool_env


def test_report_error_prints_one_line_and_names_the_status(capsys):
    assert report_error(PipelineError("params.yaml: train.seed: bad")) == BAD_INPUT_EXIT
    assert report_error(ValueError("boom")) == FAULT_EXIT
    assert report_error(Stopped(signum=signal.SIGTERM)) == 128 + signal.SIGTERM
    wrapped = RuntimeError("a library's own error")
    wrapped.__cause__ = Stopped(signum=signal.SIGINT)
    assert report_error(wrapped) == 128 + signal.SIGINT
    assert report_error(StageFailed("train", 137, "killed")) == 137
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "error: params.yaml: train.seed: bad"
    assert lines[1].startswith("error: ValueError: boom (set GPT2_PIPELINE_DEBUG=1")
    assert all(line.startswith("error: ") for line in lines) and len(lines) == 5
    # A trial the sweep's pruner stopped: its own status and its line, not called an error.
    assert report_error(TrialPruned("train: pruned at step 20 by sweep s")) == PRUNED_EXIT
    assert capsys.readouterr().err == "train: pruned at step 20 by sweep s\n"


def test_the_flow_reads_the_stage_s_status_through_dvc():
    """DVC exits 255 whatever its stage did: the flow takes the stage's status from DVC's error line (tests/
    integration/test_retries.py watches the real retries)."""
    failed = "ERROR: failed to reproduce 'train': failed to run: python3 -m tasks.train, exited with {}"
    assert stage_status(["train: step 10/150", failed.format(2)], 255) == BAD_INPUT_EXIT
    assert stage_status([failed.format(1)], 255) == FAULT_EXIT
    assert stage_status([failed.format(-9)], 255) == 128 + signal.SIGKILL
    assert stage_status(["ERROR: '/p/data/prepared' is busy"], 255) == 255  # DVC itself failed


def test_the_flow_retries_by_the_same_contract():
    assert worth_retrying(None, None, Failed(data=StageFailed("train", FAULT_EXIT, "crash"))) is True
    assert worth_retrying(None, None, Failed(data=StageFailed("train", BAD_INPUT_EXIT, "bad"))) is False
    assert worth_retrying(None, None, Failed(data=StageFailed("train", OUTPUTS_ELSEWHERE_EXIT, "elsewhere"))) is False
    assert worth_retrying(None, None, Failed(data=StageFailed("train", PRUNED_EXIT, "pruned"))) is False


def test_the_readme_lists_every_exit_status_the_code_gives():
    """The README's table of exit statuses has a row for each status of tasks.plumbing.errors, and no other."""
    from tasks.plumbing import errors

    table = (ROOT / "README.md").read_text().split("| status | meaning |", 1)[1].split("\n\n", 1)[0]
    listed = re.findall(r"^\| ([^|]+?) \|", table, re.M)[1:]  # after the header's rule
    given = sorted(value for name, value in vars(errors).items() if name.endswith("_EXIT"))
    assert listed == ["0", *map(str, given), "128 + n"]


def test_a_stage_and_the_cli_report_bad_input_alike(tmp_path, monkeypatch):
    project = copy_project(tmp_path)
    (project / "params.yaml").write_text((project / "params.yaml").read_text().replace("seed: 42", "seed: x"))
    stage = subprocess.run(
        [str(BIN / "python"), "-m", "tasks.train"], cwd=project, env=tool_env(), capture_output=True, text=True
    )
    monkeypatch.chdir(project)
    cli = CliRunner().invoke(app, ["rollback"])
    expected = "error: params.yaml: train.seed: input should be a valid integer (got 'x')"
    assert (stage.returncode, stage.stderr.strip()) == (BAD_INPUT_EXIT, expected)
    assert (cli.exit_code, cli.stderr.strip()) == (BAD_INPUT_EXIT, expected)
