"""Out-of-distribution refusal: is this picture a chest radiograph like the ones the models learnt from?

Both models give a confident probability for anything readable (an all-black image, a checkerboard, a
page of text), so a picture is checked before any probability is shown. Two checks, on the square the
models see (`kd.serving.ModelPair.prepare`: card size and contrast):

1. Image statistics, no model: a picture made of a few flat grey levels (blank, nearly blank, a
   pattern, a drawing, a page of text) is refused with a sentence saying so (`image_reason`).
2. The teacher's pooled layer3 features (FEATURE_STAGE) against the training split's: squared
   Mahalanobis distance under a Ledoit-Wolf shrunk covariance (Lee et al. 2018; Ledoit & Wolf 2004),
   computed in the covariance's eigenbasis (the `components` largest directions exactly, the rest with
   their mean variance). layer3 rather than the penultimate layer4: on validation and the non-X-ray
   pictures of `bench/ood.py --compare` it left the widest gap between the threshold and the nearest
   non-X-ray (layer4's features, trained to tell pneumonia from normal, put a colour photograph or a
   cropped X-ray almost at the threshold).
3. The threshold is set on the patient-level validation split at the farthest of its X-rays
   (`REFUSED_VALIDATION_SHARE` = 0: none is refused; up to 0.5 % would be allowed, but the tail of
   validation is where the shifted X-rays of other children and periods land: at the 99.5th
   percentile the shipped check refused 1 of the 312 test X-rays, at 1.01x the threshold; README).

`python -m kd fit-ood --weights W --data DATA` (kd.refusal_fit.fit_ood) fits both on the weights as they are and writes
W/ood.safetensors and the card's "ood" section (threshold, rule, refusal rates, the command). The file
records the SHA-256 of the teacher it was fitted on; loading it next to another teacher fails with a
message to re-run the command, so a threshold never outlives its weights.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kd import preprocess
from kd.checkpoint import CheckpointError

OOD_FILE = "ood.safetensors"
CARD_KEY = "ood"
REFUSED_VALIDATION_SHARE = 0.0  # the threshold refuses at most this share of validation X-rays (0: the farthest)
COMPONENTS = 512  # covariance directions kept exactly (of 1024 for ResNet50's layer3); the rest share their mean variance
FEATURE_STAGE = "layer3"  # the teacher's stage whose pooled output is compared (checks fitted before: "layer4")
# Image statistics of the model's square (a monotone contrast map such as equalisation only merges grey
# levels, so these read the same before and after it). Checked on the real splits by `fit`: see the card.
MIN_GREY_LEVELS = 24  # distinct grey levels; a blank or two-tone picture has a handful
MAX_FLAT_SHARE = 0.5  # share of pixels on the 3 most common grey levels; X-rays spread over many
FLAT_LEVELS = 3
REASON_END = "; no probability is given."
NOT_CXR = "This does not look like a chest radiograph of the kind the models learnt from"


def grey_level_stats(square: np.ndarray) -> dict[str, float]:
    """Distinct grey levels and the share of pixels on the FLAT_LEVELS most common ones."""
    counts = np.bincount(np.asarray(square, dtype=np.uint8).ravel(), minlength=256)
    top = np.sort(counts)[::-1][:FLAT_LEVELS].sum()
    return {"grey_levels": int((counts > 0).sum()), "flat_share": float(top / max(counts.sum(), 1))}


def image_reason(square: np.ndarray) -> str | None:
    """Why the picture's grey levels alone rule it out as a radiograph, or None."""
    s = grey_level_stats(square)
    if s["grey_levels"] < MIN_GREY_LEVELS:
        what = "blank" if s["grey_levels"] <= 2 and s["flat_share"] > 0.999 else "a flat picture or a pattern"
        levels = f"{s['grey_levels']} grey level{'s' if s['grey_levels'] != 1 else ''}"
        return f"{NOT_CXR}: it has only {levels} ({what}), where a radiograph has hundreds{REASON_END}"
    if s["flat_share"] > MAX_FLAT_SHARE:
        return (f"{NOT_CXR}: {s['flat_share']:.0%} of it is {FLAT_LEVELS} flat grey levels (a blank page, text, "
                f"a drawing or a pattern){REASON_END}")
    return None


