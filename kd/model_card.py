"""The model card shipped next to the weights: what was trained, on what, how well, and where the
decision threshold comes from. The app and `kd evaluate` read the threshold and normalisation here."""
from __future__ import annotations

import datetime
import hashlib
import os
import subprocess
from pathlib import Path

from kd import preprocess, statefile
from kd.data import Sample
from kd.models import ARCHITECTURES
from kd.statefile import (NUMBER, OPTIONAL_DICT, OPTIONAL_NUMBER, ShapeError, expect, finite, list_of, mapping_of,
                          nullable, object_with, one_of)

CARD_FILE = "model_card.json"
DISCLAIMER = ("Research tool, not a diagnostic device: not cleared for clinical use; every output must be "
              "reviewed by a qualified clinician.")
INTENDED_USE = ("Made for frontal (anterior-posterior) chest X-rays of children aged one to five, the kind it learnt "
                "from (Kermany et al. 2018: Guangzhou Women and Children's Medical Center); adults, lateral views and "
                "other body parts were never tested.")


def data_fingerprint(samples: list[Sample]) -> str:
    """Hash of the training file names and sizes: two runs on the same data share it."""
    h = hashlib.sha256()
    for s in sorted(samples, key=lambda s: Path(s.path).name):
        h.update(f"{Path(s.path).name}:{os.path.getsize(s.path)}:{s.label};".encode())
    return h.hexdigest()[:16]


SPLIT_HASHES_FILE = "split_hashes.json"  # content hashes of the images the weights were trained and selected on
HASH_CHARS = 16  # of kd.data.content_hash's hex digest: 64 bits, no collision among a dataset's images


def write_split_hashes(weights_dir: str | Path, splits: dict[str, list[Sample]]) -> Path:
    """The weights' own training and validation images, by content, next to the weights: Evaluate warns when a
    folder it is asked to judge holds them (figures on training images say nothing about new patients)."""
    from kd.checkpoint import write_json_atomic
    from kd.data import content_hash

    hashes = {split: sorted({content_hash(s.path)[:HASH_CHARS] for s in splits[split]}) for split in ("train", "val")}
    path = Path(weights_dir) / SPLIT_HASHES_FILE
    write_json_atomic(path, {"hash": f"blake2b-128 of the file's bytes, first {HASH_CHARS} hex digits", **hashes})
    return path


