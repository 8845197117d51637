"""Atomic outputs: a failed write leaves the previous output whole."""

from __future__ import annotations

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
