"""Run the CPU benchmarks and end with one line per target:  TARGET <name> <measured> <goal> PASS|FAIL

    python bench/run_all.py
"""
from __future__ import annotations

import io
import contextlib
import resource
import sys

import app_memory
import common  # noqa: F401  (puts the repository on sys.path)
import diagnose
import inference
import resolution
import train_throughput
from common import target


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    lines = []
    print("== inference (teacher vs student)")
    lines += inference.main(["--repeats", "5"])
    print("== diagnose end to end")
    lines += diagnose.main(["--repeats", "3"])
    print(f"   peak RSS with both models loaded and diagnosed: {peak_rss_mib():.0f} MiB")
    # each phase of the cpu preset: SSL (two views), fine-tuning, distillation (teacher forward + student step)
    for objective, arch, size in (("ssl", "resnet50", 96), ("supervised", "resnet50", 128), ("distill", "resnet18", 128)):
        print(f"== training data path ({objective}, {arch}, {size} px)")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            r = train_throughput.main(["--objective", objective, "--arch", arch, "--size", str(size), "--batch", "32",
                                       "--steps", "6"])
        print("\n".join(line for line in out.getvalue().splitlines() if not line.startswith("TARGET")))
        lines.append(target(f"data_path_vs_model_only_{objective}_{arch}_{size}px", r["ours"] / r["model_only"], 0.9))
    print(f"   peak RSS of this process (includes CPU training steps): {peak_rss_mib():.0f} MiB")
    print("== lower resolution in the early phases (cpu preset vs all at 224 px)")
    resolution.main([])
    print("== memory of the real app (streamlit + chromium, shipped weights)")
    app_memory.main([])
    print("\n".join(lines))
    return 0 if all(line.endswith("PASS") for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
