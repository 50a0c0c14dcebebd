"""One writer per run folder and per job slot: a second is refused with a message naming the holder,
and a holder killed at any point leaves nothing locked."""
import json
import signal
import subprocess
import sys
import threading
import time

import pytest

from kd import locks
from kd.cli import main
from tests.fixtures.xray_fixtures import write_kermany_dataset

HOLD = "import sys, time; from kd import locks; locks.acquire(sys.argv[1]); print('held', flush=True); time.sleep(60)"


def test_a_killed_holder_releases_the_lock(tmp_path):
    path = tmp_path / "x.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert locks.holder(path)["pid"] == holder.pid
        with pytest.raises(locks.LockedError, match=f"process {holder.pid}"):
            locks.acquire(path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert locks.holder(path) is None
    with locks.acquire(path):
        assert locks.holder(path)["pid"] > 0


def test_holder_only_reads(tmp_path):
    assert locks.holder(tmp_path / "never.lock") is None
    assert not (tmp_path / "never.lock").exists()


def test_a_second_cli_run_on_the_same_folder_is_refused_and_touches_nothing(tmp_path, monkeypatch, capsys):
    """The first run is held while preparing its data; the second, same --out, must leave its files alone."""
    import kd.pipeline

    data = write_kermany_dataset(tmp_path / "data", n_per_class=(4, 4), size=40)
    out = tmp_path / "run"
    argv = ["finetune", "--data", str(data), "--out", str(out), "--preset", "tiny", "--device", "cpu"]
    first_busy, finish_first = threading.Event(), threading.Event()
    calls = []

    class BusyData:  # stands in for the first run's data preparation, for as long as the test needs
        def __init__(self, *args, **kwargs):
            calls.append(1)
            if len(calls) > 1:
                raise AssertionError("the second run got as far as loading data")
            first_busy.set()
            finish_first.wait(60)
            raise KeyboardInterrupt

    monkeypatch.setattr(kd.pipeline, "RunData", BusyData)
    results = {}
    first = threading.Thread(target=lambda: results.setdefault("first", main(argv)))
    first.start()
    try:
        assert first_busy.wait(60)
        with open(out / "progress.jsonl", "a") as f:  # as a running first run would have
            f.write(json.dumps({"time": time.time(), "kind": "step", "phase": "finetune", "global_step": 1}) + "\n")
        files = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir() if p.is_file()}
        capsys.readouterr()
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir() if p.is_file()} == files
        assert json.loads((out / "status.json").read_text())["state"] == "running"
        assert err.startswith("error:") and "in use by another run" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
    finally:
        finish_first.set()
        first.join(60)
    assert results["first"] == 130 and len(calls) == 1
