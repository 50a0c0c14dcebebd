"""Teacher vs student CPU inference at 224 px, batch 1 and 32, and what each CPU trick buys.

    python bench/inference.py [--repeats 5] [--compile]

Variants (each timed in this run; the first is the baseline of the ratios):
  eager      : model(x) under torch.no_grad, default memory format
  optimised  : channels_last + torch.inference_mode (what kd.inference uses)
  compiled   : torch.compile of the optimised model (--compile; minutes to compile on 2 cores)
Target: student images/s >= 2.5 x teacher images/s (optimised, batch 32).
"""
from __future__ import annotations

import argparse

import torch

from common import model_pair, seconds, target


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


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args(argv)
    pair = model_pair()
    results = {}
    print(f"threads={torch.get_num_threads()}  images/s at 224 px")
    for batch in (1, 32):
        for role in ("teacher", "student"):
            m = pair.models[role].model.eval()
            results[(role, batch, "eager")] = rate(m, batch, args.repeats, False, False)
            results[(role, batch, "optimised")] = rate(m, batch, args.repeats, True, True)
            if args.compile:
                compiled = torch.compile(m.to(memory_format=torch.channels_last))
                results[(role, batch, "compiled")] = rate(compiled, batch, args.repeats, True, True)
            base = results[(role, batch, "eager")]
            print(f"  batch {batch:2d} {role:8s} " + "  ".join(
                f"{v}={results[(role, batch, v)]:7.1f} ({results[(role, batch, v)] / base:.2f}x)"
                for v in ("eager", "optimised", "compiled") if (role, batch, v) in results))
    for batch in (1, 32):
        s, t = results[("student", batch, "optimised")], results[("teacher", batch, "optimised")]
        print(f"  batch {batch:2d} student/teacher = {s / t:.2f}x")
    return [target("student_vs_teacher_speedup_b32", results[("student", 32, "optimised")]
                   / results[("teacher", 32, "optimised")], 2.5, unit="x")]


if __name__ == "__main__":
    main()
