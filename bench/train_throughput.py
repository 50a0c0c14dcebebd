"""Training throughput: model-only vs our data path vs a seed-style loader, in one run, same settings.

    python bench/train_throughput.py [--data ../shared/data/chest_xray] [--arch resnet18] [--size 128]
                                     [--batch 32] [--steps 12] [--pairs 3] [--device auto]

model-only  : the same training step on synthetic tensors already in memory (the ceiling);
ours        : kd.train.fit on the decoded uint8 memmap cache with batched tensor augmentation;
seed-style  : torchvision ImageFolder + PIL transforms + DataLoader (workers), same step.
The variants are measured interleaved (model-only, ours[, seed-style], then again, --pairs times), so
that other work on a shared machine slows both sides of a pair; each ratio is the median of the
per-pair ratios, printed with its range. Prints images/s (median) of each and the ratios; targets,
judged on the median: ours >= 0.90 x model-only; on a GPU also ours >= 2 x seed-style (16 workers),
the loader a seed project would start from. Without a dataset at --data, a generated one (400 images).
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MIN_PAIRS, SHARED, interleaved, ratio, target  # noqa: E402
from kd.cache import ImageSet, build_cache  # noqa: E402
from kd.config import PhaseConfig  # noqa: E402
from kd.data import list_split  # noqa: E402
from kd.distributed import resolve_device  # noqa: E402
from kd.losses import distillation_loss  # noqa: E402
from kd.models import build, build_teacher, embed  # noqa: E402
from kd.objectives import (DistillationObjective, SSLObjective, SupervisedObjective, ValContext,  # noqa: E402
                           class_weights)
from kd.preprocess import MEAN, STD  # noqa: E402
from kd.progress import Reporter  # noqa: E402
from kd.train import fit  # noqa: E402

DEFAULT_DATA = SHARED / "chest_xray"


def _step_fn(model, device):
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(x, y):
        with torch.autocast(**autocast):
            loss = F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_objective(kind: str, arch: str, size: int, class_weight):
    """The phase's real objective: supervised (fine-tuning), ssl (SimCLR, two views), distill (frozen teacher)."""
    if kind == "ssl":
        return SSLObjective(build(arch), "simclr", size)
    if kind == "distill":
        return DistillationObjective(build(arch), build_teacher(), size, class_weight, temperature=4.0, alpha=0.5)
    return SupervisedObjective(build(arch), "student", size, class_weight)


def model_only(kind, arch, size, batch, steps, device) -> float:
    """The objective's model compute on tensors already in memory: no decoding, batching or augmentation."""
    obj = make_objective(kind, arch, size, torch.ones(2)).to(device).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], 1e-4)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    x = torch.randn(batch, 1, size, size, device=device).contiguous(memory_format=torch.channels_last)
    x2 = torch.randn(2 * batch, 1, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,), device=device)

    def loss():
        if kind == "ssl":
            z1, z2 = obj.head(embed(obj.backbone, x2)).chunk(2)
            return obj.criterion(z1, z2)
        if kind == "distill":
            with torch.no_grad():
                t = obj.teacher(x)
            return distillation_loss(obj.student(x), t, y, 4.0, 0.5)
        return F.cross_entropy(obj.model(x), y)

    t0 = time.perf_counter()
    for _ in range(steps + 1):  # like ours, the first (warm-up) step is included
        with torch.autocast(**autocast):
            value = loss()
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
    _sync(device)
    return (steps + 1) * batch / (time.perf_counter() - t0)


def ours(kind, arch, size, batch, steps, device, samples, cache_dir) -> float:
    paths = [s.path for s in samples]
    cache = build_cache(paths, size, cache_dir, progress=False)  # built once, outside the timing
    images = ImageSet.from_cache(cache, [s.label for s in samples])
    n = batch * (steps + 1)
    images = ImageSet(images.images, images.labels[:n], images.rows[:n])
    obj = make_objective(kind, arch, size, class_weights(images.class_counts()))
    phase = PhaseConfig(epochs=1, image_size=size, batch_size=batch, lr=1e-4, warmup_epochs=0)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        fit(obj, images, phase, ValContext(None, images, device), tmp, Reporter(tmp, False), "bench")
        total = time.perf_counter() - t0
    return (steps + 1) * batch / total


