"""Atomic outputs: a failed write leaves the previous output whole."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tasks.common import PipelineError, atomic_output, write_json


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


@pytest.mark.parametrize("imported_first", [True, False])
def test_a_stage_writing_to_a_log_shows_no_progress_bars(tmp_path, imported_first):
    # A stage run by Prefect or redirected to a file: saving a model must not print transformers' shard bar.
    script = "\n".join(
        [
            "import transformers" if imported_first else "",
            "from tasks.common import run_cli",
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
            "from tasks.common import run_cli",
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
