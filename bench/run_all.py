"""Run the CPU benchmarks and end with one line per target:  TARGET <name> <measured> <goal> PASS|FAIL

    python bench/run_all.py [--quick]

--quick (for CI-like checks): every target still from three interleaved rounds, with fewer repeats and training
steps per round, and without the two slowest parts (the lower-resolution phases, and the real app's memory
under streamlit + chromium). The suite prints its own wall time at the end.

Every compared variant is timed interleaved with its baseline, three rounds (bench/common.py's
`interleaved`); a ratio's TARGET judges the median of the three per-round ratios, whose range is printed
on the line before it.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import app_memory
import common  # noqa: F401  (puts the repository on sys.path)
import diagnose
import inference
import predict_bulk
import resolution
from common import target


def run_script(script: str, *args: str) -> str:
    """A benchmark in its own process (so its peak RSS is its own); returns its output."""
    done = subprocess.run([sys.executable, str(Path(__file__).parent / script), *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{script} failed:\n{done.stdout}\n{done.stderr[-3000:]}")
    return done.stdout


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats and steps; skips resolution and app memory")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    repeats, steps = ("1", "3") if args.quick else ("3", "6")
    lines = []
    print("== inference (teacher vs student)")
    lines += inference.main(["--repeats", repeats])
    print("== diagnose end to end")
    lines += diagnose.main(["--repeats", repeats])
    print("== kd predict on a folder (one by one vs batched)")
    lines += predict_bulk.main(["--files", "16" if args.quick else "40"])
    # each phase of the cpu preset: SSL (two views), fine-tuning, distillation (teacher forward + student step)
    for objective, arch, size in (("ssl", "resnet50", 96), ("supervised", "resnet50", 128), ("distill", "resnet18", 128)):
        print(f"== training data path ({objective}, {arch}, {size} px)")
        out = run_script("train_throughput.py", "--objective", objective, "--arch", arch, "--size", str(size),
                         "--batch", "32", "--steps", steps).splitlines()
        print("\n".join(line for line in out if not line.startswith("TARGET")))
        ratio = float(next(line for line in out if line.startswith("TARGET data_path_vs_model_only")).split()[2])
        lines.append(target(f"data_path_vs_model_only_{objective}_{arch}_{size}px", ratio, 0.9))
    if not args.quick:
        print("== lower resolution in the early phases (cpu preset vs all at 224 px)")
        resolution.main([])
        print("== memory of the real app (streamlit + chromium, shipped weights)")
        app_memory.main([])
    print("\n".join(lines))
    print(f"bench/run_all.py{' --quick' if args.quick else ''}: {len(lines)} targets, "
          f"{sum(line.endswith('PASS') for line in lines)} PASS, wall time {time.perf_counter() - t0:.0f} s")
    return 0 if all(line.endswith("PASS") for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
