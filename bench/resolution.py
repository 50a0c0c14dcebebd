"""What training the early phases at lower resolution saves: each phase's training step at the cpu
preset's resolution vs at 224 px, measured in the same run, and the preset's wall time estimated both ways.

    python bench/resolution.py [--batch 16] [--steps 2] [--pairs 3] [--images 4430] [--accuracy [--sizes 128 160 224]]

Phases (the model compute of kd.objectives, on tensors already in memory, like train_throughput's
model-only): SSL pretraining (ResNet50, two SimCLR views), fine-tuning (ResNet50), distillation
(ResNet18 step + frozen ResNet50 forward). The two sizes of a phase are timed interleaved, --pairs
rounds (so that other work on a shared machine slows both alike): images/s are medians, the speed-up is
the median of the per-round ratios, with its range.

--accuracy: what the serving resolution costs or gains. The shipped teacher and student (trained at
128 px, exported for 224 px) are served at each of --sizes after re-estimating their BatchNorm
statistics at that size on training images (kd.export.recalibrate_batchnorm, as export does):
validation AUC with 95% bootstrap CI on the patient-level split, and CPU ms per image at batch 1.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import torch

import common  # noqa: F401  (puts the repository on sys.path)
from common import MIN_PAIRS, interleaved, ratio
from kd.config import preset
from train_throughput import model_only

PHASES = (("pretrain", "ssl", "resnet50"), ("finetune", "supervised", "resnet50"), ("distill", "distill", "resnet18"))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=2, help="timed steps per phase and size (after one warm-up step)")
    p.add_argument("--pairs", type=int, default=MIN_PAIRS, help="interleaved rounds of the two sizes of each phase")
    p.add_argument("--images", type=int, default=4430, help="training images per epoch (the 224 px train split "
                   "minus the patient-level validation split)")
    p.add_argument("--full-size", type=int, default=224)
    p.add_argument("--accuracy", action="store_true", help="also validation AUC of the shipped models per size")
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 160, 224])
    p.add_argument("--data", default=str(common.SHARED / "chest_xray"))
    p.add_argument("--weights", default=str(common.REPO / "weights"))
    p.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "kd-bench-cache"))
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 2)
    cfg = preset("cpu")
    device = torch.device("cpu")
    print(f"threads={torch.get_num_threads()} batch={args.batch} images/s of each phase's training step "
          f"(model only), {args.images} images per epoch, cpu preset epochs")
    rows, low_total, full_total = {}, 0.0, 0.0
    for name, objective, arch in PHASES:
        ph = cfg.phase(name)
        rates = interleaved({
            "low": lambda: model_only(objective, arch, ph.image_size, args.batch, args.steps, device),
            "full": lambda: model_only(objective, arch, args.full_size, args.batch, args.steps, device),
        }, args.pairs)
        low, full = statistics.median(rates["low"]), statistics.median(rates["full"])
        speedup = ratio(rates["low"], rates["full"])
        low_s, full_s = ph.epochs * args.images / low, ph.epochs * args.images / full
        low_total, full_total = low_total + low_s, full_total + full_s
        rows[name] = {"size": ph.image_size, "low": low, "full": full, "speedup": speedup}
        print(f"  {name:9s} {arch}: {ph.image_size:3d} px {low:6.1f} img/s | {args.full_size} px {full:6.1f} img/s | "
              f"{speedup} x faster; {ph.epochs} epochs ~ {low_s / 60:5.1f} min instead of {full_s / 60:5.1f} min")
    print(f"  cpu preset (pretrain+finetune+distill): ~{low_total / 60:.0f} min at its resolutions vs "
          f"~{full_total / 60:.0f} min all at {args.full_size} px: {full_total / low_total:.2f}x "
          f"({100 * (1 - low_total / full_total):.0f}% of the training time saved)")
    result = {"phases": rows, "saving": full_total / low_total}
    if args.accuracy:
        result["accuracy"] = serving_accuracy(args)
    return result


def serving_accuracy(args) -> dict:
    from kd import metrics
    from kd.distributed import Dist
    from kd.export import cpu_latency_ms, recalibrate_batchnorm
    from kd.serving import load_pair
    from kd.scoring import predict_logits
    from kd.run_data import RunData

    if not (Path(args.data) / "train").is_dir():
        print(f"  no dataset at {args.data}: serving accuracy not measured")
        return {}
    pair = load_pair(args.weights)
    cfg = preset("cpu")
    cfg.data, cfg.cache_dir = args.data, args.cache_dir
    data = RunData(cfg, Dist(), progress=False)
    device = torch.device("cpu")
    out = {}
    print(f"  serving resolution (shipped weights, validation split; BatchNorm re-estimated at each size):")
    for size in args.sizes:
        train, val = data.image_set("train", size), data.image_set("val", size)
        for role, loaded in pair.models.items():
            model = loaded.model
            state = {k: v.clone() for k, v in model.state_dict().items()}
            recalibrate_batchnorm(model, train, size, device)
            p = metrics.softmax_pneumonia(predict_logits(model, val, size, device))
            lo, hi = metrics.bootstrap_ci(val.labels, p, metrics=("auc",), n_boot=1000, seed=0)["auc"]
            ms = cpu_latency_ms(model, size)
            model.load_state_dict(state)
            out[(role, size)] = {"auc": metrics.rank_auc(val.labels, p), "ci": (lo, hi), "ms": ms}
            print(f"    {role:8s} {size:3d} px  AUC {out[(role, size)]['auc']:.4f} ({lo:.4f}-{hi:.4f})  "
                  f"{ms:6.1f} ms/image")
    return out


if __name__ == "__main__":
    main()
