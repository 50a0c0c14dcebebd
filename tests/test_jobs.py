"""Background jobs: stopping a job stops its whole process group (torchrun workers included), and
concurrent diagnoses on the shared models give each caller its own, correct result."""
import threading
import time
from pathlib import Path

import numpy as np

from kd import jobs
from kd.config import preset
from kd.progress import read_status


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
    assert jobs.current_job(runs) is None and not (runs / jobs.LOCK_FILE).exists()
    assert read_status(runs / "ddp")["state"] == "stopped"


def test_concurrent_diagnoses_do_not_mix_results(tiny_weights):
    from kd import cam
    from kd.inference import load_pair
    from kd.testing.xray_fixtures import add_opacities, png_bytes, xray_like_array

    pair = load_pair(tiny_weights)
    images = [png_bytes(xray_like_array(96, 96, seed=s)) for s in range(3)]
    images.append(png_bytes(add_opacities(xray_like_array(96, 96, seed=9), seed=1)))
    expected = [cam.diagnose(pair, data) for data in images]
    results: dict[int, list] = {}

    def session(k: int):
        results[k] = [cam.diagnose(pair, images[(i + k) % len(images)]) for i in range(6)]

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