def split_overlap(weights_dir: str | Path, paths: list[str]) -> dict | None:
    """How many of `paths` are the weights' training and validation images (by content); None when the weights
    do not list theirs (exported before SPLIT_HASHES_FILE existed) or the list cannot be read."""
    from kd import statefile
    from kd.data import content_hash

    try:
        known = statefile.read_json(Path(weights_dir) / SPLIT_HASHES_FILE,
                                    statefile.object_with({"train": statefile.list_of(str), "val": statefile.list_of(str)}),
                                    default=None)
    except statefile.UnreadableState:
        return None
    if known is None:
        return None
    mine = [content_hash(p)[:HASH_CHARS] for p in paths]
    sets = {split: set(known[split]) for split in ("train", "val")}
    return {"n": len(mine), **{split: sum(h in sets[split] for h in mine) for split in ("train", "val")}}


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def base_card(input_size: int, contrast: str = "none") -> dict:
    return {
        "disclaimer": DISCLAIMER,
        "intended_use": INTENDED_USE,
        "task": "pneumonia vs normal on pediatric chest X-rays (Kermany et al. 2018)",
        "classes": ["NORMAL", "PNEUMONIA"],
        "positive_class": "PNEUMONIA",
        "input": {"channels": 1, "size": input_size, "resize": "whole image stretched to a square (aspect not kept)",
                  "contrast": contrast, "mean": preprocess.MEAN, "std": preprocess.STD, "scale": "pixel / 255",
                  "preprocess_version": preprocess.PREPROCESS_VERSION},
        "models": {role: {"architecture": arch, "file": f"{role}.safetensors"} for role, arch in ARCHITECTURES.items()},
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _interval(value, what: str = "it") -> None:
    """A confidence interval: [low, high] (null ends where a bootstrap had one class only)."""
    list_of(OPTIONAL_NUMBER)(value, what)
    if len(value) != 2:
        raise ShapeError(f"{what} must be a [low, high] pair, not {len(value)} value(s)")


def weights_file_name(value, what: str = "it") -> None:
    """A weights file the card names: a plain .safetensors name inside the card's own folder (no '../', no
    absolute path, no folder), so a card cannot make the app load a file from elsewhere."""
    expect(value, str, what)
    if value != Path(value).name or value in ("", ".", "..") or "\\" in value or not value.endswith(".safetensors"):
        raise ShapeError(f"{what} must be a .safetensors file name in the weights folder, not {value!r}")


def _input_size(value, what: str = "it") -> None:
    expect(value, int, what)
    if not 16 <= value <= 2048:
        raise ShapeError(f"{what} must be between 16 and 2048 pixels, not {value}")


_CI = mapping_of(nullable(_interval))
# What the app, `kd predict` and `kd evaluate` use of a card; other keys pass unchecked.
_REPORT = object_with(optional={
    **{m: OPTIONAL_NUMBER for m in ("auc", "accuracy", "sensitivity", "specificity", "precision", "f1", "threshold")},
    "n": int, "n_positive": int, "n_negative": int, "ci": _CI, "confusion_matrix": mapping_of(int),
    "roc": OPTIONAL_DICT, "calibration": OPTIONAL_DICT})
_POSITIVE = finite(0.0, low_open=True)
# a NaN threshold makes every decision NORMAL, a NaN temperature every probability NaN: both refused on reading
_MODEL_FIELDS = {"threshold": finite(0.0, 1.0), "temperature": _POSITIVE, "calibration_temperature": _POSITIVE,
                 "parameters": int, "cpu_ms_per_image": NUMBER,
                 "validation": nullable(_REPORT)}
_ARCHITECTURE = one_of(tuple(sorted(set(ARCHITECTURES.values()))))  # kd.models.build builds nothing else
_SERVED = object_with({"architecture": _ARCHITECTURE, "file": weights_file_name}, _MODEL_FIELDS)  # teacher, student
_EXTRA = object_with({"architecture": _ARCHITECTURE}, {"file": nullable(weights_file_name), **_MODEL_FIELDS})


def _check_models(value, what: str = "it") -> None:
    mapping_of(_EXTRA)(value, what)
    object_with(optional={"teacher": _SERVED, "student": _SERVED})(value, what)


CARD_SHAPE = object_with(
    {"models": _check_models,
     "input": object_with({"size": _input_size}, {"mean": finite(), "std": _POSITIVE, "contrast": one_of(preprocess.CONTRASTS)})},
    # the run's settings that readers use: the validation split's fraction and seeds (Data, Evaluate, kd evaluate)
    {"config": object_with(optional={"val_fraction": finite(0.0, 0.9, low_open=True), "split_seed": int, "seed": int}),
     "wall_time_s": mapping_of(NUMBER)})


def read_card(weights_dir: str | Path) -> dict:
    """The model card of a weights folder; statefile.UnreadableState (a ValueError) when it is missing or
    not of the shape its readers rely on."""
    return statefile.read_json(Path(weights_dir) / CARD_FILE, CARD_SHAPE)


REPORTED_SPLITS = ("validation", "test")  # what a card reports, side by side; test only when the data had one


def split_rows(card: dict, roles=None) -> list[dict]:
    """One row per model and reported split: AUC and its 95% CI, accuracy, sensitivity and specificity at
    the model's threshold, and the number of images (the CLI summary and the app's card tables)."""
    rows = []
    for role, m in card.get("models", {}).items():
        if roles is not None and role not in roles:
            continue
        for split in REPORTED_SPLITS:
            r = m.get(split)
            if r:
                lo, hi = ((r.get("ci") or {}).get("auc") or [None, None])[:2]
                rows.append({"role": role, "split": split, "auc": r.get("auc"), "auc_low": lo, "auc_high": hi,
                             **{k: r.get(k) for k in ("accuracy", "sensitivity", "specificity", "n")},
                             "threshold": r.get("threshold", m.get("threshold", 0.5))})
    return rows
