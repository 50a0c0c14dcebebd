"""Uploads stay in memory; unwritable output folders get a message, not a traceback."""
import os
import sys

import pytest

from kd.cli import main
from tests.fixtures.xray_fixtures import dicom_bytes, jpeg_bytes, write_kermany_dataset, xray16_array, xray_like_array

_WRITES: list[str] | None = None


def _audit(event, args):
    if _WRITES is None:
        return
    if event == "open" and len(args) >= 2:
        path, mode = args[0], args[1]
        flags = args[2] if len(args) > 2 else 0
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writing:
            _WRITES.append(str(path))
    elif event in ("os.rename", "os.replace", "os.mkdir", "shutil.copyfile", "os.link", "os.symlink"):
        _WRITES.append(f"{event} {args[0]}")


sys.addaudithook(_audit)


def test_diagnosing_uploads_creates_no_file(tiny_weights):
    global _WRITES
    from kd import serving
    from kd.serving import load_pair

    pair = load_pair(tiny_weights)
    uploads = [jpeg_bytes(xray_like_array(600, 500)), dicom_bytes(xray16_array())]
    serving.diagnose(pair, uploads[0], "warm-up.jpg")  # first call may import lazily-loaded modules
    _WRITES = []
    try:
        for data in uploads:
            d = serving.diagnose(pair, data, "upload")
            assert set(d.views) == {"teacher", "student"}
    finally:
        writes, _WRITES = _WRITES, None
    assert writes == [], f"diagnosing wrote to disk: {writes}"


def test_output_path_that_is_a_file_is_a_clear_message(tmp_path, capsys):
    data = write_kermany_dataset(tmp_path / "d", n_per_class=(4, 4), size=40)
    (tmp_path / "file").write_text("x")
    assert main(["pipeline", "--data", str(data), "--out", str(tmp_path / "file" / "run"), "--preset", "tiny"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err


def test_streamlit_config_is_locked_down():
    import tomllib
    from pathlib import Path

    cfg = tomllib.loads((Path(__file__).resolve().parent.parent / ".streamlit" / "config.toml").read_text())
    assert cfg["server"]["address"] == "127.0.0.1"  # local tool; exposing it is a documented, deliberate step
    assert cfg["server"]["enableXsrfProtection"] is True
    assert 0 < cfg["server"]["maxUploadSize"] <= 50
    assert cfg["browser"]["gatherUsageStats"] is False
    assert cfg["client"]["showErrorDetails"] in ("none", False)


def test_a_dataset_that_cannot_be_read_is_a_message_about_the_dataset(tmp_path, capsys):
    """Not an OSError about some file deep inside, and no claim about checkpoints of a run that never started."""
    assert main(["pipeline", "--data", "/proc", "--out", str(tmp_path / "run"), "--preset", "tiny"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: /proc has no train/ folder") and "Traceback" not in err
    assert "Checkpoints" not in err


def test_run_names_are_whole_matches():
    """A run name becomes a folder: only the whole name is checked (no trailing newline, no path)."""
    from pathlib import Path

    from kd import runs

    for bad in ("run\n", "run\n../x", "", ".hidden", "a/b", "x" * 65):
        with pytest.raises(runs.RunError, match="not allowed"):
            runs.run_dir_for(bad, "/tmp/runs")
    assert runs.run_dir_for("cpu-ref_2.b", "/tmp/runs") == Path("/tmp/runs/cpu-ref_2.b")


def test_a_run_named_like_a_state_file_is_refused(tmp_path, capsys):
    """A run called active.json would be a folder where the weights choice is written (issue 21, item 6)."""
    from kd import runs
    from kd.cli import main

    for bad in ("active.json", "ACTIVE.JSON", "x.jsonl", "job.lock", "r.tmp"):
        with pytest.raises(runs.RunError, match="is reserved"):
            runs.run_dir_for(bad, tmp_path)
    data = tmp_path / "data"  # refused before the dataset is even looked at
    assert main(["pipeline", "--data", str(data), "--out", str(tmp_path / "runs" / "active.json"), "--preset", "tiny"]) == 1
    assert "'active.json' is reserved" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
