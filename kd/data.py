"""The Kermany dataset layout, patient ids, and the patient-level validation split.

Kermany et al. (2018) ship `DATA/{train,val,test}/{NORMAL,PNEUMONIA}`. The official `val/` has 16
images, so the validation split used for model selection is carved from `train/` by patient: the
same child never appears on both sides, otherwise validation scores are inflated.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import os
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from kd.preprocess import FILE_SUFFIXES, FORMAT_NAMES

CLASSES = ("NORMAL", "PNEUMONIA")
PNEUMONIA = CLASSES.index("PNEUMONIA")  # the class index every model output and heat map uses
DEFAULT_VAL_FRACTION = 0.15  # share of train/'s images (by patient) carved out as the validation split
IMAGE_EXTENSIONS = FILE_SUFFIXES  # one list with the uploader and `kd predict` (kd.preprocess.FORMATS)

LAYOUT_HELP = """Expected layout (Kermany et al. 2018, "chest_xray"; class folders are case-insensitive):
  DATA/
    train/
      NORMAL/      IM-0115-0001.jpeg, NORMAL2-IM-0427-0001.jpeg, ...
      PNEUMONIA/   person1_bacteria_1.jpeg, person1_virus_6.jpeg, ...
    val/           (optional, same two class folders)
    test/          (optional, same two class folders)
Get it from Mendeley Data (doi:10.17632/rscbjbr9sj.2, CC BY 4.0) or Kaggle "chest-xray-pneumonia"."""


class DatasetError(ValueError):
    """A dataset folder that does not follow the expected layout; the message shows the layout."""


@dataclass(frozen=True)
class Sample:
    path: str
    label: int  # 0 = NORMAL, 1 = PNEUMONIA
    patient: str


_PNEUMONIA_ID = re.compile(r"^(person\d+)_", re.IGNORECASE)
_NORMAL_ID = re.compile(r"^((?:NORMAL2-)?IM-\d+)", re.IGNORECASE)


def patient_id(filename: str) -> str:
    """`person123_bacteria_4` -> person123; `IM-0117-0001` -> IM-0117; `NORMAL2-IM-0117-0001` -> NORMAL2-IM-0117.

    Names that follow neither scheme are their own patient (the file stem)."""
    stem = Path(filename).stem
    for pattern in (_PNEUMONIA_ID, _NORMAL_ID):
        m = pattern.match(stem)
        if m:
            return m.group(1)
    return stem


def _listing_errors(fn):
    """An OSError while listing a dataset (a folder without read permission, /proc) becomes a
    DatasetError naming the path, like every other dataset problem: callers show it, not a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OSError as e:
            where = e.filename or (args[0] if args else "the dataset")
            raise DatasetError(f"{where} cannot be read ({e.strerror or e}): check the path and its permissions.") from e
    return wrapper


def _raise(error: OSError):
    raise error


def _is(path: Path, test) -> bool:
    """A file-type test that says no for an entry that cannot even be looked at (/proc/1/cwd)."""
    try:
        return test(path)
    except OSError:
        return False


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and _is(path, Path.is_file)


def _child_dirs(folder: Path) -> dict[str, Path]:
    return {p.name.lower(): p for p in folder.iterdir() if _is(p, Path.is_dir)} if _is(folder, Path.is_dir) else {}


def _has_train(folder: Path) -> bool:
    try:
        return find_split(folder, "train") is not None
    except DatasetError:  # only a hint is looked for here: an unreadable sub-folder is not it
        return False


@_listing_errors
def find_split(root: str | Path, split: str) -> Path | None:
    """The folder of a split (case-insensitive), or None when the dataset does not have it."""
    return _child_dirs(Path(root)).get(split.lower())


@_listing_errors
def check_root(root: str | Path) -> Path:
    """The dataset root, or a DatasetError that says what is wrong and shows the layout."""
    root = Path(root).expanduser()
    if str(root).strip() and root.is_symlink() and not root.exists():
        try:
            root.resolve(strict=True)
        except RuntimeError:  # Python < 3.13 says so for a loop; OSError(ELOOP) on newer ones
            raise DatasetError(f"{root} is a symbolic link that loops back on itself.\n\n{LAYOUT_HELP}") from None
        except OSError as e:
            why = "loops back on itself" if e.errno == errno.ELOOP else f"points to {os.readlink(root)}, which does not exist"
            raise DatasetError(f"{root} is a symbolic link that {why}.\n\n{LAYOUT_HELP}") from None
    if not str(root).strip() or not root.exists():
        raise DatasetError(f"The folder {root} does not exist.\n\n{LAYOUT_HELP}")
    if not root.is_dir():
        raise DatasetError(f"{root} is a file, not a folder.\n\n{LAYOUT_HELP}")
    if find_split(root, "train") is None:
        nested = [d for d in _child_dirs(root).values() if _has_train(d)]
        hint = f" It looks nested one level too deep: try {nested[0]}." if nested else ""
        if {c.lower() for c in CLASSES} <= set(_child_dirs(root)):
            hint = " It holds the class folders directly: point to the folder above the split folders."
        raise DatasetError(f"{root} has no train/ folder.{hint}\n\n{LAYOUT_HELP}")
    return root


