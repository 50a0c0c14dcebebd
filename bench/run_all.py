"""Run the CPU benchmarks and end with one line per target:  TARGET <name> <measured> <goal> PASS|FAIL

    python bench/run_all.py

Every compared variant is timed interleaved with its baseline, three rounds (bench/common.py's
`interleaved`); a ratio's TARGET judges the median of the three per-round ratios, whose range is printed
on the line before it.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import app_memory
import common  # noqa: F401  (puts the repository on sys.path)
import diagnose
import inference
import resolution
from common import target


def run_script(script: str, *args: str) -> str:
    """A benchmark in its own process (so its peak RSS is its own); returns its output."""
    done = subprocess.run([sys.executable, str(Path(__file__).parent / script), *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{script} failed:\n{done.stdout}\n{done.stderr[-3000:]}")
    return done.stdout


def main() -> int:
    lines = []
    print("== inference (teacher vs student)")
    lines += inference.main(["--repeats", "3"])
    print("== diagnose end to end")
    lines += diagnose.main(["--repeats", "3"])
    # each phase of the cpu preset: SSL (two views), fine-tuning, distillation (teacher forward + student step)
    for objective, arch, size in (("ssl", "resnet50", 96), ("supervised", "resnet50", 128), ("distill", "resnet18", 128)):
        print(f"== training data path ({objective}, {arch}, {size} px)")
        out = run_script("train_throughput.py", "--objective", objective, "--arch", arch, "--size", str(size),
                         "--batch", "32", "--steps", "6").splitlines()
        print("\n".join(line for line in out if not line.startswith("TARGET")))
        ratio = float(next(line for line in out if line.startswith("TARGET data_path_vs_model_only")).split()[2])
        lines.append(target(f"data_path_vs_model_only_{objective}_{arch}_{size}px", ratio, 0.9))
    print("== lower resolution in the early phases (cpu preset vs all at 224 px)")
    resolution.main([])
    print("== memory of the real app (streamlit + chromium, shipped weights)")
    app_memory.main([])
    print("\n".join(lines))
    return 0 if all(line.endswith("PASS") for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
