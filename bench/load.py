"""Diagnose latency idle vs under load: two concurrent sessions diagnosing while a training job runs.

    python bench/load.py [--calls 4]

idle   : one caller, nothing else running (the baseline of the ratio)
loaded : two threads (two browser sessions share the cached models) diagnosing at once while a
         background training job (kd.jobs, tiny preset at 96 px) uses the CPU.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from common import model_pair


def timed_diagnoses(pair, data: bytes, calls: int, out: list[float]) -> None:
    from kd import serving

    for _ in range(calls):
        t0 = time.perf_counter()
        serving.diagnose(pair, data, "bench.jpeg")
        out.append(time.perf_counter() - t0)


def main(argv=None) -> dict:
    from diagnose import largest_sample
    from kd import jobs
    from kd.config import preset
    from tests.fixtures.xray_fixtures import write_kermany_dataset

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=4)
    args = p.parse_args(argv)
    pair, data = model_pair(), largest_sample()
    timed_diagnoses(pair, data, 1, [])  # warm-up
    idle: list[float] = []
    timed_diagnoses(pair, data, args.calls, idle)

    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) / "runs"
        cfg = preset("tiny", image_size=96, epochs=1000, batch_size=16)
        cfg.data = str(write_kermany_dataset(Path(tmp) / "data", n_per_class=(40, 40), size=128))
        cfg.out, cfg.device, cfg.baseline = str(runs / "load"), "cpu", False
        jobs.start_job(cfg, "finetune", runs_root=runs)
        try:
            time.sleep(15)  # let the job import torch and start training
            loaded: list[list[float]] = [[], []]
            threads = [threading.Thread(target=timed_diagnoses, args=(pair, data, args.calls, loaded[i]))
                       for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            jobs.stop_job(runs)
    a = statistics.median(idle)
    b = statistics.median(loaded[0] + loaded[1])
    print(f"diagnose median latency: idle {a:.2f} s; two sessions + training job {b:.2f} s; loaded/idle {b / a:.2f}x")
    return {"idle": a, "loaded": b}


if __name__ == "__main__":
    main()