@_listing_errors
def list_split(root: str | Path, split: str) -> list[Sample]:
    """The labelled images of a split, sorted; a DatasetError for a missing or empty class folder."""
    root = check_root(root) if split == "train" else Path(root).expanduser()
    folder = find_split(root, split)
    if folder is None:
        raise DatasetError(f"{root} has no {split}/ folder.\n\n{LAYOUT_HELP}")
    classes = _child_dirs(folder)
    samples: list[Sample] = []
    for label, name in enumerate(CLASSES):
        class_dir = classes.get(name.lower())
        if class_dir is None:
            raise DatasetError(f"{folder} has no {name}/ folder.\n\n{LAYOUT_HELP}")
        files = sorted(p for p in class_dir.iterdir() if is_image_file(p))
        if not files:
            sub = [d for d in class_dir.iterdir() if _is(d, Path.is_dir)]
            hint = f" (it holds only sub-folders such as {sub[0].name}/: nested one level too deep?)" if sub else ""
            raise DatasetError(f"{class_dir} has no images ({FORMAT_NAMES}){hint}.\n\n{LAYOUT_HELP}")
        if not any(_is(p, lambda q: q.stat().st_size > 0) for p in files):
            raise DatasetError(f"All {len(files)} files in {class_dir} are empty (0 bytes): the copy of the dataset is "
                               f"incomplete.\n\n{LAYOUT_HELP}")
        samples += [Sample(str(p), label, patient_id(p.name)) for p in files]
    return samples


MIN_TRAIN_PER_CLASS = 2  # a patient-level validation split needs at least one image of each class on each side


@_listing_errors
def check_layout(root: str | Path) -> dict[str, dict[str, int]]:
    """The whole layout checked before any job starts: train/ and every optional split folder present must hold
    both class folders with images, and train/ enough of each class to carve validation from it. Returns the
    image count per split and class; a DatasetError naming the folder otherwise (what a run would fail on)."""
    root = check_root(root)
    counts = {}
    for split in ("train", "val", "test"):
        if split == "train" or find_split(root, split) is not None:
            samples = list_split(root, split)
            counts[split] = {name: sum(s.label == label for s in samples) for label, name in enumerate(CLASSES)}
    few = [name for name, n in counts["train"].items() if n < MIN_TRAIN_PER_CLASS]
    if few:
        folder = find_split(root, "train")
        have = " and ".join(f"{counts['train'][name]} {name}" for name in few)
        raise DatasetError(f"{folder} has {have} image(s): training "
                           f"needs at least {MIN_TRAIN_PER_CLASS} of each class to carve a validation split from it."
                           f"\n\n{LAYOUT_HELP}")
    return counts


@_listing_errors
def list_unlabeled(folders: list[str | Path]) -> list[str]:
    """Every image file (kd.preprocess.FORMATS) under the given folders (any layout, searched recursively), sorted."""
    paths: list[str] = []
    for folder in folders:
        folder = Path(folder).expanduser()
        if not _is(folder, Path.is_dir):
            raise DatasetError(f"Unlabeled folder {folder} does not exist or is not a folder.")
        found = []
        for parent, _, files in os.walk(folder, onerror=_raise):  # rglob would skip unreadable sub-folders silently
            found += [str(p) for p in map(Path(parent).joinpath, files) if is_image_file(p)]
        paths += sorted(found)
    return paths


def unlabeled_provenance(folders: list[str], used: list[str]) -> list[dict]:
    """Per unlabeled folder: how many of its pictures the run used and, from the manifest.csv it holds (columns
    `file` and `licence`, `source_repo` when given), each source's count and licence: the terms of an outside
    corpus carry over to weights trained on it, so the model card must name them. A missing or unreadable
    manifest is said, never a failed export."""
    import csv
    from collections import Counter

    entries = []
    for folder in folders:
        root = Path(folder).expanduser().resolve()
        mine = [Path(p).resolve() for p in used if Path(p).resolve().is_relative_to(root)]
        entry: dict = {"folder": str(folder), "images": len(mine)}
        manifest = root / "manifest.csv"
        try:
            with open(manifest, newline="", encoding="utf-8") as f:
                rows = {r["file"]: (r.get("source_repo") or "", r["licence"]) for r in csv.DictReader(f)}
        except FileNotFoundError:
            entry["licences"] = "unknown: the folder has no manifest.csv naming each file's source and licence"
        except (OSError, csv.Error, UnicodeDecodeError, KeyError, TypeError) as e:
            entry["licences"] = f"unknown: {manifest} is unreadable ({type(e).__name__}: {e})"
        else:
            counts = Counter(rows.get(p.relative_to(root).as_posix(), ("", "not in manifest.csv")) for p in mine)
            entry["sources"] = [{"source": src, "licence": lic, "images": n}
                                for (src, lic), n in sorted(counts.items(), key=lambda kv: -kv[1])]
        entries.append(entry)
    return entries


