"""Background jobs: stopping a job stops its whole process group (torchrun workers included), one job
at a time however many start at once, reading job state changes nothing, and concurrent diagnoses on
the shared models give each caller its own, correct result."""
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from kd import jobs
from kd.config import preset
from kd.progress import read_status
from kd.runs import list_runs, run_status


def test_stop_kills_torchrun_and_its_workers(tiny_dataset, tmp_path):
    runs = tmp_path / "runs"
    cfg = preset("tiny", epochs=500)  # long enough to be stopped mid-run
    cfg.data, cfg.out, cfg.device, cfg.baseline = str(tiny_dataset), str(runs / "ddp"), "cpu", False
    job = jobs.start_job(cfg, "finetune", gpus=2, runs_root=runs)  # torchrun --nproc_per_node=2, gloo on CPU
    try:
        deadline = time.time() + 180
        while time.time() < deadline and len(jobs.process_tree(job["pid"])) < 3:  # launcher + 2 workers
            time.sleep(0.2)
        family = jobs.process_tree(job["pid"])
        assert len(family) >= 3, (runs / "ddp" / "train.log").read_text()[-2000:]
        assert jobs.current_job(runs)["pid"] == job["pid"]
    finally:
        assert jobs.stop_job(runs, timeout=20)
    alive = [pid for pid in family if jobs.process_tree(pid)]
    assert alive == [], f"still running after stop: {alive}"
    assert jobs.current_job(runs) is None
    assert read_status(runs / "ddp")["state"] == "stopped"


@pytest.fixture
def sleeping_jobs(monkeypatch):
    """Jobs that are `sleep 60` instead of a training (same Popen options): starting one costs nothing.
    Yields the list of processes launched."""
    launched = []
    real_popen = subprocess.Popen

    def popen(argv, **kwargs):
        proc = real_popen(["sleep", "60"], **kwargs)
        launched.append(proc)
        return proc

    monkeypatch.setattr(jobs.subprocess, "Popen", popen)
    yield launched
    for proc in launched:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_concurrent_starts_run_exactly_one_job(tiny_dataset, tmp_path, sleeping_jobs):
    runs = tmp_path / "runs"
    for trial in range(6):
        starters = 8
        barrier = threading.Barrier(starters)
        started, refused = [], []

        def start(k: int):
            cfg = preset("tiny")
            cfg.data, cfg.out, cfg.device = str(tiny_dataset), str(runs / f"t{trial}-{k}"), "cpu"
            barrier.wait()
            try:
                started.append(jobs.start_job(cfg, "finetune", runs_root=runs))
            except jobs.JobError as e:
                refused.append(str(e))

        threads = [threading.Thread(target=start, args=(k,)) for k in range(starters)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        alive = [p for p in sleeping_jobs if p.poll() is None]
        assert len(started) == 1 and len(alive) == 1, f"trial {trial}: {len(started)} jobs started, {len(alive)} running"
        assert len(refused) == starters - 1 and all("already running" in m for m in refused)
        assert jobs.current_job(runs)["pid"] == started[0]["pid"] == alive[0].pid
        assert jobs.stop_job(runs, timeout=5)
        assert jobs.current_job(runs) is None


def test_a_killed_job_frees_the_lock_and_reads_as_failed_without_any_write(tiny_dataset, tmp_path, sleeping_jobs):
    runs = tmp_path / "runs"
    cfg = preset("tiny")
    cfg.data, cfg.out, cfg.device = str(tiny_dataset), str(runs / "crashed"), "cpu"
    job = jobs.start_job(cfg, "finetune", runs_root=runs)
    run_dir = Path(job["run_dir"])
    (run_dir / "status.json").write_text(json.dumps({"state": "running", "phases": ["finetune"], "phase": "finetune"}))
    with pytest.raises(jobs.JobError, match=f"already running .*pid {job['pid']}"):
        jobs.start_job(cfg, "finetune", runs_root=runs)
    os.kill(job["pid"], signal.SIGKILL)  # no clean-up code runs: the kernel alone frees the lock
    sleeping_jobs[0].wait()
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in [*runs.iterdir(), *run_dir.iterdir()] if p.is_file()}
    for _ in range(3):  # what the app does on every rerun
        assert jobs.current_job(runs) is None
        (listed,) = list_runs(runs)
        assert listed["status"]["state"] == "failed" and "ended unexpectedly" in listed["status"]["error"]
        assert run_status(run_dir)["state"] == "failed"
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in [*runs.iterdir(), *run_dir.iterdir()] if p.is_file()}
    assert after == before, "reading the job state changed files"
    assert jobs.start_job(cfg, "finetune", resume=True, runs_root=runs)["pid"] != job["pid"]


def test_a_half_written_lock_is_neither_a_job_nor_deleted(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / jobs.LOCK_FILE).write_text('{"pid": 12')  # what a start killed mid-write leaves in the old format
    assert jobs.current_job(runs) is None
    assert (runs / jobs.LOCK_FILE).read_text() == '{"pid": 12'


def test_concurrent_diagnoses_do_not_mix_results(tiny_weights):
    from kd import serving
    from kd.serving import load_pair
    from tests.fixtures.xray_fixtures import add_opacities, png_bytes, xray_like_array

    pair = load_pair(tiny_weights)
    images = [png_bytes(xray_like_array(96, 96, seed=s)) for s in range(3)]
    images.append(png_bytes(add_opacities(xray_like_array(96, 96, seed=9), seed=1)))
    expected = [serving.diagnose(pair, data) for data in images]
    results: dict[int, list] = {}

    def session(k: int):
        results[k] = [serving.diagnose(pair, images[(i + k) % len(images)]) for i in range(6)]

    threads = [threading.Thread(target=session, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, got in results.items():
        for i, d in enumerate(got):
            want = expected[(i + k) % len(images)]
            for role in ("teacher", "student"):
                assert d.views[role].probability == want.views[role].probability
                assert np.allclose(d.views[role].cam, want.views[role].cam, atol=1e-6)
    for loaded in pair.models.values():  # hooks released: no forward/backward hooks left behind
        for module in loaded.model.modules():
            assert not module._forward_hooks and not module._backward_hooks


def test_a_finished_job_is_reaped_not_left_a_zombie(tiny_dataset, tmp_path, monkeypatch):
    """Issue 12, item 11: the app's process waits for its ended job (no <defunct> child for the server's life)."""
    import psutil

    real_popen = subprocess.Popen
    monkeypatch.setattr(jobs.subprocess, "Popen", lambda argv, **kwargs: real_popen(["sleep", "0.5"], **kwargs))
    runs = tmp_path / "runs"
    cfg = preset("tiny")
    cfg.data, cfg.out, cfg.device = str(tiny_dataset), str(runs / "quick"), "cpu"
    pid = jobs.start_job(cfg, "finetune", runs_root=runs)["pid"]
    deadline = time.time() + 20
    while time.time() < deadline and jobs.current_job(runs) is not None:
        time.sleep(0.1)
    time.sleep(0.3)
    assert jobs.current_job(runs) is None  # what every rerun of the Train page asks
    try:
        status = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        status = "gone"
    assert status != psutil.STATUS_ZOMBIE
