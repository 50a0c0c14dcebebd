"""Fused AdamW against PyTorch's default (a Python loop over the parameters on the CPU): the optimizer step
alone and the whole training step of kd's loop (augmented batch, bf16 forward as in the cpu preset, loss,
backward, optimizer step), per model, measured interleaved (default, fused, default, fused, ...), so load from
other work lands on both; ratios are medians over pairs with their spread.

Also the same update: from the same weights and gradients (laid out like their parameters, as autograd makes
them; kd.train.fused_layouts_agree checks that), 20 steps of each optimizer end at the same parameters up to
float32 rounding (largest absolute difference printed).

    python bench/fused_adamw.py [--archs resnet18 resnet50] [--size 128] [--batch 32] [--pairs 5]
"""
from __future__ import annotations

import argparse
import copy
import time

from common import interleaved, ratio, target


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=["resnet18", "resnet50"])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=5)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from kd.augment import SUPERVISED
    from kd.models import build

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.size} px, batch {args.batch}")
    verdicts = []
    for arch in args.archs:
        torch.manual_seed(0)
        model = build(arch).to(memory_format=torch.channels_last).train()
        params = list(model.parameters())
        optimizers = {"default": torch.optim.AdamW(params, lr=1e-4),
                      "fused": torch.optim.AdamW(params, lr=1e-4, fused=True)}
        images = torch.randint(0, 255, (args.batch, args.size, args.size), dtype=torch.uint8)
        labels = torch.randint(0, 2, (args.batch,))
        gen = torch.Generator().manual_seed(0)

        def optimizer_steps(opt) -> float:
            for p in params:
                p.grad = torch.full_like(p, 1e-3)
            opt.step()  # warm-up (state allocated)
            t0 = time.perf_counter()
            for _ in range(10):
                opt.step()
            return 10 / (time.perf_counter() - t0)

        def training_steps(opt) -> float:
            def one():
                x = SUPERVISED(images, args.size, gen).contiguous(memory_format=torch.channels_last)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = F.cross_entropy(model(x), labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            one()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                one()
            return args.steps * args.batch / (time.perf_counter() - t0)

        steps = interleaved({k: (lambda o=o: optimizer_steps(o)) for k, o in optimizers.items()}, args.pairs)
        train = interleaved({k: (lambda o=o: training_steps(o)) for k, o in optimizers.items()}, args.pairs)
        r_step, r_train = ratio(steps["fused"], steps["default"]), ratio(train["fused"], train["default"])
        print(f"{arch}: optimizer step default {max(steps['default']):.1f}/s, fused {max(steps['fused']):.1f}/s, "
              f"ratio {r_step}; training step default {max(train['default']):.1f} img/s, "
              f"fused {max(train['fused']):.1f} img/s, ratio {r_train}")

        # the same update rule: identical starts, identical gradients, 20 steps each
        start = copy.deepcopy(model).float()
        finals = []
        for fused in (False, True):
            m = copy.deepcopy(start)
            opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=1e-4, fused=fused)
            g = torch.Generator().manual_seed(1)
            for _ in range(20):
                for p in m.parameters():  # in the parameter's own memory layout, as autograd makes them
                    p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=g) * 1e-2)
                opt.step()
            finals.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
        print(f"{arch}: largest parameter difference after 20 steps {float((finals[0] - finals[1]).abs().max()):.2e}")
        verdicts.append(target(f"fused_adamw_{arch}_training_step_speedup", r_train, 1.0))
    return 0 if all(v.endswith("PASS") for v in verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
