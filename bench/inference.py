"""Teacher vs student CPU inference at 224 px, batch 1 and 32, and what each CPU trick buys.

    python bench/inference.py [--repeats 5] [--pairs 3] [--compile] [--no-onnx]

Variants (each timed in this run; the first is the baseline of the ratios). At each batch size every
variant of both models is timed once per round, for --pairs rounds (interleaved, so that other work on a
shared machine lands on every variant alike); images/s are medians over the rounds, each ratio is the
median of the per-round ratios with its range:
  eager      : model(x) under torch.no_grad, default memory format
  optimised  : channels_last + torch.inference_mode (what kd.serving uses)
  1 thread   : optimised with torch.set_num_threads(1) instead of one thread per core
  onnxrt     : ONNX Runtime (CPU provider, all graph optimisations, one thread per core) on the
               torch.onnx export of the same model; skipped when onnxruntime/onnxscript are not
               installed (`pip install onnxruntime onnxscript`)
  compiled   : torch.compile of the optimised model (--compile; minutes to compile on 2 cores)
Target: student images/s >= 2.5 x teacher images/s (optimised, batch 32), on the median ratio.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import MIN_PAIRS, interleaved, model_pair, ratio, seconds, target

VARIANTS = ("eager", "optimised", "1 thread", "onnxrt", "compiled")
BATCHES = (1, 32)  # the last is the target's


def rate(model, batch: int, repeats: int, channels_last: bool, inference_mode: bool) -> float:
    x = torch.randn(batch, 1, 224, 224)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        model = model.to(memory_format=torch.contiguous_format)
    ctx = torch.inference_mode if inference_mode else torch.no_grad

    def run():
        with ctx():
            model(x)
    return batch / seconds(run, repeats=repeats)


def onnx_session(model, threads: int):
    """ONNX Runtime session for the torch.onnx export of `model` (dynamic batch), or None without
    onnxruntime; `session.export_seconds` is what exporting and loading cost."""
    try:
        import onnxruntime as ort
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError:
        return None
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(model.float().eval().to(memory_format=torch.contiguous_format),
                          (torch.randn(1, 1, 224, 224),), str(path), input_names=["x"], output_names=["logits"],
                          dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=1024)}}, dynamo=True,
                          verbose=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.export_seconds = time.perf_counter() - t0
    return session


def onnx_rate(session, model, batch: int, repeats: int) -> tuple[float, float]:
    """images/s of the session, and its largest logit difference from PyTorch on the same batch."""
    x = np.random.default_rng(0).standard_normal((batch, 1, 224, 224)).astype(np.float32)
    with torch.inference_mode():
        reference = model(torch.from_numpy(x)).numpy()
    diff = float(np.abs(session.run(None, {"x": x})[0] - reference).max())
    return onnx_images_per_s(session, batch, repeats), diff


def onnx_images_per_s(session, batch: int, repeats: int) -> float:
    x = np.random.default_rng(0).standard_normal((batch, 1, 224, 224)).astype(np.float32)
    return batch / seconds(lambda: session.run(None, {"x": x}), repeats=repeats)


def one_thread_rate(model, batch: int, repeats: int) -> float:
    """The optimised variant with torch.set_num_threads(1), then back to the previous count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return rate(model, batch, repeats, True, True)
    finally:
        torch.set_num_threads(threads)


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per variant and round (median)")
    p.add_argument("--pairs", type=int, default=MIN_PAIRS, help=f"interleaved rounds of all variants (>= {MIN_PAIRS})")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime variant")
    args = p.parse_args(argv)
    if args.pairs < MIN_PAIRS:
        p.error(f"--pairs must be at least {MIN_PAIRS}: the target is judged on the median of the pairs")
    pair = model_pair()
    threads = torch.get_num_threads()
    sessions = {} if args.no_onnx else {role: onnx_session(pair.models[role].model, threads) for role in pair.models}
    if not args.no_onnx and None in sessions.values():
        print("onnxruntime/onnxscript not installed: ONNX Runtime variant skipped (pip install onnxruntime onnxscript)")
        sessions = {}
    models = {role: pair.models[role].model.eval() for role in ("teacher", "student")}
    # a separate copy to compile (the other variants switch the memory format of the model they time)
    compiled = {role: torch.compile(copy.deepcopy(m).to(memory_format=torch.channels_last))
                for role, m in models.items()} if args.compile else {}
    rounds, onnx_diff = {}, {}
    print(f"threads={threads} (cores: {os.cpu_count()})  images/s at 224 px, median of {args.pairs} interleaved "
          f"rounds (ratio to eager: median of the rounds)")
    for batch in BATCHES:
        variants = {}
        for role, m in models.items():
            variants[(role, batch, "eager")] = lambda m=m: rate(m, batch, args.repeats, False, False)
            variants[(role, batch, "optimised")] = lambda m=m: rate(m, batch, args.repeats, True, True)
            variants[(role, batch, "1 thread")] = lambda m=m: one_thread_rate(m, batch, args.repeats)
            if sessions:
                onnx_diff[(role, batch)] = onnx_rate(sessions[role], m, batch, 1)[1]
                variants[(role, batch, "onnxrt")] = lambda role=role: onnx_images_per_s(sessions[role], batch,
                                                                                       args.repeats)
            if compiled:
                rate(compiled[role], batch, 1, True, True)  # compiles for this shape, outside the timing
                variants[(role, batch, "compiled")] = lambda role=role: rate(compiled[role], batch, args.repeats,
                                                                             True, True)
        rounds.update(interleaved(variants, args.pairs))
        for role in models:
            base = rounds[(role, batch, "eager")]
            print(f"  batch {batch:2d} {role:8s} " + "  ".join(
                f"{v}={statistics.median(rounds[(role, batch, v)]):6.1f} "
                f"({ratio(rounds[(role, batch, v)], base).median:.2f}x)"
                for v in VARIANTS if (role, batch, v) in rounds))
    results = {key: statistics.median(values) for key, values in rounds.items()}
    for (role, batch), diff in onnx_diff.items():
        print(f"  onnxrt {role} batch {batch}: largest logit difference from PyTorch {diff:.2e}")
    for role, session in sessions.items():
        saved = 1 / results[(role, 1, "optimised")] - 1 / results[(role, 1, "onnxrt")]
        print(f"  onnxrt {role}: export + session {session.export_seconds:.1f} s, repaid after "
              f"{session.export_seconds / saved:.0f} single-image predictions" if saved > 0 else
              f"  onnxrt {role}: export + session {session.export_seconds:.1f} s, never repaid at batch 1")
    speedup = {batch: ratio(rounds[("student", batch, "optimised")], rounds[("teacher", batch, "optimised")])
               for batch in BATCHES}
    for batch, r in speedup.items():
        print(f"  batch {batch:2d} student/teacher = {r}")
    return [target(f"student_vs_teacher_speedup_b{BATCHES[-1]}", speedup[BATCHES[-1]], 2.5, unit="x")]


if __name__ == "__main__":
    main()
