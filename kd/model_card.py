"""The model card shipped next to the weights: what was trained, on what, how well, and where the
decision threshold comes from. The app and `kd evaluate` read the threshold and normalisation here."""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
from pathlib import Path

from kd import preprocess
from kd.data import Sample
from kd.models import ARCHITECTURES

CARD_FILE = "model_card.json"
DISCLAIMER = ("Research tool, not a diagnostic device: not cleared for clinical use; every output must be "
              "reviewed by a qualified clinician.")


def data_fingerprint(samples: list[Sample]) -> str:
    """Hash of the training file names and sizes: two runs on the same data share it."""
    h = hashlib.sha256()
    for s in sorted(samples, key=lambda s: Path(s.path).name):
        h.update(f"{Path(s.path).name}:{os.path.getsize(s.path)}:{s.label};".encode())
    return h.hexdigest()[:16]


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def base_card(input_size: int) -> dict:
    return {
        "disclaimer": DISCLAIMER,
        "task": "pneumonia vs normal on pediatric chest X-rays (Kermany et al. 2018)",
        "classes": ["NORMAL", "PNEUMONIA"],
        "positive_class": "PNEUMONIA",
        "input": {"channels": 1, "size": input_size, "resize": "whole image stretched to a square (aspect not kept)",
                  "mean": preprocess.MEAN, "std": preprocess.STD, "scale": "pixel / 255",
                  "preprocess_version": preprocess.PREPROCESS_VERSION},
        "models": {role: {"architecture": arch, "file": f"{role}.safetensors"} for role, arch in ARCHITECTURES.items()},
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def read_card(weights_dir: str | Path) -> dict:
    return json.loads((Path(weights_dir) / CARD_FILE).read_text())
