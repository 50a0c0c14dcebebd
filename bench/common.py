"""Shared by the benchmarks: timing, interleaved comparisons, the models to time, and the TARGET line format."""
from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# chest_xray/ (Kermany layout) and fullres_samples/ (full-resolution JPEGs); beside the checkout by default
SHARED = Path(os.environ.get("KD_BENCH_DATA") or REPO.parent / "shared" / "data")
MIN_PAIRS = 3  # a ratio that a TARGET line judges is the median of at least this many interleaved pairs


def seconds(fn, repeats: int = 5, warmup: int = 1, clock: Callable[[], float] = time.perf_counter) -> float:
    """Median wall time of fn() over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


@dataclass(frozen=True)
class Ratio:
    """One variant's measurement over another's, one value per interleaved pair (the same round)."""

    values: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def __str__(self) -> str:
        if len(self.values) == 1:
            return f"{self.median:.2f} (one pair: no spread)"
        return f"{self.median:.2f} (median of {len(self.values)} pairs, range {self.low:.2f}-{self.high:.2f})"


def interleaved(variants: dict, pairs: int = MIN_PAIRS) -> dict:
    """Measure every variant `pairs` times, interleaved: A B A B A B (A B C A B C ...), not A A A B B B.

    Each variant is a callable returning one measurement (images/s, seconds, ...). On a shared machine
    whatever else runs lands on both sides of a pair instead of on one variant, and `ratio` compares the
    two within each pair. Returns {variant: [measurement of pair 1, pair 2, ...]}."""
    if pairs < 1:
        raise ValueError(f"pairs must be at least 1 (got {pairs})")
    out = {name: [] for name in variants}
    for _ in range(pairs):
        for name, measure in variants.items():
            out[name].append(measure())
    return out


def ratio(numerator: Sequence[float], denominator: Sequence[float]) -> Ratio:
    """numerator[i] / denominator[i] for each interleaved pair i."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError("one measurement of each side per pair")
    return Ratio(tuple(n / d for n, d in zip(numerator, denominator)))


def target(name: str, measured: float | Ratio, goal: float, higher_is_better: bool = True, unit: str = "") -> str:
    """Print and return `TARGET <name> <measured> <goal> PASS|FAIL`. A Ratio is judged on its median alone
    (one pair disturbed by other work cannot flip the verdict); its spread is printed on the line before."""
    if isinstance(measured, Ratio):
        if len(measured.values) < MIN_PAIRS:
            raise ValueError(f"{name}: a TARGET needs the median of at least {MIN_PAIRS} pairs "
                             f"(got {len(measured.values)})")
        print(f"{name}: {measured}", flush=True)
        measured = measured.median
    ok = measured >= goal if higher_is_better else measured <= goal
    line = f"TARGET {name} {measured:.3g}{unit} {'>=' if higher_is_better else '<='}{goal:g}{unit} {'PASS' if ok else 'FAIL'}"
    print(line, flush=True)
    return line


def model_pair():
    """The shipped weights if present, else randomly initialised models of the same architectures
    (timings depend on the architecture, not the weights)."""
    from kd.paths import default_weights
    from kd.serving import LoadedModel, ModelPair, load_pair
    from kd.models import build_student, build_teacher

    try:
        return load_pair()
    except Exception:
        models = {"teacher": LoadedModel("teacher", build_teacher().eval(), 0.5),
                  "student": LoadedModel("student", build_student().eval(), 0.5)}
        return ModelPair({"input": {"size": 224}}, models, default_weights())
