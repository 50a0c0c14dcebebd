"""Fitting what guards the served weights: the out-of-distribution refusal (kd.ood) and the framing warnings
(kd.framing), on the weights as exported and the run's own patient-level splits.

Without the refusal check nothing tells a chest X-ray from a photograph, and the models give a confident
probability for both, so every exported run carries one: `kd.pipeline.run` calls `fit_checks` right after the
export, and `python -m kd fit-ood` calls it on any weights folder (re-run it whenever the weights change). The
checks themselves (kd.ood, kd.framing) only load and apply what is fitted here, so the app's side of them
imports nothing of this.
"""
from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

import numpy as np
import torch

from kd import framing, ood
from kd.checkpoint import save_weights
from kd.data import load_splits
from kd.model_card import git_commit, read_card, write_card
from kd.serving import load_pair
from kd.ood import file_sha256


def fit_checks(weights_dir: str | Path, data_root: str | Path, command: str = "",
               max_train: int | None = None) -> dict[str, dict]:
    """Fit both on `weights_dir` (its teacher, its card's split settings) and write their files and card
    sections; returns {"ood": section, "framing": section}."""
    loaded = load_pair_and_splits(weights_dir, data_root)  # once for both: the split hashes every train/ file
    refusal = fit_ood(weights_dir, data_root, max_train=max_train, command=command, loaded=loaded)
    warnings = fit_framing(weights_dir, data_root, command=command, max_train=max_train, loaded=loaded)
    return {ood.CARD_KEY: refusal, framing.CARD_KEY: warnings}


def load_pair_and_splits(weights_dir: str | Path, data_root: str | Path) -> tuple:
    """The weights (without a check: it is what is being fitted) and the patient-level splits of their card."""
    pair = load_pair(weights_dir, ood=False)
    val_fraction, seed = pair.card.config.split
    return pair, load_splits(data_root, val_fraction, seed)


def fit_ood(weights_dir: str | Path, data_root: str | Path, max_train: int | None = None,
            components: int = ood.COMPONENTS, command: str = "", stage: str = ood.FEATURE_STAGE,
            loaded: tuple | None = None) -> dict:
    """Fit the check on the training split's teacher embeddings, set the threshold on the validation
    split, write weights_dir/ood.safetensors and the card's "ood" section; returns that section.

    The splits are the patient-level ones of the card's config (val_fraction, seed), the images prepared
    as the models see them. `max_train`: a seeded random subset of the training split (None: all of it).
    The test split, when the dataset has one, is only counted (how many of its X-rays are refused): the
    external check, never used to set anything."""
    t0 = time.time()
    weights_dir = Path(weights_dir)
    pair, splits = loaded or load_pair_and_splits(weights_dir, data_root)
    val_fraction, seed = pair.card.config.split
    train = splits["train"]
    if max_train is not None and max_train < len(train):
        keep = np.sort(np.random.default_rng(seed).choice(len(train), max_train, replace=False))
        train = [train[i] for i in keep]
    teacher = pair.models["teacher"].model
    size, contrast = pair.input_size, pair.contrast
    train_sq = ood.prepared_squares(train, size, contrast)
    train_features = ood.embeddings(teacher, train_sq, stage)
    distance, shrinkage = ood.EmbeddingDistance.fit(train_features.numpy(), components)
    check = ood.OODCheck(distance.eval(), 0.0, {"stage": stage})
    with torch.inference_mode():
        train_d = check.distance(train_features).numpy()
    val_sq = ood.prepared_squares(splits["val"], size, contrast)
    val_d = check.distances(teacher, val_sq)
    check.threshold = ood.validation_threshold(val_d[[ood.image_reason(s) is None for s in val_sq]])
    refused = {"train": ood.refusal_counts(train_sq, train_d, check.threshold),
               "validation": ood.refusal_counts(val_sq, val_d, check.threshold)}
    if "test" in splits:
        test_sq = ood.prepared_squares(splits["test"], size, contrast)
        refused["test"] = ood.refusal_counts(test_sq, check.distances(teacher, test_sq), check.threshold)
    info = {
        "file": ood.OOD_FILE,
        "method": ("refuse when the image statistics rule it out, or when the squared Mahalanobis distance of the "
                   f"teacher's pooled {stage} features to the training split's (Ledoit-Wolf shrunk covariance) is "
                   "above the threshold"),
        "stage": stage,
        "features": f"teacher {stage}, pooled ({distance.mean.numel()}-d), images at {size} px, contrast {contrast}",
        "threshold": check.threshold,
        "threshold_rule": (f"{ood.threshold_words()} (patient-level split, val_fraction={val_fraction}, "
                           f"split seed={seed})"),
        "image_statistics": {"min_grey_levels": ood.MIN_GREY_LEVELS, "max_flat_share": ood.MAX_FLAT_SHARE,
                             "flat_levels": ood.FLAT_LEVELS},
        "shrinkage": shrinkage, "components": int(distance.components.shape[0]),
        "train_images": int(len(train_sq)),
        "train_subset": (f"seeded random {max_train} of {len(splits['train'])}" if len(train) < len(splits["train"])
                         else "all"),
        "refused": refused,
        "refused_note": "test: the external check, counted only; nothing is set on it",
        "teacher_sha256": file_sha256(weights_dir / pair.card.models["teacher"].file),
        "command": command or f"python -m kd fit-ood --weights {weights_dir} --data {data_root}",
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.time() - t0, 1),
    }
    save_weights(distance, weights_dir / ood.OOD_FILE, metadata={"info": json.dumps(info)})
    write_card(weights_dir, {**read_card(weights_dir).document, ood.CARD_KEY: info})
    return info


def fit_framing(weights_dir: str | Path, data_root: str | Path, command: str = "", max_train: int | None = None,
                loaded: tuple | None = None) -> dict:
    """kd.framing.fit for a weights folder on its card's patient-level splits; writes the framing file and the
    card's section. `loaded`: load_pair_and_splits' result, when the caller has it already."""
    t0 = time.time()
    weights_dir = Path(weights_dir)
    pair, splits = loaded or load_pair_and_splits(weights_dir, data_root)
    _, seed = pair.card.config.split
    check, info = framing.fit(pair.models["teacher"].model, splits, pair.input_size, pair.contrast, seed,
                      min(framing.MAX_TRAIN, max_train or framing.MAX_TRAIN))
    info.update(file=framing.FRAMING_FILE, teacher_sha256=file_sha256(weights_dir / pair.card.models["teacher"].file),
                command=command or f"python -m kd fit-ood --weights {weights_dir} --data {data_root}",
                git_commit=git_commit(), seconds=round(time.time() - t0, 1),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    save_weights(check.probes, weights_dir / framing.FRAMING_FILE, metadata={"info": json.dumps(info)})
    write_card(weights_dir, {**read_card(weights_dir).document, framing.CARD_KEY: info})
    return info
