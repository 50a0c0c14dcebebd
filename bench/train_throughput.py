"""Training throughput: model-only vs our data path vs a seed-style loader, in one run, same settings.

    python bench/train_throughput.py [--data ../shared/data/chest_xray] [--arch resnet18] [--size 128]
                                     [--batch 32] [--steps 12] [--device auto]

model-only  : the same training step on synthetic tensors already in memory (the ceiling);
ours        : kd.train.fit on the decoded uint8 memmap cache with batched tensor augmentation;
seed-style  : torchvision ImageFolder + PIL transforms + DataLoader (workers), same step.
Prints images/s of each and the ratios; target: ours >= 0.90 x model-only.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kd.cache import ImageSet, build_cache  # noqa: E402
from kd.config import PhaseConfig  # noqa: E402
from kd.data import list_split  # noqa: E402
from kd.distributed import resolve_device  # noqa: E402
from kd.models import build  # noqa: E402
from kd.objectives import SupervisedObjective, ValContext, class_weights  # noqa: E402
from kd.preprocess import MEAN, STD  # noqa: E402
from kd.progress import Reporter  # noqa: E402
from kd.train import fit  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "chest_xray"


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


def model_only(arch, size, batch, steps, device) -> float:
    model = build(arch).to(device).to(memory_format=torch.channels_last).train()
    step = _step_fn(model, device)
    x = torch.randn(batch, 1, size, size, device=device)
    y = torch.randint(0, 2, (batch,), device=device)
    t0 = time.perf_counter()
    for _ in range(steps + 1):  # like ours, the first (warm-up) step is included
        step(x, y)
    _sync(device)
    return (steps + 1) * batch / (time.perf_counter() - t0)


def ours(arch, size, batch, steps, device, samples, cache_dir) -> float:
    paths = [s.path for s in samples]
    cache = build_cache(paths, size, cache_dir, progress=False)  # built once, outside the timing
    images = ImageSet.from_cache(cache, [s.label for s in samples])
    n = batch * (steps + 1)
    images = ImageSet(images.images, images.labels[:n], images.rows[:n])
    obj = SupervisedObjective(build(arch), "student", size, class_weights(images.class_counts()))
    phase = PhaseConfig(epochs=1, image_size=size, batch_size=batch, lr=1e-4, warmup_epochs=0)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        history = fit(obj, images, phase, ValContext(None, images, device), tmp, Reporter(tmp, False), "bench")
        total = time.perf_counter() - t0
    del history
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
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 2))
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "kd-bench-cache"))
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    root = Path(args.data)
    if not (root / "train").is_dir():
        from tests.xray_fixtures import write_kermany_dataset  # no dataset: a generated one, same layout

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
    a = model_only(args.arch, args.size, args.batch, args.steps, device)
    b = ours(args.arch, args.size, args.batch, args.steps, device, samples, args.cache_dir)
    c = seed_style(args.arch, args.size, args.batch, args.steps, device, root, args.workers)
    print(f"device={device} arch={args.arch} size={args.size} batch={args.batch} steps={args.steps} "
          f"workers(seed-style)={args.workers}")
    print(f"model-only   {a:8.1f} images/s")
    print(f"ours         {b:8.1f} images/s   ratio to model-only {b / a:.2f}")
    print(f"seed-style   {c:8.1f} images/s   ratio to model-only {c / a:.2f}   ours/seed-style {b / c:.2f}")
    ok = b >= 0.9 * a
    print(f"TARGET data_path_vs_model_only {b / a:.2f} 0.90 {'PASS' if ok else 'FAIL'}")
    return {"model_only": a, "ours": b, "seed_style": c}


if __name__ == "__main__":
    main()