def seed_style(arch, size, batch, steps, device, root, workers) -> float:
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.Grayscale(1), transforms.RandomResizedCrop(size, scale=(0.7, 1.0)), transforms.RandomRotation(10),
        transforms.ColorJitter(0.2, 0.2), transforms.ToTensor(), transforms.Normalize([MEAN], [STD]),
    ])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(Path(root) / "train"), tf), batch_size=batch,
                                         shuffle=True, num_workers=workers, drop_last=True,
                                         pin_memory=device.type == "cuda", persistent_workers=False)
    model = build(arch).to(device).to(memory_format=torch.channels_last).train()
    step = _step_fn(model, device)
    t0 = time.perf_counter()
    it = iter(loader)  # worker start-up counted: a seed-style loop pays it every epoch
    for _ in range(steps + 1):
        x, y = next(it)
        step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
    _sync(device)
    return (steps + 1) * batch / (time.perf_counter() - t0)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--objective", choices=("supervised", "ssl", "distill"), default="supervised",
                   help="which phase's step to time (distill: ResNet50 teacher forward + student step)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--pairs", type=int, default=MIN_PAIRS, help=f"interleaved rounds of the variants (>= {MIN_PAIRS})")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 2))
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "kd-bench-cache"))
    args = p.parse_args(argv)
    if args.pairs < MIN_PAIRS:
        p.error(f"--pairs must be at least {MIN_PAIRS}: the target is judged on the median of the pairs")
    device = resolve_device(args.device)
    root = Path(args.data)
    if not (root / "train").is_dir():
        from tests.fixtures.xray_fixtures import write_kermany_dataset  # no dataset: a generated one, same layout

        root = write_kermany_dataset(Path(tempfile.mkdtemp()) / "data", n_per_class=(200, 200), size=224)
    samples = list_split(root, "train")
    rng = np.random.default_rng(0)
    samples = [samples[i] for i in rng.permutation(len(samples))]
    steps = min(args.steps, len(samples) // args.batch - 1)  # one pass over the data at most, same for all three
    if steps < 1:
        raise SystemExit(f"{len(samples)} images are too few for batch {args.batch}: lower --batch")
    args.steps = steps
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 2)
    variants = {
        "model-only": lambda: model_only(args.objective, args.arch, args.size, args.batch, args.steps, device),
        "ours": lambda: ours(args.objective, args.arch, args.size, args.batch, args.steps, device, samples,
                             args.cache_dir),
    }
    if args.objective == "supervised":  # the seed-style loop is a plain supervised step: compared for it only
        variants["seed-style"] = lambda: seed_style(args.arch, args.size, args.batch, args.steps, device, root,
                                                    args.workers)
    rates = interleaved(variants, args.pairs)
    a, b = statistics.median(rates["model-only"]), statistics.median(rates["ours"])
    c = statistics.median(rates["seed-style"]) if "seed-style" in rates else None
    data_path = ratio(rates["ours"], rates["model-only"])
    print(f"device={device} objective={args.objective} arch={args.arch} size={args.size} batch={args.batch} "
          f"steps={args.steps} workers(seed-style)={args.workers}; images/s, median of {args.pairs} interleaved pairs")
    print(f"model-only   {a:8.1f} images/s")
    print(f"ours         {b:8.1f} images/s   ratio to model-only {data_path}")
    if c is not None:
        print(f"seed-style   {c:8.1f} images/s   ratio to model-only {ratio(rates['seed-style'], rates['model-only'])}"
              f"   ours/seed-style {ratio(rates['ours'], rates['seed-style'])}")
    target("data_path_vs_model_only", data_path, 0.9)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this training process: {peak:.0f} MiB")
    if c is not None and device.type == "cuda":  # the GPU target: the data path keeps the GPU busy
        target("data_path_vs_seed_style_gpu", ratio(rates["ours"], rates["seed-style"]), 2.0)
    return {"model_only": a, "ours": b, "seed_style": c, "data_path": data_path}


if __name__ == "__main__":
    main()
