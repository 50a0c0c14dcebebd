"""`kd predict` on a folder: files one at a time against the batched, threaded path, interleaved.

    python bench/predict_bulk.py [--files 40] [--pairs 3] [--batch-size 16] [--weights DIR]

one_by_one : what `kd predict` did before issue 21: for each file, read, decode, the refusal check's
             teacher pass, then each model's forward, at batch 1 (kd.serving.predict_bytes in a loop).
batched    : kd.serving.predict_files, what `kd predict` does now: decoding in two threads one batch
             ahead, then per batch one teacher pass that feeds the refusal check its layer3 map and gives the
             teacher's probabilities (kd.serving.checked), and one student pass for the kept files.
two_step   : batched as before issue 19: the refusal check on a teacher pass of its own (to layer3), then a
             forward per model (the same answers: tests/test_serving.py).
The files: the first --files images of the shared test half (224 px JPEGs) when present, otherwise
X-ray-like pictures generated at 224 px. Both variants give the same answers (tests/test_ood.py); timed
interleaved (A B A B ...), the ratio is one_by_one / batched seconds per round.
Target: batched at least 1.5x as fast (the median of the rounds).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import MIN_PAIRS, SHARED, interleaved, ratio, target


def files(n: int, folder: Path) -> list[str]:
    found = sorted((SHARED / "chest_xray" / "test").rglob("*.jpeg"))
    if len(found) >= n:
        step = len(found) // n  # both classes: NORMAL/ then PNEUMONIA/, evenly
        return [str(p) for p in found[::step][:n]]
    from tests.fixtures.xray_fixtures import jpeg_bytes, xray_like_array

    paths = []
    for i in range(n):
        paths.append(folder / f"x{i:03d}.jpeg")
        paths[-1].write_bytes(jpeg_bytes(xray_like_array(224, 224, seed=1000 + i)))
    return [str(p) for p in paths]


def main(argv=None) -> list[str]:
    from kd import serving
    from kd.serving import load_pair, predict_bytes, predict_files
    from kd.preprocess import ImageError

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=40)
    p.add_argument("--pairs", type=int, default=MIN_PAIRS)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--weights", help="weights folder (default: the shipped weights)")
    args = p.parse_args(argv)
    pair = load_pair(args.weights)
    with tempfile.TemporaryDirectory() as tmp:
        paths = files(args.files, Path(tmp))
        print(f"{len(paths)} files, models at {pair.input_size} px, refusal check "
              f"{'on' if pair.ood is not None else 'off'}, batch {args.batch_size}")

        def one_by_one() -> float:
            t0 = time.perf_counter()
            for path in paths:
                try:
                    predict_bytes(pair, Path(path).read_bytes(), Path(path).name)
                except (OSError, ImageError):
                    pass
            return time.perf_counter() - t0

        def batched() -> float:
            t0 = time.perf_counter()
            for _ in predict_files(pair, paths, batch_size=args.batch_size):
                pass
            return time.perf_counter() - t0

        def two_step() -> float:
            real, serving.checked = serving.checked, serving.checked_apart
            try:
                return batched()
            finally:
                serving.checked = real

        one_by_one()  # warm-up: first-call allocations and caches on every path
        batched()
        two_step()
        runs = interleaved({"one_by_one": one_by_one, "batched": batched, "two_step": two_step}, args.pairs)
    for name, values in runs.items():
        median = statistics.median(values)
        print(f"  {name:10s} {median:6.2f} s for {len(paths)} files ({len(paths) / median:5.1f} files/s)")
    speedup = ratio(runs["one_by_one"], runs["batched"])
    reuse = ratio(runs["batched"], runs["two_step"])
    print(f"batched / two_step = {reuse}")
    if args.pairs < MIN_PAIRS:
        print(f"one_by_one / batched = {speedup} (fewer than {MIN_PAIRS} pairs: no verdict)")
        return []
    return [target("predict_bulk_speedup", speedup, 1.5),
            target("predict_bulk_over_two_step", reuse, 1.0, higher_is_better=False)]


if __name__ == "__main__":
    main()