def content_hash(path: str) -> str:
    """The file's content hash; an unreadable file gets a hash of its own (it matches no other file,
    and the image cache records it as unreadable)."""
    try:
        return hashlib.blake2b(Path(path).read_bytes(), digest_size=16).hexdigest()
    except OSError:
        return f"unreadable:{path}"


def _patient_groups(samples: list[Sample]) -> dict[str, str]:
    """Patient -> group id, merging patients that share byte-identical images (the dataset has ~30)."""
    parent: dict[str, str] = {s.patient: s.patient for s in samples}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    first_owner: dict[str, str] = {}
    for s in samples:
        h = content_hash(s.path)
        if h in first_owner:
            a, b = find(first_owner[h]), find(s.patient)
            if a != b:
                parent[max(a, b)] = min(a, b)
        else:
            first_owner[h] = s.patient
    return {p: find(p) for p in parent}


def patient_split(samples: list[Sample], val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Stratified split by patient, deterministic for a seed; no patient (nor duplicate image) on both sides.

    Kept by hand, not scikit-learn's StratifiedGroupKFold: that makes k equal folds, not a val_fraction,
    and this split (recorded in split.json and every model card) must not move with a library's version."""
    groups = _patient_groups(samples)
    by_group: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_group[groups[s.patient]].append(s)
    val_groups: set[str] = set()
    for label in (0, 1):
        # a group's class is its majority label (in Kermany every patient has one class)
        ids = sorted(g for g, ss in by_group.items() if Counter(s.label for s in ss).most_common(1)[0][0] == label)
        random.Random(f"{seed}-{label}").shuffle(ids)
        target = val_fraction * sum(len(by_group[g]) for g in ids)
        taken = 0
        for g in ids:
            if taken >= target:
                break
            val_groups.add(g)
            taken += len(by_group[g])
    train = [s for s in samples if groups[s.patient] not in val_groups]
    val = [s for s in samples if groups[s.patient] in val_groups]
    return train, val


def split_settings(cfg: dict) -> tuple[float, int]:
    """(val_fraction, split seed) of the patient-level split a run's config.json carved. The split has its own
    seed so that runs with different training seeds (a seed ensemble, a noise estimate) share one validation
    split; configs written before `split_seed` existed carved it with the training seed."""
    return float(cfg.get("val_fraction", DEFAULT_VAL_FRACTION)), int(cfg.get("split_seed", cfg.get("seed", 0)))


@_listing_errors
def load_splits(root: str | Path, val_fraction: float, seed: int) -> dict[str, list[Sample]]:
    """`train` and `val` carved from train/ by patient, plus `official-val` and `test` when present."""
    train, val = patient_split(list_split(root, "train"), val_fraction, seed)
    splits = {"train": train, "val": val}
    for name, folder in (("official-val", "val"), ("test", "test")):
        if find_split(root, folder) is not None:
            splits[name] = list_split(root, folder)
    return splits


@_listing_errors
def samples_for(root: str | Path, split: str, val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0) -> list[Sample]:
    """Samples of a named split: `train`/`val` (patient-level, carved from train/), `official-val`, `test`."""
    if split in ("train", "val"):
        train, val = patient_split(list_split(root, "train"), val_fraction, seed)
        return train if split == "train" else val
    folder = "val" if split == "official-val" else split
    if find_split(root, folder) is None:
        raise DatasetError(f"{root} has no {folder}/ folder.\n\n{LAYOUT_HELP}")
    return list_split(root, folder)


def describe(samples: list[Sample]) -> dict:
    """Image and patient counts per class, for reports and the app's Data page."""
    out = {}
    for label, name in enumerate(CLASSES):
        ss = [s for s in samples if s.label == label]
        out[name] = {"images": len(ss), "patients": len({s.patient for s in ss})}
    return out


def stratified_sample(samples: list[Sample], n: int, seed: int = 0) -> list[Sample]:
    """Up to n samples, about half of each class, deterministic for a seed."""
    rng = random.Random(seed)
    by_class = [[s for s in samples if s.label == c] for c in range(len(CLASSES))]
    for group in by_class:
        rng.shuffle(group)
    out, i = [], 0
    while len(out) < n and any(i < len(g) for g in by_class):
        for g in by_class:
            if i < len(g) and len(out) < n:
                out.append(g[i])
        i += 1
    return out
