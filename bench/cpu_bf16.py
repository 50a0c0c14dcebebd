"""bf16 autocast on the CPU: training-step throughput against float32, per model and resolution, and which of
the two kd's training loop picks on this CPU (kd.distributed.bf16_autocast: bf16 only with native bf16,
AVX512-BF16 or AMX; emulated it is several times slower than float32).

Each variant is a full training step of kd's loop body (augmented batch, forward, loss, backward, AdamW step)
on random uint8 images, channels_last, measured interleaved (fp32, bf16, fp32, bf16, ...) so load from other
work lands on both; the ratio is the median over pairs with its spread. Also the largest difference between
fp32 and bf16 logits of the same weights, as a first check that bf16 keeps the numbers.

    python bench/cpu_bf16.py [--sizes 128 160] [--archs resnet18 resnet50] [--batch 32] [--steps 3] [--pairs 3]

--accuracy [EPOCHS] then asks whether the AUC holds: the cpu preset's teacher fine-tuning (ResNet50, 128 px) for
EPOCHS epochs on the real train split, once in float32 and once under bf16 autocast (same seed, same batches),
both scored in float32 on the patient-level validation split; the paired patient bootstrap CI of the AUC
difference, and each variant's wall time. The test split is not looked at.
"""
from __future__ import annotations

import argparse
import time

from common import SHARED, interleaved, ratio


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 160])
    ap.add_argument("--archs", nargs="+", default=["resnet18", "resnet50"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--accuracy", type=int, nargs="?", const=2, default=0, metavar="EPOCHS",
                    help="also fine-tune the cpu preset's teacher for EPOCHS epochs in fp32 and bf16 and compare "
                         "validation AUC")
    ap.add_argument("--data", default=str(SHARED / "chest_xray"))
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from kd.augment import SUPERVISED
    from kd.models import build

    from kd.distributed import bf16_autocast, cpu_has_native_bf16

    chosen = "bf16" if bf16_autocast(torch.device("cpu"), asked=True) else "fp32"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}, "
          f"native bf16 (AVX512-BF16 or AMX): {cpu_has_native_bf16()}; the training loop with cpu_bf16 on uses {chosen}")
    for arch in args.archs:
        for size in args.sizes:
            torch.manual_seed(0)
            model = build(arch).to(memory_format=torch.channels_last).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            images = torch.randint(0, 255, (args.batch, size, size), dtype=torch.uint8)
            labels = torch.randint(0, 2, (args.batch,))
            gen = torch.Generator().manual_seed(0)

            def step_rate(bf16: bool) -> float:
                def one():
                    x = SUPERVISED(images, size, gen).contiguous(memory_format=torch.channels_last)
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        loss = F.cross_entropy(model(x), labels)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                one()  # warm-up (oneDNN picks its kernels for this shape and dtype)
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    one()
                return args.steps * args.batch / (time.perf_counter() - t0)

            runs = interleaved({"fp32": lambda: step_rate(False), "bf16": lambda: step_rate(True)}, args.pairs)
            r = ratio(runs["bf16"], runs["fp32"])
            model.eval()
            with torch.inference_mode():
                x = SUPERVISED(images[:8], size, gen).contiguous(memory_format=torch.channels_last)
                a = model(x).float()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    b = model(x).float()
            other = "fp32" if chosen == "bf16" else "bf16"
            print(f"{arch} {size}px batch {args.batch}: fp32 {max(runs['fp32']):.1f} img/s, "
                  f"bf16 {max(runs['bf16']):.1f} img/s; bf16/fp32 {r}; max |logit diff| {(a - b).abs().max():.3f}; "
                  f"the loop's choice ({chosen}) against {other}: {ratio(runs[chosen], runs[other])}", flush=True)
    if args.accuracy and chosen == "fp32":
        print("--accuracy skipped: without native bf16 the training loop runs both variants in float32")
    elif args.accuracy:
        accuracy(args.data, args.accuracy)
    return 0


def accuracy(data: str, epochs: int) -> None:
    import tempfile
    from pathlib import Path

    import numpy as np
    import torch

    from kd import distributed, metrics
    from kd.config import preset
    from kd.scoring import predict_logits
    from kd.models import build_teacher
    from kd.pipeline import run_phase
    from kd.run_data import RunData
    from kd.progress import Reporter
    from kd.checkpoint import load_weights

    scores, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("fp32", "bf16"):
            cfg = preset("cpu", epochs=epochs)
            cfg.data, cfg.out, cfg.cpu_bf16, cfg.baseline = data, f"{tmp}/{variant}", variant == "bf16", False
            cfg.cache_dir = str(Path(tmp) / "cache")
            out = Path(cfg.out)
            out.mkdir()
            run_data = RunData(cfg, distributed.Dist(), progress=False)
            result = run_phase("finetune", cfg, run_data, out, Reporter(out), torch.device("cpu"),
                               distributed.Dist(), resume=False)
            seconds[variant] = result["seconds"]
            size = cfg.finetune.image_size
            val = run_data.image_set("val", size)
            teacher = load_weights(build_teacher(), out / "finetune" / "teacher.safetensors")
            scores[variant] = metrics.softmax_pneumonia(predict_logits(teacher, val, size, torch.device("cpu")))
            labels, patients = np.asarray(val.labels), run_data.patients("val", val)
            print(f"{variant}: {epochs} epochs in {seconds[variant]:.0f} s, validation AUC "
                  f"{metrics.rank_auc(labels, scores[variant]):.4f} (n={len(labels)})", flush=True)
    diff, lo, hi = metrics.paired_auc_difference(labels, scores["fp32"], scores["bf16"], groups=patients)
    print(f"teacher fine-tuning, validation AUC bf16 - fp32: {diff:+.4f} (paired patient bootstrap 95% CI "
          f"{lo:+.4f} to {hi:+.4f}); wall time bf16/fp32 {seconds['bf16'] / seconds['fp32']:.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