class EmbeddingDistance(nn.Module):
    """Squared Mahalanobis distance of embeddings [N, D] -> [N] under covariance V diag(var) V^T +
    tail_variance (I - V V^T): exact when V holds every direction, else the dropped ones share the
    mean of their variances. Computed in float64."""

    def __init__(self, mean: torch.Tensor, components: torch.Tensor, variances: torch.Tensor,
                 tail_variance: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("components", components.float())  # [k, D], orthonormal rows
        self.register_buffer("variances", variances.float())  # [k]
        self.register_buffer("tail_variance", tail_variance.float().reshape(1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = features.double() - self.mean.double()
        p = z @ self.components.double().T
        inside = (p.square() / self.variances.double()).sum(1)
        residual = (z.square().sum(1) - p.square().sum(1)).clamp_min(0)
        return inside + residual / self.tail_variance.double()

    @classmethod
    def fit(cls, features: np.ndarray, components: int = COMPONENTS) -> tuple["EmbeddingDistance", float]:
        """Ledoit-Wolf shrunk covariance of the features, kept in its eigenbasis; also returns the shrinkage."""
        from sklearn.covariance import LedoitWolf

        x = np.asarray(features, dtype=np.float64)
        lw = LedoitWolf(assume_centered=False).fit(x)
        n, d = x.shape
        k = min(components, d)
        if n < d:
            values, vectors, tail = cls._low_rank_spectrum(x - lw.location_, float(lw.shrinkage_), k)
            k = len(values)
        else:
            values, vectors = np.linalg.eigh(lw.covariance_)  # ascending
            values, vectors = values[::-1], vectors[:, ::-1].T
            tail = float(values[k:].mean()) if k < d else float(values[-1])
        module = cls(torch.from_numpy(lw.location_), torch.from_numpy(np.ascontiguousarray(vectors[:k])),
                     torch.from_numpy(values[:k].copy()), torch.tensor(tail))
        return module, float(lw.shrinkage_)

    @staticmethod
    def _low_rank_spectrum(centred: np.ndarray, shrinkage: float, k: int) -> tuple[np.ndarray, np.ndarray, float]:
        """Eigenvalues (descending), eigenvectors (rows) and tail variance of the Ledoit-Wolf covariance
        (1 - s) X'X / n + s mu I when there are fewer images n than dimensions d: X'X has rank < n, so the SVD of
        X gives its directions in O(n^2 d) instead of a d x d eigendecomposition; every other direction has
        variance s mu. Keeping at most n directions then gives the same distances as keeping k > n of them,
        since the ones beyond n would carry exactly the tail variance."""
        n, d = centred.shape
        _, singular, vectors = np.linalg.svd(centred, full_matrices=False)
        floor = shrinkage * float((singular ** 2).sum()) / (n * d)  # s * mu, mu = trace(X'X / n) / d
        values = (1.0 - shrinkage) * singular ** 2 / n + floor
        if k >= n:
            return values, vectors, floor
        return values[:k], vectors[:k], float((values[k:].sum() + (d - n) * floor) / (d - k))


@torch.inference_mode()
def stage_maps(teacher: nn.Module, squares: np.ndarray, stage: str = FEATURE_STAGE, batch_size: int = 64):
    """The teacher's `stage` feature maps of uint8 squares [N, S, S], normalised as for prediction, a batch at a
    time: what this check and kd.framing both read, so an upload's map is computed once for the two."""
    from kd.models import feature_map

    for i in range(0, len(squares), batch_size):
        x = preprocess.normalize(torch.from_numpy(np.array(squares[i:i + batch_size])))[:, None]
        yield feature_map(teacher, x.contiguous(memory_format=torch.channels_last), stage).float()


def embeddings(teacher: nn.Module, squares: np.ndarray, stage: str = FEATURE_STAGE, batch_size: int = 64,
               maps: torch.Tensor | None = None) -> torch.Tensor:
    """The teacher's pooled `stage` features [N, D] of uint8 squares [N, S, S] (from `maps` when given)."""
    out = [maps.mean((2, 3))] if maps is not None else \
        [m.mean((2, 3)) for m in stage_maps(teacher, squares, stage, batch_size)]
    return torch.cat(out) if out and len(out[0]) else torch.zeros(0, 0)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class OODCheck:
    """The fitted check: image statistics, then the teacher embedding's distance against a threshold."""

    distance: EmbeddingDistance
    threshold: float  # squared Mahalanobis distance; above it the picture is refused
    info: dict  # what the card's "ood" section says

    @property
    def stage(self) -> str:
        return str(self.info.get("stage", "layer4"))  # checks fitted before the stage was recorded used layer4

    def distances(self, teacher: nn.Module, squares: np.ndarray, maps: torch.Tensor | None = None) -> np.ndarray:
        """Distance of each uint8 square [N, S, S] (prepared as the models see them; `maps`: their stage maps)."""
        with torch.inference_mode():
            return self.distance(embeddings(teacher, squares, self.stage, maps=maps)).numpy()

    def reason(self, teacher: nn.Module, square: np.ndarray) -> str | None:
        """Why this square is refused, or None when it looks like the training X-rays."""
        return self.reasons(teacher, square[None])[0]

    def reasons(self, teacher: nn.Module, squares: np.ndarray, maps: torch.Tensor | None = None,
                turns: bool = True) -> list[str | None]:
        """`reason` for each square of [N, S, S], with one batched teacher pass for those the grey levels let by
        (none when their stage `maps` [N, C, h, w] are given); `turns=False`: without trying the refused ones turned
        (upright_turns, more teacher passes), for a caller that only needs to know whether they pass."""
        why = [image_reason(square) for square in squares]
        left = [i for i, w in enumerate(why) if w is None]
        if left:
            chosen = maps[left] if maps is not None else None
            far = {i: d for i, d in zip(left, self.distances(teacher, squares[left], chosen).tolist())
                   if d > self.threshold}
            turned = self.upright_turns(teacher, squares[list(far)]) if far and turns else [None] * len(far)
            for (i, d), turn in zip(far.items(), turned):
                why[i] = (f"{NOT_CXR}: it is less like the training X-rays than any X-ray of the validation split "
                          f"({d / self.threshold:.1f} times the limit){REASON_END}")
                if turn:
                    why[i] += (f" It would pass turned {turn}: if it is an X-ray on its side or upside down, turn "
                               "it upright and upload it again.")
        return why

    TURNS = {1: "90° anticlockwise", 2: "180°", 3: "90° clockwise"}  # np.rot90's k: anticlockwise quarter turns

    def upright_turns(self, teacher: nn.Module, squares: np.ndarray) -> list[str | None]:
        """For each refused square, the turn (of TURNS, the nearest first) under which it would pass the check, or
        None: a radiograph uploaded on its side or upside down is refused, and the person is told how to fix it."""
        turned = np.concatenate([np.rot90(squares, k, axes=(1, 2)) for k in self.TURNS])
        d = self.distances(teacher, np.ascontiguousarray(turned)).reshape(len(self.TURNS), len(squares))
        out = []
        for j in range(len(squares)):
            k = int(np.argmin(d[:, j]))
            out.append(self.TURNS[k + 1] if d[k, j] <= self.threshold else None)
        return out


def load(weights_dir: str | Path, teacher_file: str | Path) -> OODCheck | None:
    """The check fitted for these weights, None when the folder has none; a CheckpointError when it was
    fitted on another teacher or cannot be read."""
    from safetensors import safe_open

    path = Path(weights_dir) / OOD_FILE
    if not path.exists():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        info = json.loads(meta["info"])
        threshold = float(info["threshold"])
        distance = EmbeddingDistance(tensors["mean"], tensors["components"], tensors["variances"],
                                     tensors["tail_variance"])
    except Exception as e:  # a damaged or foreign file: say which
        raise CheckpointError(f"{path} is not a readable out-of-distribution check ({type(e).__name__}: {e}); "
                              f"re-create it with `python -m kd fit-ood --weights {weights_dir} --data DATA`.") from e
    if info.get("teacher_sha256") != file_sha256(teacher_file):
        raise CheckpointError(f"{path} was fitted on another teacher than {teacher_file}: its threshold does not "
                              f"apply. Re-fit it with `python -m kd fit-ood --weights {weights_dir} --data DATA`.")
    return OODCheck(distance.eval(), threshold, info)


def threshold_words(share: float = REFUSED_VALIDATION_SHARE) -> str:
    return ("set at the farthest of the validation X-rays" if share == 0 else
            f"set so that at most {share:.1%} of validation X-rays are refused")


def validation_threshold(distances: np.ndarray, share: float = REFUSED_VALIDATION_SHARE) -> float:
    """The smallest validation distance above which at most `share` of the validation distances lie."""
    d = np.sort(np.asarray(distances, dtype=np.float64))
    allowed = int(np.floor(share * len(d)))
    return float(d[len(d) - allowed - 1])


def prepared_squares(samples, size: int, contrast: str, progress: bool = True) -> np.ndarray:
    """The readable samples' uint8 squares as the models see them (the training cache's path)."""
    from kd.cache import build_cache

    cache = build_cache([s.path for s in samples], size, None, progress=progress, contrast=contrast)
    return np.asarray(cache.images[cache.valid])


def refusal_counts(squares: np.ndarray, distances: np.ndarray, threshold: float) -> dict:
    """How many of these squares the check refuses, and by which of its two parts."""
    by_stats = np.array([image_reason(s) is not None for s in squares], dtype=bool)
    by_distance = np.asarray(distances) > threshold
    refused = by_stats | by_distance
    return {"n": int(len(squares)), "refused": int(refused.sum()), "fraction": float(refused.mean()),
            "by_image_statistics": int(by_stats.sum()), "by_embedding_distance": int(by_distance.sum())}
