"""A run's data: its splits (patient-level validation carved from train/, the optional seeded subset of the
training split), the unlabeled folders, the held-out check, and the decoded-image caches every phase and the
export read. Its own module so that the export, which needs it, does not import the pipeline that calls it."""
from __future__ import annotations

import random

from kd import distributed
from kd.cache import ImageSet, build_cache
from kd.config import Config
from kd.data import DatasetError, content_hash, list_unlabeled, load_splits


class RunData:
    """The splits of a run and their decoded-image caches (built once by rank 0, shared by all)."""

    def __init__(self, cfg: Config, dist: distributed.Dist, progress: bool = True):
        self.cfg, self.dist, self.progress = cfg, dist, progress
        self.splits = load_splits(cfg.data, cfg.val_fraction, cfg.split_seed)
        train = self.splits["train"]
        if cfg.max_train_images is not None and cfg.max_train_images < len(train):
            keep = sorted(random.Random(f"subset-{cfg.split_seed}").sample(range(len(train)), cfg.max_train_images))
            self.splits["train"] = [train[i] for i in keep]
        self.unlabeled = list_unlabeled(cfg.unlabeled) if cfg.unlabeled else []
        self.skipped: dict[str, str] = {}
        check_held_out(self.splits, self.unlabeled)

    def image_set(self, split: str, size: int, with_unlabeled: bool = False, collective: bool = True) -> ImageSet:
        """The split's images at `size`. collective=True: every rank calls it (rank 0 builds the cache, the
        others wait at a barrier); False: only this process calls it (export runs on rank 0 alone)."""
        samples = self.splits[split]
        paths = [s.path for s in samples] + (self.unlabeled if with_unlabeled else [])
        labels = [s.label for s in samples] + ([-1] * len(self.unlabeled) if with_unlabeled else [])
        cache_dir, contrast = self.cfg.resolved_cache_dir(), self.cfg.contrast
        if collective and self.dist.enabled:
            if self.dist.is_main:
                build_cache(paths, size, cache_dir, self.progress, contrast=contrast)
            distributed.barrier()
        cache = build_cache(paths, size, cache_dir, progress=self.progress and self.dist.is_main, contrast=contrast)
        self.skipped.update(cache.errors)
        return ImageSet.from_cache(cache, labels)

    def patients(self, split: str, images: ImageSet) -> list[str]:
        """Patient id of each readable image of a split (the unit the bootstrap resamples)."""
        samples = self.splits[split]
        return [samples[r].patient for r in images.rows]


def check_held_out(splits: dict, unlabeled: list[str]) -> None:
    """Fail loudly when a held-out image is byte-identical to one that is trained on or selected with.

    The official test split is the external check of complete recipes, and validation picks epochs and
    thresholds: a copy of a test image anywhere in train/ (the training or the validation split) or of a
    held-out image among the SSL (--unlabeled) images would make those checks meaningless without anyone
    noticing. (The validation split is carved from train/ with duplicates kept on one side, see
    kd.data.patient_split, so it cannot clash with the training split.)"""
    held_out: dict[str, tuple[str, str]] = {}
    for name in ("val", "official-val", "test"):
        held_out.update({content_hash(s.path): (name, s.path) for s in splits.get(name, [])})
    trained = [(p, "--unlabeled", ("val", "official-val", "test")) for p in unlabeled]
    trained += [(s.path, "train/", ("official-val", "test")) for s in splits["train"] + splits["val"]]
    clashes = []
    for path, where, forbidden in trained:
        hit = held_out.get(content_hash(path))
        if hit is not None and hit[0] in forbidden:
            clashes.append(f"{path} ({where}) = {hit[1]} ({hit[0]})")
    if clashes:
        shown = "; ".join(clashes[:5]) + (f"; and {len(clashes) - 5} more" if len(clashes) > 5 else "")
        raise DatasetError(f"{len(clashes)} training image(s) are byte-identical to held-out images, which must "
                           f"never be trained on: {shown}. Remove them from the training or unlabeled folders.")
