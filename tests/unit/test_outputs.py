"""Atomic outputs: a failed write, or a stop, leaves the previous output whole."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from tasks.plumbing.errors import PipelineError
from tasks.plumbing.outputs import atomic_output, write_json


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == '{\n  "v": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_folder_is_replaced_whole(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.bin").write_text("old")
    with atomic_output(target) as tmp:
        tmp.mkdir()
        (tmp / "new.bin").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_file_never_takes_the_place_of_a_folder(tmp_path):
    """A user-named output that is an existing folder is refused whole: nothing in it is removed."""
    owned = tmp_path / "reports"
    owned.mkdir()
    (owned / "q3.html").write_text("keep me")
    with pytest.raises(PipelineError, match="reports: is a folder; name a file"), atomic_output(owned) as tmp:
        tmp.write_text("<html>")
    assert [p.name for p in owned.iterdir()] == ["q3.html"] and (owned / "q3.html").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reports"]


def test_a_full_disk_keeps_the_previous_output_and_says_so(tmp_path):
    import errno

    dest = tmp_path / "models" / "gpt2"
    dest.mkdir(parents=True)
    (dest / "model.safetensors").write_text("previous")
    with pytest.raises(PipelineError) as info, atomic_output(dest) as tmp:
        tmp.mkdir()
        (tmp / "model.safetensors").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert str(info.value).startswith(f"{dest}: the disk filled up while writing it ([Errno 28] No space left")
    assert str(info.value).endswith(f"and rerun; the previous {dest} is kept")
    assert (dest / "model.safetensors").read_text() == "previous"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["gpt2"]


STOPPED_LINE = (
    "error: stopped by SIGTERM before it finished; its previous outputs are kept; rerun `dvc repro` to continue\n"
)


def run_stage(folder, body: str) -> subprocess.CompletedProcess:
    """A stage run through run_cli, as DVC runs one: body is main()'s code, with atomic_outputs at hand."""
    script = "\n".join(
        [
            "import signal",
            "from pathlib import Path",
            "from tasks.plumbing import outputs",
            "from tasks.plumbing.outputs import atomic_output, atomic_outputs",
            "from tasks.plumbing.stage import run_cli",
            "class Finalized:",
            "    def __del__(self):  # a stop that lands in a finalizer: its Stopped is only printed, then dropped",
            "        signal.raise_signal(signal.SIGTERM)",
            "def main():",
            *(f"    {line}" for line in body.splitlines()),
            "run_cli(main)",
        ]
    )
    return subprocess.run(
        [sys.executable, "-c", script], cwd=folder, capture_output=True, text=True, check=False, timeout=60
    )


def test_a_stop_during_a_commit_waits_until_every_output_is_swapped_in(tmp_path):
    (tmp_path / "blocks").write_text("old")
    (tmp_path / "tokenizer").write_text("old")
    body = """
swap = outputs._swap_in
def swap_then_stop(tmp, dest):  # SIGTERM lands between the two renames
    swap(tmp, dest)
    signal.raise_signal(signal.SIGTERM)
outputs._swap_in = swap_then_stop
with atomic_outputs(Path("blocks"), Path("tokenizer")) as (blocks, tokenizer):
    blocks.write_text("new")
    tokenizer.write_text("new")
"""
    result = run_stage(tmp_path, body)
    assert (result.returncode, result.stderr) == (128 + 15, STOPPED_LINE)
    # The new blocks never pair with the old tokenizer.
    assert [(tmp_path / name).read_text() for name in ("blocks", "tokenizer")] == ["new", "new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocks", "tokenizer"]


@pytest.mark.parametrize("writing", [True, False])
def test_a_stop_swallowed_on_its_way_up_still_stops_the_stage(tmp_path, writing):
    (tmp_path / "model").write_text("old")
    body = (
        'with atomic_output(Path("model")) as tmp:\n    tmp.write_text("new")\n    Finalized()'
        if writing
        else "Finalized()"
    )
    result = run_stage(tmp_path, body + '\nprint("finished")')
    assert result.returncode == 128 + 15 and result.stdout == ("" if writing else "finished\n")
    assert result.stderr.endswith(STOPPED_LINE) and "Exception ignored" in result.stderr
    assert (tmp_path / "model").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("imported_first", [True, False])
def test_a_stage_writing_to_a_log_shows_no_progress_bars(tmp_path, imported_first):
    # A stage run by Prefect or redirected to a file: saving a model must not print transformers' shard bar.
    script = "\n".join(
        [
            "import transformers" if imported_first else "",
            "from tasks.plumbing.stage import run_cli",
            "def main():",
            "    from transformers import GPT2Config, GPT2LMHeadModel",
            "    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=1, vocab_size=16, n_positions=8))",
            f"    model.save_pretrained({str(tmp_path / 'model')!r})",
            "    print('saved')",
            "run_cli(main)",
        ]
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120)
    assert result.stdout.strip() == "saved"
    assert "Writing model shards" not in result.stderr and "%|" not in result.stderr


def test_a_warning_in_a_stage_is_one_line():
    script = "\n".join(
        [
            "import warnings",
            "from tasks.plumbing.stage import run_cli",
            "def main():",
            "    warnings.warn('the corpus is small;\\n  add text', UserWarning)",
            "    print('done')",
            "run_cli(main)",
        ]
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout == "done\n"
    assert result.stderr == "warning: UserWarning: the corpus is small; add text (<string>:4)\n"


def test_the_suite_is_offline_by_construction(loopback_only):
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE  # read at import, after tests/__init__.py set it
    with pytest.raises(OSError, match=r"the test suite is offline: connection to \('192\.0\.2\.1', 80\) refused"):
        socket.create_connection(("192.0.2.1", 80), timeout=1)
    assert loopback_only == ["('192.0.2.1', 80)"]
    loopback_only.clear()  # seen and expected here; any other test that tries fails
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        socket.create_connection(server.getsockname(), timeout=1).close()  # the loopback stays open


def test_what_a_killed_writer_left_is_removed_by_the_next_write(tmp_path):
    """A stage killed outright (SIGKILL) leaves `.<name>.tmp-<pid>` as large as the output: the next write of that
    output removes it, and the `.old-` of a swap, once their process is gone; a live writer's is kept."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = int(gone.stdout), os.getppid()
    for left in (f".prepared.tmp-{dead}", f".prepared.old-{dead}", f".prepared.tmp-{alive}", f".other.tmp-{dead}"):
        (tmp_path / left / "train").mkdir(parents=True)
    with atomic_output(tmp_path / "prepared") as tmp:
        tmp.mkdir()
        (tmp / "stats.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".other.tmp-{dead}", f".prepared.tmp-{alive}", "prepared"]
