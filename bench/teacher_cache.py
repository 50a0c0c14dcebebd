"""Distillation with the teacher online vs its outputs cached: what caching saves, what it costs in AUC.

    python bench/teacher_cache.py [--data ../shared/data/chest_xray] [--teacher weights/teacher.safetensors]
                                  [--epochs 3] [--size 128] [--batch 32] [--eval-size 128] [--pairs 1]

online : the teacher runs on every augmented view the student sees (Beyer et al. 2022, "Knowledge
         distillation: a good teacher is patient and consistent": consistent views);
cached : the teacher's logits on each un-augmented image, computed once before training ("fixed
         teacher"); each step then costs the student's forward and backward only.
Both arms distil the same teacher into the same student initialisation with the same seed, schedule,
batches and augmentations (kd.train.fit), on the patient-level split of the pipeline. Each is then
evaluated like an exported model (BatchNorm re-estimated at --eval-size when it differs from the
training size), AUC on the validation split
with a 95% bootstrap CI, and the paired bootstrap CI of the AUC difference. Takes about 15 minutes
for the defaults on a 2-core CPU, so run_all.py does not include it.
--pairs N runs the two arms interleaved N times (online, cached, online, cached, ...; 15 minutes a pair):
the speed-up is then the median of the per-pair ratios with its range (3 or more give a spread worth
reading on a shared machine); the AUCs come from the first pair (the runs are seeded alike).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

import common  # noqa: F401  (puts the repository on sys.path)
from common import interleaved, ratio
from kd import metrics
from kd.checkpoint import load_weights
from kd.config import preset
from kd.distributed import Dist, resolve_device
from kd.export import recalibrate_batchnorm
from kd.scoring import predict_logits
from kd.models import build_teacher
from kd.objectives import ValContext, class_weights
from kd.pipeline import student_objective
from kd.run_data import RunData
from kd.progress import Reporter
from kd.train import fit

DEFAULT_DATA = common.SHARED / "chest_xray"
DEFAULT_TEACHER = common.REPO / "weights" / "teacher.safetensors"


def distil(arm: str, teacher, train, cfg, device) -> tuple[torch.nn.Module, dict]:
    """The pipeline's distill phase with this arm's teacher targets (kd.pipeline.student_objective + fit)."""
    phase = cfg.phase("distill")
    cfg.teacher_targets = arm
    torch.manual_seed(cfg.seed)  # the same student initialisation in both arms
    t0 = time.perf_counter()
    objective, train, t_cache = student_objective("distill", cfg, teacher, train, class_weights(train.class_counts()),
                                                  device)
    with tempfile.TemporaryDirectory() as tmp:
        history = fit(objective, train, phase, ValContext(None, train, device), tmp, Reporter(tmp, False), "distill",
                      seed=cfg.seed, grad_clip=cfg.grad_clip)
    total = time.perf_counter() - t0
    images = len(train) // phase.batch_size * phase.batch_size * phase.epochs
    return objective.student, {"cache_s": t_cache, "train_s": total - t_cache, "total_s": total,
                               "train_images_per_s": images / (total - t_cache), "images_per_s": images / total,
                               "epochs": len(history)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--teacher", default=str(DEFAULT_TEACHER), help="fine-tuned teacher (safetensors)")
    p.add_argument("--epochs", type=int, help="distillation epochs (default: the cpu preset's)")
    p.add_argument("--size", type=int, help="training resolution (default: the cpu preset's)")
    p.add_argument("--batch", type=int, help="batch size (default: the cpu preset's)")
    p.add_argument("--eval-size", type=int, help="serving resolution (default: the cpu preset's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "kd-bench-cache"))
    p.add_argument("--pairs", type=int, default=1, help="interleaved online/cached runs for the speed-up's median "
                   "and range (about 15 minutes a pair with the defaults on 2 cores)")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 2)
    root = Path(args.data)
    if not (root / "train").is_dir():
        from tests.fixtures.xray_fixtures import write_kermany_dataset  # no dataset: a generated one, same layout

        root = write_kermany_dataset(Path(tempfile.mkdtemp()) / "data", n_per_class=(40, 40), size=64)
    cfg = preset("cpu")
    cfg.data, cfg.cache_dir = str(root), args.cache_dir
    phase = cfg.distill
    phase.epochs, phase.image_size, phase.batch_size = (args.epochs or phase.epochs, args.size or phase.image_size,
                                                        args.batch or phase.batch_size)
    args.eval_size = args.eval_size or cfg.eval_image_size
    data = RunData(cfg, Dist(), progress=False)
    train, val = data.image_set("train", phase.image_size), data.image_set("val", args.eval_size)
    train_eval = data.image_set("train", args.eval_size)

    teacher = build_teacher()
    if Path(args.teacher).exists():
        load_weights(teacher, args.teacher)
    else:
        print(f"{args.teacher} not found: a randomly initialised teacher (timings only, AUCs meaningless)")
    teacher = teacher.float().to(device).to(memory_format=torch.channels_last)
    # the teacher may have been exported for another serving size: its BatchNorm statistics at the training size
    recalibrate_batchnorm(teacher, train, phase.image_size, device)
    y = val.labels
    p_teacher = metrics.softmax_pneumonia(predict_logits(teacher, val, phase.image_size, device))

    first: dict[str, tuple] = {}  # arm -> (student, timings) of the first pair: what the AUCs are measured on

    def run_arm(arm: str):
        def measure() -> float:
            student, r = distil(arm, teacher, train, cfg, device)
            first.setdefault(arm, (student, r))
            return r["total_s"]
        return measure

    totals = interleaved({arm: run_arm(arm) for arm in ("online", "cached")}, args.pairs)
    results, probs = {}, {}
    for arm in ("online", "cached"):
        student, r = first[arm]
        r = {**r, "total_s_per_pair": totals[arm]}
        if args.eval_size != phase.image_size:  # as export does
            recalibrate_batchnorm(student, train_eval, args.eval_size, device)
        probs[arm] = metrics.softmax_pneumonia(predict_logits(student, val, args.eval_size, device))
        ci = metrics.bootstrap_ci(y, probs[arm], 0.5, metrics=("auc",), n_boot=1000, seed=0)["auc"]
        results[arm] = {**r, "auc": metrics.rank_auc(y, probs[arm]), "auc_ci": ci}

    print(f"device={device} train={len(train)} images at {phase.image_size} px, {phase.epochs} epochs, batch "
          f"{phase.batch_size}; validation={len(val)} images at {args.eval_size} px (patient-level split of train)")
    print(f"teacher (frozen) validation AUC at {phase.image_size} px: {metrics.rank_auc(y, p_teacher):.4f}")
    if args.pairs > 1:
        print(f"the table is the first pair; the speed-up below is over all {args.pairs} pairs")
    print(f"{'arm':7s} {'cache s':>8s} {'train s':>8s} {'total s':>8s} {'train img/s':>11s}  AUC (95% CI)")
    for arm, r in results.items():
        lo, hi = r["auc_ci"]
        print(f"{arm:7s} {r['cache_s']:8.1f} {r['train_s']:8.1f} {r['total_s']:8.1f} {r['train_images_per_s']:11.1f}"
              f"  {r['auc']:.4f} ({lo:.4f}-{hi:.4f})")
    speedup = ratio(totals["online"], totals["cached"])
    diff, lo, hi = metrics.paired_auc_difference(y, probs["online"], probs["cached"])
    print(f"cached vs online: {speedup} x faster end to end (caching included); "
          f"AUC difference cached - online {diff:+.4f} (paired 95% CI {lo:+.4f} to {hi:+.4f})")
    return {**results, "speedup": speedup, "auc_difference": (diff, lo, hi)}


if __name__ == "__main__":
    main()
