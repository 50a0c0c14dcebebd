"""Framing check: does this upload show a whole frontal chest X-ray the right way round?

The models learnt from whole radiographs stretched to a square; a crop (the upper half of a chest, one side),
a zoom into the middle, or a picture mirrored left-to-right (the heart on the image's left, the "R" marker
reversed) or turned on its side or upside down passes the out-of-distribution check (kd.ood) often enough, and
then gets a confident probability that means little: a healthy child's upper half was called PNEUMONIA at 92.7 %
by the teacher, and the SimCLR teacher's features, pretrained on adults' X-rays, put an upside-down X-ray inside
the refusal threshold (0.99x).

Three linear probes (logistic regression, scikit-learn) on the teacher's layer3 feature map pooled to 2 x 2 (the
layout kept, so that left and right differ): "partial" (crops and zooms of training X-rays against the whole
ones), "mirrored" (flipped against the originals) and "turned" (turned 90 degrees either way or upside down against
the upright originals). Each warns above a threshold set at the highest score of
the validation split's whole X-rays, so no validation X-ray is warned about. It is a warning shown beside the
probabilities (the picture may still be an X-ray), not a refusal. `python -m kd fit-ood` fits it after the
out-of-distribution check and writes FRAMING_FILE and the card's "framing" section, with the rates measured on
validation crops, zooms and mirrored images; like kd.ood's file it records the teacher it was fitted on.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kd import preprocess
from kd.checkpoint import CheckpointError

FRAMING_FILE = "framing.safetensors"
CARD_KEY = "framing"
STAGE = "layer3"
MAX_TRAIN = 1000  # training X-rays the probes see (each with its six variants)
WARNINGS = {
    "partial": ("This looks like part of a chest X-ray (cropped or zoomed in), not the whole chest: the models "
                "learnt from whole frontal X-rays, so the probability may mean little; upload the whole image."),
    "mirrored": ("This looks mirrored left-to-right (the heart on the image's left side, the 'R' marker reversed?): "
                 "the models learnt from X-rays in the standard orientation; check the picture before reading the "
                 "probability."),
    "turned": ("This looks turned on its side or upside down: the models learnt from upright frontal X-rays, so the "
               "probability may mean little; turn the picture upright and upload it again."),
}


def variants(pixels: np.ndarray) -> dict[str, tuple[str, np.ndarray]]:
    """The crops, zooms and mirror image of a decoded X-ray (2-D uint8) that the probes learn to tell apart:
    name -> (probe, pixels)."""
    h, w = pixels.shape
    zoom = lambda f: pixels[int(h * (1 - f) / 2):int(h * (1 + f) / 2), int(w * (1 - f) / 2):int(w * (1 + f) / 2)]
    return {"upper half": ("partial", pixels[:h // 2]), "lower half": ("partial", pixels[h // 2:]),
            "left half": ("partial", pixels[:, :w // 2]), "right half": ("partial", pixels[:, w // 2:]),
            "zoom 60%": ("partial", zoom(0.6)), "mirrored": ("mirrored", pixels[:, ::-1]),
            "turned 90° clockwise": ("turned", np.rot90(pixels, -1)), "upside down": ("turned", np.rot90(pixels, 2)),
            "turned 90° anticlockwise": ("turned", np.rot90(pixels, 1))}


@torch.inference_mode()
def features(teacher: nn.Module, squares: np.ndarray, batch_size: int = 64,
             maps: torch.Tensor | None = None) -> np.ndarray:
    """The teacher's STAGE map of uint8 squares [N, S, S] (kd.ood.stage_maps, or `maps` when given), pooled to
    2 x 2 and flattened: [N, 4 C]."""
    from kd.ood import stage_maps

    out = [F.adaptive_avg_pool2d(m, 2).flatten(1)
           for m in ([maps] if maps is not None else stage_maps(teacher, squares, STAGE, batch_size))]
    return torch.cat(out).numpy() if out and len(out[0]) else np.zeros((0, 0), np.float32)


class LinearProbe(nn.Module):
    """score = sigmoid(w . (x - mean) / std + b): a fitted logistic regression as tensors (safetensors)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        for name, value in (("mean", mean), ("std", std), ("weight", weight), ("bias", bias.reshape(1))):
            self.register_buffer(name, value.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(((x - self.mean) / self.std) @ self.weight + self.bias)


class FramingProbes(nn.Module):
    def __init__(self, probes: dict[str, LinearProbe]):
        super().__init__()
        self.probes = nn.ModuleDict(probes)


@dataclass
class FramingCheck:
    probes: FramingProbes
    thresholds: dict[str, float]
    info: dict

    def scores(self, feats: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.asarray(feats, dtype=np.float32))
        with torch.inference_mode():
            return {name: probe(x).numpy() for name, probe in self.probes.probes.items()}

    def warnings(self, teacher: nn.Module, squares: np.ndarray, maps: torch.Tensor | None = None) -> list[tuple[str, ...]]:
        """The framing warnings of each square of [N, S, S] (an empty tuple for a whole, upright X-ray); `maps`:
        their STAGE maps when the caller has them already. Only the probes the check was fitted with (a check fitted
        before the "turned" probe has two)."""
        scores = self.scores(features(teacher, squares, maps=maps))
        fitted = [name for name in WARNINGS if name in self.thresholds]
        return [tuple(WARNINGS[name] for name in fitted if scores[name][i] > self.thresholds[name])
                for i in range(len(squares))]


def _fit_probe(whole: np.ndarray, other: np.ndarray) -> LinearProbe:
    from sklearn.linear_model import LogisticRegression

    x = np.concatenate([whole, other]).astype(np.float64)
    y = np.r_[np.zeros(len(whole)), np.ones(len(other))]
    mean, std = x.mean(0), x.std(0) + 1e-6
    model = LogisticRegression(C=0.05, class_weight="balanced", max_iter=2000).fit((x - mean) / std, y)
    return LinearProbe(*(torch.from_numpy(np.asarray(a)) for a in (mean, std, model.coef_[0], model.intercept_)))


def variant_squares(samples, size: int, contrast: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Whole squares of the readable samples, and each variant's squares, prepared as the models see them."""
    whole, made = [], {name: [] for name in variants(np.zeros((4, 4), np.uint8))}
    for s in samples:
        try:
            pixels = preprocess.load_xray_file(s.path, target_size=size).pixels
        except preprocess.ImageError:
            continue
        whole.append(preprocess.apply_contrast(preprocess.to_square(pixels, size), contrast))
        for name, (_, part) in variants(pixels).items():
            made[name].append(preprocess.apply_contrast(preprocess.to_square(np.ascontiguousarray(part), size),
                                                        contrast))
    return np.asarray(whole), {name: np.asarray(v) for name, v in made.items()}


def fit(teacher: nn.Module, splits: dict, size: int, contrast: str, seed: int = 0,
        max_train: int = MAX_TRAIN) -> tuple[FramingCheck, dict]:
    """Fit the probes on (a seeded subset of) the training split, set each threshold at the highest score of
    validation's whole X-rays, and measure on validation's variants (and, counted only, the test split's whole
    X-rays): (the check, the card's "framing" section without the file and teacher fields)."""
    train = splits["train"]
    if len(train) > max_train:
        keep = np.sort(np.random.default_rng(seed).choice(len(train), max_train, replace=False))
        train = [train[i] for i in keep]
    whole, made = variant_squares(train, size, contrast)
    whole_f = features(teacher, whole)
    made_f = {name: features(teacher, sq) for name, sq in made.items()}
    probe_of = {name: probe for name, (probe, _) in variants(np.zeros((4, 4), np.uint8)).items()}
    probes = {probe: _fit_probe(whole_f, np.concatenate([f for name, f in made_f.items() if probe_of[name] == probe]))
              for probe in WARNINGS}
    check = FramingCheck(FramingProbes(probes).eval(), {}, {})
    val_whole, val_made = variant_squares(splits["val"], size, contrast)
    val_scores = check.scores(features(teacher, val_whole))
    check.thresholds = {name: float(val_scores[name].max()) for name in WARNINGS}
    flagged = lambda squares: [bool(w) for w in check.warnings(teacher, squares)] if len(squares) else []
    rates = {"validation whole X-rays": _rate(flagged(val_whole))}
    for name, squares in val_made.items():
        rates[f"validation, {name}"] = _rate(flagged(squares))
    if "test" in splits:
        test_whole, _ = variant_squares(splits["test"], size, contrast)
        rates["test whole X-rays (counted only)"] = _rate(flagged(test_whole))
    info = {"method": ("logistic regression on the teacher's layer3 map pooled to 2 x 2: 'partial' (upper, lower, "
                       "left and right halves, a 60 % zoom), 'mirrored' and 'turned' (90 degrees either way, upside "
                       "down) against whole upright X-rays; a warning, not a refusal"),
            "thresholds": check.thresholds,
            "threshold_rule": "the highest score among the validation split's whole X-rays (none of them is warned)",
            "train_images": int(len(whole)), "warned": rates}
    check.info = info
    return check, info


def _rate(flags: list[bool]) -> dict:
    return {"n": len(flags), "warned": int(sum(flags)), "fraction": float(np.mean(flags)) if flags else 0.0}


def load(weights_dir: str | Path, teacher_sha256: str) -> FramingCheck | None:
    """The fitted check of a weights folder, None when it has none; CheckpointError for a damaged file or one
    fitted on another teacher."""
    from safetensors import safe_open

    path = Path(weights_dir) / FRAMING_FILE
    if not path.exists():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            info = json.loads((f.metadata() or {})["info"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        # the probes the file holds (one fitted before the "turned" probe has two), in WARNINGS' order
        held = {key.split(".")[1] for key in tensors}
        names = [name for name in WARNINGS if name in held]
        if not names:
            raise ValueError("it holds no probe")
        probes = FramingProbes({name: LinearProbe(*(tensors[f"probes.{name}.{k}"] for k in ("mean", "std", "weight",
                                                                                             "bias")))
                                for name in names})
        thresholds = {name: float(info["thresholds"][name]) for name in names}
        if not all(np.isfinite(list(thresholds.values()))):
            raise ValueError("a threshold is not finite")
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable framing check ({type(e).__name__}: {e}); re-create it with "
                              f"`python -m kd fit-ood --weights {weights_dir} --data DATA`.") from e
    if info.get("teacher_sha256") != teacher_sha256:
        raise CheckpointError(f"{path} was fitted on another teacher: re-fit it with `python -m kd fit-ood --weights "
                              f"{weights_dir} --data DATA`.")
    return FramingCheck(probes.eval(), thresholds, info)
