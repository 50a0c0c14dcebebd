"""Evaluation of a teacher/student pair: probabilities on a split, then the report of kd.metrics."""
from __future__ import annotations

import numpy as np
import torch

from kd import metrics
from kd.cache import ImageSet
from kd.serving import ModelPair, load_pair
from kd.scoring import predict_logits


def model_report(labels: np.ndarray, logits: np.ndarray, threshold: float, calibration_temperature: float = 1.0,
                 n_boot: int = 1000, seed: int = 0, groups=None, rechoose=None) -> dict:
    """Metrics at `threshold` and at 0.5 with bootstrap CIs, ROC points, calibration (ECE after scaling).

    `groups`: the patient of each image, so the CIs resample patients (None: images); `rechoose`: the
    threshold rule, when `threshold` was chosen on these same images (see kd.metrics.bootstrap_ci).

    Thresholds apply to the calibrated probability softmax(logits / calibration_temperature), the number
    the app and `kd predict` show (the distillation temperature T is another thing: kd.losses.distill)."""
    p = metrics.softmax_pneumonia(logits)
    p_cal = metrics.softmax_pneumonia(logits, calibration_temperature)
    rep = metrics.report(labels, p_cal, threshold, n_boot=n_boot, seed=seed, groups=groups, rechoose=rechoose)
    rep["roc"] = metrics.roc_points(labels, p_cal)
    rep["calibration"] = {
        "temperature": calibration_temperature,  # the key model cards have always had
        "ece_raw": metrics.expected_calibration_error(labels, p),
        "ece_scaled": metrics.expected_calibration_error(labels, p_cal),
        "curve": metrics.calibration_curve(labels, p_cal),
    }
    return rep


def evaluate_weights(weights_dir, data_root, split: str = "test", device: torch.device | None = None,
                     n_boot: int = 1000, progress=None) -> dict:
    """evaluate_pair for a weights folder, its models on `device` (default the CPU)."""
    pair = load_pair(weights_dir, ood=False)  # evaluation scores image sets: the refusal check is not needed
    for m in pair.models.values():
        m.model.to(device or torch.device("cpu"))
    return evaluate_pair(pair, data_root, split, n_boot=n_boot, progress=progress)


def evaluate_pair(pair: ModelPair, data_root, split: str = "test", n_boot: int = 1000, progress=None) -> dict:
    """Teacher and student on a split, at the model card's thresholds and at 0.5, with 95% bootstrap CIs.

    `pair`: loaded weights, on whatever device they are (the app passes the pair its pages share: each batch
    holds the model's lock, so a diagnosis's heat-map hooks never see an evaluation's forward pass).
    `split`: test | official-val | val | train (val/train: the patient-level split of the card's config).
    The CIs resample patients; on `val`, where the thresholds were chosen, each resample re-chooses them
    by the card's rule, with the card's seed: the same numbers as the card's validation block."""
    from kd.cache import build_cache
    from kd.data import samples_for

    weights_dir = pair.weights_dir
    cfg = pair.card.config
    samples = samples_for(data_root, split, *cfg.split)
    cache = build_cache([s.path for s in samples], pair.input_size, None, progress=progress is None,
                        contrast=pair.contrast)
    images = ImageSet.from_cache(cache, [s.label for s in samples])
    result = {"split": split, "data": str(data_root), "n": len(images), "skipped_unreadable": cache.errors,
              "weights": str(weights_dir), "input_size": pair.input_size}
    patients = [samples[r].patient for r in images.rows]
    rechoose = (metrics.threshold_chooser(cfg.threshold_rule, cfg.min_sensitivity)
                if split == "val" else None)
    decisions = {}
    for i, (role, m) in enumerate(pair.models.items()):
        step = (lambda d, n, i=i: progress((i + d / n) / len(pair.models))) if progress else None
        device = next(m.model.parameters()).device
        logits = predict_logits(m.model, images, pair.input_size, device, progress=step, lock=m.lock)
        result[role] = model_report(images.labels, logits, m.threshold, m.calibration_temperature, n_boot=n_boot,
                                    seed=cfg.seed, groups=patients, rechoose=rechoose)
        # unrounded: a case near the threshold must get the same decision here as in the report
        result[role]["probabilities"] = metrics.softmax_pneumonia(logits, m.calibration_temperature).tolist()
        decisions[role] = metrics.is_pneumonia(result[role]["probabilities"], m.threshold)
    result["labels"] = images.labels.tolist()
    result["files"] = [samples[r].path for r in images.rows]
    result["agreement"] = float(np.mean(decisions["teacher"] == decisions["student"])) if len(images) else None
    return result
