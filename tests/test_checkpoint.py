"""A full disk is reported against the file that could not be written, and what a killed writer
leaves behind is cleaned up."""
import errno
import os
import subprocess
import sys
import time

import pytest
import torch

from kd import checkpoint
from kd.checkpoint import CheckpointError, load_state, save_state, write_json_atomic
from kd.cli import main
from tests.fixtures.xray_fixtures import write_kermany_dataset

# what torch.save raises when the disk fills up mid-write (no errno, no file name)
TORCH_FULL_DISK = "[enforce fail at inline_container.cc:603] . unexpected pos 4160 vs 4054"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_full_disk_in_torch_save_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "finetune" / "state.pt"
    save_state({"epoch": 1}, path)

    def full(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"PK\3\4 partial")
        raise RuntimeError(TORCH_FULL_DISK)

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(CheckpointError, match=f"Could not write {path}") as err:
        save_state({"epoch": 2}, path)
    assert "unexpected pos" in str(err.value) and "previous file" in str(err.value)
    assert load_state(path) == {"epoch": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.pt"]


def test_no_space_left_names_the_file(tmp_path, monkeypatch):
    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.os, "fsync", enospc)
    with pytest.raises(CheckpointError, match="status.json: No space left on device"):
        write_json_atomic(tmp_path / "status.json", {"state": "failed"})
    assert list(tmp_path.iterdir()) == []


def test_temporaries_of_killed_writers_are_removed_by_the_next_write_in_their_folder(tmp_path):
    path = tmp_path / "state.pt"
    dead = tmp_path / f".state.pt.{_dead_pid()}.k2j4h5g6.tmp"  # a writer SIGKILLed mid-save
    untagged = tmp_path / ".state.pt.ab12cd34.tmp"  # same, from before temporaries carried a pid
    live = tmp_path / f".state.pt.{os.getppid()}.zz99yy88.tmp"  # a writer still at work
    other = tmp_path / f".teacher.safetensors.{_dead_pid()}.aaaa1111.tmp"  # another file's, same folder
    cache = tmp_path / f".0123abcd.{_dead_pid()}.npy.tmp"  # an image cache's, from an earlier version
    recent = tmp_path / ".state.pt.ef56gh78.tmp"  # untagged but recent: perhaps still being written
    keep = tmp_path / "notes.tmp"
    for f in (dead, untagged, live, other, cache, recent, keep):
        f.write_bytes(b"\0" * 1024)
    old = time.time() - 2 * 3600
    os.utime(untagged, (old, old))
    save_state({"epoch": 3}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, live.name, recent.name, keep.name])
    assert load_state(path) == {"epoch": 3}


def test_a_failure_that_cannot_be_recorded_is_still_the_error_reported(tmp_path, monkeypatch, capsys):
    """The disk fills during a checkpoint; writing the failed status then fails too: the checkpoint's
    error is what the command says, and the run reads as failed."""
    import kd.pipeline
    import kd.progress
    from kd import runs

    data = write_kermany_dataset(tmp_path / "data", n_per_class=(4, 4), size=40)
    out = tmp_path / "run"
    disk_full = []
    real_write = kd.progress.write_json_atomic

    def status_writer(path, obj):
        if disk_full:
            raise CheckpointError(f"Could not write {path}: No space left on device. The previous file, if any, "
                                  "is intact.")
        real_write(path, obj)

    def phase_that_fills_the_disk(name, cfg, data, out, *args, **kwargs):
        disk_full.append(True)
        torch_save = checkpoint.torch.save
        monkeypatch.setattr(checkpoint.torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError(TORCH_FULL_DISK)))
        try:
            save_state({"epoch": 1}, out / name / "state.pt")
        finally:
            monkeypatch.setattr(checkpoint.torch, "save", torch_save)

    monkeypatch.setattr(kd.progress, "write_json_atomic", status_writer)
    monkeypatch.setattr(kd.pipeline, "run_phase", phase_that_fills_the_disk)
    code = main(["finetune", "--data", str(data), "--out", str(out), "--preset", "tiny", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1
    assert f"Could not write {out / 'finetune' / 'state.pt'}" in err and "status.json" not in err
    assert "Traceback" not in err
    assert runs.run_status(out)["state"] == "failed"
