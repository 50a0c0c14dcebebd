"""Shared by the benchmarks: timing, the models to time, and the TARGET line format."""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"


def seconds(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def target(name: str, measured: float, goal: float, higher_is_better: bool = True, unit: str = "") -> str:
    ok = measured >= goal if higher_is_better else measured <= goal
    line = f"TARGET {name} {measured:.3g}{unit} {'>=' if higher_is_better else '<='}{goal:g}{unit} {'PASS' if ok else 'FAIL'}"
    print(line, flush=True)
    return line


def model_pair():
    """The shipped weights if present, else randomly initialised models of the same architectures
    (timings depend on the architecture, not the weights)."""
    from kd.inference import LoadedModel, ModelPair, default_weights, load_pair
    from kd.models import build_student, build_teacher

    try:
        return load_pair()
    except Exception:
        models = {"teacher": LoadedModel("teacher", build_teacher().eval(), 0.5),
                  "student": LoadedModel("student", build_student().eval(), 0.5)}
        return ModelPair({"input": {"size": 224}}, models, default_weights())
