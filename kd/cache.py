"""Decode each image once into a memory-mapped uint8 array, so epochs never re-decode JPEGs.

The cache is keyed by the file list (path, size, mtime), the square size and PREPROCESS_VERSION;
it lives on disk and is paged in by the OS, so RAM stays bounded even for 400k unlabeled images.
Unreadable files are skipped and counted, never a crash mid-epoch; a split left with too few
readable images is refused up front, naming some of the files.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from kd.checkpoint import temporary_path, write_json_atomic
from kd.data import CLASSES, DatasetError
from kd.preprocess import FORMAT_NAMES, PREPROCESS_VERSION, ImageError, prepare_file


@dataclass
class ImageCache:
    """Images [N, S, S] uint8 (memory-mapped) and which of the N files were readable."""

    images: np.ndarray
    valid: np.ndarray  # bool [N]
    paths: list[str]
    errors: dict[str, str]  # path -> why it was skipped

    @property
    def size(self) -> int:
        return self.images.shape[-1]


def cache_key(paths: list[str], size: int, contrast: str = "none") -> str:
    h = hashlib.sha256(f"v{PREPROCESS_VERSION}-{size}-{contrast}".encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"\0{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def _decode(path: str, size: int, contrast: str) -> tuple[np.ndarray | None, str | None]:
    try:
        return prepare_file(path, size, contrast)[0], None
    except ImageError as e:
        return None, str(e)


def _decode_into(out: np.ndarray, paths: list[str], size: int, progress: bool, workers: int | None,
                 contrast: str = "none"):
    valid = np.zeros(len(paths), dtype=bool)
    errors: dict[str, str] = {}
    with ThreadPoolExecutor(workers or os.cpu_count() or 2) as pool:  # Pillow releases the GIL while decoding
        results = pool.map(lambda p: _decode(p, size, contrast), paths)
        for i, (img, err) in enumerate(tqdm(results, total=len(paths), desc=f"decode {size}px",
                                            disable=None if progress else True, leave=False)):
            if img is None:
                errors[paths[i]] = err
            else:
                out[i] = img
                valid[i] = True
    return valid, errors


def build_cache(paths: list[str], size: int, cache_dir: str | Path | None, progress: bool = True,
                workers: int | None = None, contrast: str = "none") -> ImageCache:
    """Open the on-disk cache for these files at this size, building it first if needed (atomically).

    With cache_dir=None the images are decoded into RAM instead (small evaluation splits)."""
    if cache_dir is None:
        images = np.zeros((len(paths), size, size), dtype=np.uint8)
        valid, errors = _decode_into(images, paths, size, progress, workers, contrast)
        return ImageCache(images, valid, list(paths), errors)
    cache_dir = Path(cache_dir)
    key = cache_key(paths, size, contrast)
    data_path, meta_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    cache = _open(data_path, meta_path, paths, size)
    if cache is not None:
        return cache
    if cache_dir.exists() and not cache_dir.is_dir():
        raise DatasetError(f"The image cache folder {cache_dir} is a file, not a folder: move it away or give "
                           "another --cache-dir.")
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Builders may run side by side (a control beside a pretraining, two app jobs) on one cache_dir, so nothing
    # here deletes what another may be reading: a damaged cache is replaced, never unlinked; the metadata lands
    # before the array, so a reader never finds a finished-looking array without it; and this builder reads its
    # own file, mapped before the rename, whatever another builder does to the name afterwards.
    tmp = temporary_path(data_path)  # removes what builders killed mid-way left (as large as the cache)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), size, size))
        valid, errors = _decode_into(out, paths, size, progress, workers, contrast)
        out.flush()
        del out
        images = np.load(tmp, mmap_mode="r")
        write_json_atomic(meta_path, {"n": len(paths), "size": size, "valid": valid.tolist(), "errors": errors,
                                      "preprocess_version": PREPROCESS_VERSION, "contrast": contrast})
        os.replace(tmp, data_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ImageCache(images, valid, list(paths), errors)


def _open(data_path: Path, meta_path: Path, paths: list[str], size: int) -> ImageCache | None:
    """The cache on disk, or None when it is missing or damaged (metadata that is not JSON or describes another
    number of images, an array truncated or of another shape): then it is rebuilt."""
    if not (data_path.exists() and meta_path.exists()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        images = np.load(data_path, mmap_mode="r")
        valid = np.asarray(meta["valid"], dtype=bool)
        errors = meta["errors"]
        if images.shape != (len(paths), size, size) or images.dtype != np.uint8 or valid.shape != (len(paths),) \
                or meta.get("n") != len(paths) or not isinstance(errors, dict):
            return None
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None
    return ImageCache(images, valid, list(paths), errors)


def check_readable(cache: ImageCache, labels: np.ndarray, examples: int = 3) -> None:
    """Refuse a split that decoding left unusable: a class (or the unlabeled images) with no readable
    image, or fewer than half of the labelled images readable. Otherwise training would fail later
    on an empty batch with a message that names no file."""
    problems = []
    for label in sorted(set(labels.tolist())):
        mine = labels == label
        if not cache.valid[mine].any():
            what = CLASSES[label] if 0 <= label < len(CLASSES) else "unlabeled"
            problems.append(f"none of the {int(mine.sum())} {what} images could be read")
    labelled = labels >= 0
    if not problems and labelled.any() and cache.valid[labelled].sum() * 2 < labelled.sum():
        problems.append(f"only {int(cache.valid[labelled].sum())} of {int(labelled.sum())} labelled images could be read")
    if problems:
        bad = [p for p, ok in zip(cache.paths, cache.valid) if not ok][:examples]
        shown = "; ".join(f"{p}: {cache.errors.get(p, 'unreadable')}" for p in bad)
        raise DatasetError(f"The dataset cannot be used: {', '.join(problems)}. For example {shown}. "
                           f"Replace or remove the unreadable files ({FORMAT_NAMES} X-rays).")


@dataclass
class ImageSet:
    """Readable images of a split with their labels (-1 = unlabeled), served as uint8 batches."""

    images: np.ndarray  # [N, S, S] uint8, usually a memmap
    labels: np.ndarray  # int64 [N]
    rows: np.ndarray  # row of each image in `images`
    teacher_logits: np.ndarray | None = None  # float32 [N, 2]: cached distillation targets, served with each batch

    @classmethod
    def from_cache(cls, cache: ImageCache, labels) -> "ImageSet":
        """The readable images; a DatasetError naming unreadable files when too few are left to use."""
        labels = np.asarray(labels, dtype=np.int64)
        check_readable(cache, labels)
        rows = np.flatnonzero(cache.valid)
        return cls(cache.images, labels[rows], rows)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def size(self) -> int:
        return self.images.shape[-1]

    def batch(self, index, device) -> tuple:
        """uint8 images [B, S, S] and labels [B] for positions `index` (sorted rows read faster), then the
        cached teacher logits [B, 2] when this set carries them."""
        import torch

        index = np.asarray(index)
        rows = self.rows[index]
        order = np.argsort(rows, kind="stable")
        pixels = np.empty((len(rows), self.size, self.size), dtype=np.uint8)
        pixels[order] = self.images[rows[order]]
        images = torch.from_numpy(pixels)
        labels = torch.from_numpy(self.labels[index])
        extra = () if self.teacher_logits is None else (torch.from_numpy(self.teacher_logits[index]),)
        if device.type == "cuda":
            return (images.pin_memory().to(device, non_blocking=True), labels.to(device, non_blocking=True),
                    *(t.to(device, non_blocking=True) for t in extra))
        return (images, labels, *extra)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels[self.labels >= 0], minlength=2)

    def unlabeled_only(self) -> "ImageSet":
        """The images without labels, on the same cache (SSL pretraining on the outside corpus alone)."""
        keep = self.labels < 0
        logits = None if self.teacher_logits is None else self.teacher_logits[keep]
        return ImageSet(self.images, self.labels[keep], self.rows[keep], logits)
