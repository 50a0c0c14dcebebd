"""Binary classification metrics for the pneumonia evaluation report.

Positive class is pneumonia (label 1). Inputs are label arrays ``y`` (0/1) and
probabilities ``p`` of pneumonia. A case is predicted positive when ``p >= threshold``
(the same convention as ``sklearn.metrics.roc_curve``).

Conventions for undefined ratios (documented so the report is never NaN):
* ``auc`` is ``None`` when only one class is present in ``y``.
* ``sensitivity`` / ``specificity`` / ``precision`` / ``f1`` are ``0.0`` when their
  denominator is zero (scikit-learn's ``zero_division=0``).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.calibration import calibration_curve as sklearn_calibration_curve
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

DEFAULT_CI_METRICS = ("auc", "accuracy", "sensitivity", "specificity", "precision", "f1")
_BOOT_CELLS_PER_CHUNK = 2_000_000  # bounds memory of the [resamples, cases] count matrix


# ----------------------------------------------------------------------------- helpers


def _as_labels_and_probs(y, p) -> tuple[np.ndarray, np.ndarray]:
    """Validate inputs once so every metric sees 1-D int labels and float probabilities."""
    y = np.asarray(y).reshape(-1)
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"y and p differ in length: {y.shape[0]} vs {p.shape[0]}")
    if y.size == 0:
        raise ValueError("metrics need at least one case")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (normal) or 1 (pneumonia)")
    if not np.isfinite(p).all():
        raise ValueError("probabilities must be finite")
    return y.astype(np.int64), p


def _safe_ratio(num, den):
    """Ratio that is 0.0 where the denominator is 0 (works on scalars and arrays)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)
    return out if out.ndim else float(out)


def _has_both_classes(y: np.ndarray) -> bool:
    """AUC and ROC need at least one positive and one negative case."""
    return bool(y.min() == 0 and y.max() == 1)


def _rates_from_counts(tp, fp, fn, tn) -> dict:
    """One formula for point estimates and bootstrap resamples keeps them consistent."""
    return {
        "accuracy": _safe_ratio(tp + tn, tp + fp + fn + tn),
        "sensitivity": _safe_ratio(tp, tp + fn),
        "specificity": _safe_ratio(tn, tn + fp),
        "precision": _safe_ratio(tp, tp + fp),
        "f1": _safe_ratio(2 * tp, 2 * tp + fp + fn),
    }


# ----------------------------------------------------------------------------- point metrics


def is_pneumonia(p, threshold: float):
    """The decision rule, the one place it is written: PNEUMONIA when the calibrated probability is at least
    the threshold (array in, bool array out; a float in, a bool out)."""
    return np.asarray(p) >= threshold


def binary_metrics(y, p, threshold: float = 0.5) -> dict:
    """Headline metrics at one operating point, as plain JSON-serialisable Python values."""
    y, p = _as_labels_and_probs(y, p)
    pred = is_pneumonia(p, threshold).astype(np.int64)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, pred, labels=[0, 1]).ravel())
    auc = float(roc_auc_score(y, p)) if _has_both_classes(y) else None
    return {
        "auc": auc,
        **_rates_from_counts(tp, fp, fn, tn),
        "threshold": float(threshold),
        "n": int(y.size),
        "n_positive": int(y.sum()),
        "n_negative": int(y.size - y.sum()),
        "confusion_matrix": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
    }


def rank_auc(y, p) -> float:
    """Mann–Whitney AUC in numpy, the same value as roc_auc_score: paired_auc_difference's point estimate,
    computed by the formula its resamples use (tests check both against scikit-learn)."""
    y, p = _as_labels_and_probs(y, p)
    return float(weighted_rank_auc(y, p, np.ones((1, y.size)))[0])


def weighted_rank_auc(y: np.ndarray, p: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC of many resamples at once; weights[b, i] = how often case i occurs in resample b.

    Rank-sum (Mann–Whitney U) formula with mid-ranks for ties, where each case counts
    with its multiplicity: AUC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg).
    Returns NaN for resamples that lack one of the classes.
    """
    order = np.argsort(p, kind="mergesort")
    p_sorted, y_sorted = p[order], y[order].astype(np.float64)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))[:, order]
    group_starts = np.flatnonzero(np.r_[True, p_sorted[1:] != p_sorted[:-1]])
    pos_per_group = np.add.reduceat(w * y_sorted, group_starts, axis=1)
    all_per_group = np.add.reduceat(w, group_starts, axis=1)
    cases_below = np.cumsum(all_per_group, axis=1) - all_per_group
    mid_rank = cases_below + (all_per_group + 1.0) / 2.0
    n_pos = pos_per_group.sum(axis=1)
    n_neg = all_per_group.sum(axis=1) - n_pos
    rank_sum_pos = (pos_per_group * mid_rank).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (rank_sum_pos - n_pos * (n_pos + 1.0) / 2.0) / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auc


# ----------------------------------------------------------------------------- bootstrap


def _resample_counts(rng: np.random.Generator, n_resamples: int, n: int) -> np.ndarray:
    """Multiplicity of each case in each resample (with replacement), shape [resamples, n]."""
    idx = rng.integers(0, n, size=(n_resamples, n))
    flat = (idx + (np.arange(n_resamples) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=n_resamples * n).reshape(n_resamples, n).astype(np.float64)


class Resampling:
    """What a bootstrap draws: images, or patients with all their images (a cluster bootstrap).

    Images of one patient are correlated (same child, often the same day), so drawing images as if
    they were independent understates the spread: the unit drawn must be the patient."""

    def __init__(self, n: int, groups=None):
        if groups is None:
            self.cluster, self.n_units, self.unit = np.arange(n), n, "images"
        else:
            groups = np.asarray(groups).reshape(-1)
            if groups.size != n:
                raise ValueError(f"groups gives {groups.size} patient ids for {n} cases")
            _, self.cluster = np.unique(groups, return_inverse=True)
            self.n_units, self.unit = int(self.cluster.max()) + 1, "patients"

    def counts(self, rng: np.random.Generator, n_resamples: int) -> np.ndarray:
        """Multiplicity of each case in each resample, shape [resamples, cases]."""
        return _resample_counts(rng, n_resamples, self.n_units)[:, self.cluster]

    def describe(self) -> str:
        return f"{self.unit} (n={self.n_units})"


def _chunks(resampling: Resampling, n_cases: int, n_boot: int, seed: int):
    """Count matrices of all n_boot resamples, a memory-bounded chunk at a time."""
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOT_CELLS_PER_CHUNK // n_cases)
    for start in range(0, n_boot, chunk):
        yield resampling.counts(rng, min(chunk, n_boot - start))


def _rechosen_thresholds(y, p, counts, rechoose) -> np.ndarray:
    """rechoose(y, p) on each resample (NaN where the resample lacks a class)."""
    out = np.full(counts.shape[0], np.nan)
    for b, row in enumerate(counts.astype(np.int64)):
        idx = np.repeat(np.arange(y.size), row)
        if _has_both_classes(y[idx]):
            out[b] = float(rechoose(y[idx], p[idx]))
    return out


def _bootstrap_metric_samples(y, p, threshold, counts, metrics) -> dict[str, np.ndarray]:
    """Metric values for each resample described by a count matrix; `threshold` is a number, or one
    per resample (NaN: no threshold, the resample's threshold metrics are NaN)."""
    t = np.asarray(threshold, dtype=np.float64)
    pred = p[None, :] >= (t[:, None] if t.ndim else t)
    is_pos = y == 1
    tp = (counts * (pred & is_pos)).sum(axis=1)
    fp = (counts * (pred & ~is_pos)).sum(axis=1)
    fn = (counts * (~pred & is_pos)).sum(axis=1)
    tn = (counts * (~pred & ~is_pos)).sum(axis=1)
    values = _rates_from_counts(tp, fp, fn, tn)
    if t.ndim:
        values = {m: np.where(np.isnan(t), np.nan, v) for m, v in values.items()}
    if "auc" in metrics:
        values["auc"] = weighted_rank_auc(y, p, counts)
    return {m: values[m] for m in metrics}


def bootstrap_ci(
    y,
    p,
    threshold: float = 0.5,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    metrics=DEFAULT_CI_METRICS,
    groups=None,
    rechoose=None,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CIs at `level` (0.95: the 2.5 and 97.5 percentiles), to show how much each
    metric could move with other cases.

    `groups` (a patient id per case) makes it a cluster bootstrap: patients are drawn with
    replacement and bring all their images. `rechoose(y, p) -> threshold`, when the threshold was
    chosen on these same cases, chooses it again in every resample, so the threshold metrics' CIs
    include the threshold's own uncertainty (AUC does not depend on it).

    Resamples where AUC is undefined (one class only) are skipped for AUC, and skipped for the
    threshold metrics too when `rechoose` has nothing to choose on; otherwise the 0.0-when-undefined
    convention of ``binary_metrics`` applies. A metric with no usable resample gets ``(None, None)``.
    """
    y, p = _as_labels_and_probs(y, p)
    unknown = set(metrics) - set(DEFAULT_CI_METRICS)
    if unknown:
        raise ValueError(f"unknown metrics: {sorted(unknown)}")
    if n_boot < 1 or not 0.0 < level < 1.0:
        raise ValueError("need n_boot >= 1 and 0 < level < 1")
    samples: dict[str, list[np.ndarray]] = {m: [] for m in metrics}
    for counts in _chunks(Resampling(y.size, groups), y.size, n_boot, seed):
        t = threshold if rechoose is None else _rechosen_thresholds(y, p, counts, rechoose)
        for m, v in _bootstrap_metric_samples(y, p, t, counts, metrics).items():
            samples[m].append(v)
    return {m: _percentile_interval(np.concatenate(v), level) for m, v in samples.items()}


def paired_auc_difference(y, p_a, p_b, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                          groups=None) -> tuple[float, float | None, float | None]:
    """AUC(p_b) - AUC(p_a) on the same cases, with its paired percentile bootstrap CI (both models
    scored on each resample, so what the cases share cancels out); `groups` as in bootstrap_ci."""
    y, p_a = _as_labels_and_probs(y, p_a)
    _, p_b = _as_labels_and_probs(y, p_b)
    diffs = np.concatenate([weighted_rank_auc(y, p_b, c) - weighted_rank_auc(y, p_a, c)
                            for c in _chunks(Resampling(y.size, groups), y.size, n_boot, seed)])
    return (rank_auc(y, p_b) - rank_auc(y, p_a), *_percentile_interval(diffs, level))


def pooled_auc_difference(y, pairs, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                          groups=None) -> tuple[float, float | None, float | None]:
    """The mean over `pairs` [(p_a, p_b), ...] (e.g. one per training seed) of AUC(p_b) - AUC(p_a) on the same
    cases, with its percentile bootstrap CI: every pair is scored on the same resample of the cases (patients with
    `groups`), so the interval holds the seeds' spread and the cases' together. One pair: paired_auc_difference."""
    y = np.asarray(y)
    pairs = [(_as_labels_and_probs(y, a)[1], _as_labels_and_probs(y, b)[1]) for a, b in pairs]
    if not pairs:
        raise ValueError("pooled_auc_difference needs at least one (p_a, p_b) pair")
    diffs = np.concatenate([np.mean([weighted_rank_auc(y, b, c) - weighted_rank_auc(y, a, c) for a, b in pairs],
                                    axis=0)
                            for c in _chunks(Resampling(y.size, groups), y.size, n_boot, seed)])
    point = float(np.mean([rank_auc(y, b) - rank_auc(y, a) for a, b in pairs]))
    return (point, *_percentile_interval(diffs, level))


def _percentile_interval(values: np.ndarray, level: float) -> tuple:
    """The central `level` interval of the finite bootstrap values (0.95: 2.5 and 97.5 percentiles)."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (None, None)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(values, [tail, 1.0 - tail])
    return (float(lo), float(hi))


def report(y, p, threshold: float, n_boot: int = 1000, seed: int = 0, groups=None, rechoose=None) -> dict:
    """Evaluation-report block: metrics at the chosen threshold with 95% CIs (and at 0.5).

    `groups` and `rechoose` as in bootstrap_ci. The block records what its CIs resampled
    ("resampled": "patients (n=420)" or "images (n=786)") and whether the threshold was held fixed."""
    level = 0.95
    out = _metrics_with_ci(y, p, threshold, n_boot, seed, level, groups, rechoose)
    out["ci_level"] = level
    if float(threshold) != 0.5:
        out["at_0.5"] = _metrics_with_ci(y, p, 0.5, n_boot, seed, level, groups, None)
    return out


def _metrics_with_ci(y, p, threshold, n_boot, seed, level, groups, rechoose) -> dict:
    """binary_metrics plus a JSON-friendly "ci" mapping of [lo, hi] lists and how they were drawn."""
    out = binary_metrics(y, p, threshold)
    ci = bootstrap_ci(y, p, threshold=threshold, n_boot=n_boot, level=level, seed=seed, groups=groups,
                      rechoose=rechoose)
    out["ci"] = {m: [lo, hi] for m, (lo, hi) in ci.items()}
    out["n_boot"] = int(n_boot)
    out["resampled"] = Resampling(out["n"], groups).describe()
    out["threshold_in_bootstrap"] = (f"re-chosen in each resample ({getattr(rechoose, '__name__', 'rechoose')})"
                                     if rechoose is not None else "fixed")
    return out


# ----------------------------------------------------------------------------- thresholds / ROC


def _roc(y, p, drop_intermediate: bool):
    """roc_curve with labels checked and thresholds clipped into [0, 1] (first one is inf)."""
    y, p = _as_labels_and_probs(y, p)
    if not _has_both_classes(y):
        raise ValueError("ROC needs both classes in y")
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=drop_intermediate)
    return fpr, tpr, np.clip(thresholds, 0.0, 1.0)


def choose_threshold(y, p, method: str = "youden", min_sensitivity: float = 0.95) -> float:
    """Pick the operating point on validation data, never on the test set.

    "youden": maximise sensitivity + specificity - 1; ties go to the threshold closest to 0.5.
    "sensitivity": the highest threshold whose sensitivity is >= min_sensitivity.

    The threshold returned lies midway between the two neighbouring scores where the decisions
    change, never on a case's own score: a case scored exactly at the threshold flips with any
    rounding of its score (float16 weights, another machine), and the decisions on these cases are
    the same anywhere in between.
    """
    fpr, tpr, thresholds = _roc(y, p, drop_intermediate=False)
    # thresholds[k] is a distinct score (thresholds[0] stands for "none positive"); the same decisions
    # hold for any threshold above the next lower score (0 below the lowest)
    midpoints = (thresholds + np.r_[thresholds[1:], 0.0]) / 2.0
    if method == "youden":
        j = tpr - fpr
        best = np.flatnonzero(j >= j.max() - 1e-12)
        return float(midpoints[best[np.argmin(np.abs(midpoints[best] - 0.5))]])
    if method == "sensitivity":
        if not 0.0 <= min_sensitivity <= 1.0:
            raise ValueError("min_sensitivity must be in [0, 1]")
        # thresholds decrease along the curve, so the first hit is the highest threshold
        return float(midpoints[np.flatnonzero(tpr >= min_sensitivity - 1e-12)[0]])
    raise ValueError(f"unknown method {method!r}; use 'youden' or 'sensitivity'")


def threshold_chooser(rule: str = "youden", min_sensitivity: float = 0.95):
    """The function (y, p) -> threshold that a threshold rule (Config.threshold_rule) applies, or None
    for a rule that takes nothing from the data ("calibrated-0.5"). Export chooses with it and the
    bootstraps re-choose with it (`rechoose`), so both apply the same rule."""
    if rule == "youden":
        return choose_threshold
    if rule == "sensitivity":
        def choose_for_sensitivity(y, p):
            return choose_threshold(y, p, "sensitivity", min_sensitivity)
        return choose_for_sensitivity
    if rule == "calibrated-0.5":
        return None
    raise ValueError(f"unknown threshold rule {rule!r}; use youden, sensitivity or calibrated-0.5")


def roc_points(y, p, max_points: int = 200) -> dict:
    """ROC curve for plotting, small and JSON-safe (no inf), endpoints kept."""
    if max_points < 2:
        raise ValueError("max_points must be >= 2 to keep both endpoints")
    fpr, tpr, thresholds = _roc(y, p, drop_intermediate=True)
    if fpr.size > max_points:
        keep = np.unique(np.round(np.linspace(0, fpr.size - 1, max_points)).astype(np.int64))
        fpr, tpr, thresholds = fpr[keep], tpr[keep], thresholds[keep]
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thresholds.tolist()}


# ----------------------------------------------------------------------------- calibration


def expected_calibration_error(y, p, n_bins: int = 15) -> float:
    """ECE (Guo et al. 2017): does the confidence of the predicted class match its accuracy?

    Confidence = max(p, 1 - p), prediction = p >= 0.5; equal-width bins (lo, hi] over [0, 1].
    """
    y, p = _as_labels_and_probs(y, p)
    confidence = np.maximum(p, 1.0 - p)
    correct = ((p >= 0.5).astype(np.int64) == y).astype(np.float64)
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    conf_sum = np.bincount(bins, weights=confidence, minlength=n_bins)
    correct_sum = np.bincount(bins, weights=correct, minlength=n_bins)
    return float(np.abs(correct_sum - conf_sum).sum() / y.size)


MIN_IMAGES_PER_BIN = 20  # calibration_bins: fewer bins for small splits, so a bin is not one or two images


def calibration_bins(n: int, most: int = 10) -> int:
    """Equal-width bins for a reliability diagram of n images: 10 from 200 images on, down to 2 (16 images:
    2 bins of about 8, instead of a zig-zag through ten bins of one or two)."""
    return int(min(most, max(2, n // MIN_IMAGES_PER_BIN)))


def calibration_curve(y, p, n_bins: int | None = None) -> dict:
    """Reliability-diagram data over equal-width bins of p (scikit-learn's calibration_curve, plus each
    bin's middle and count for the plot); empty bins are left out. n_bins None: calibration_bins(len(y))."""
    y, p = _as_labels_and_probs(y, p)
    n_bins = calibration_bins(y.size) if n_bins is None else n_bins
    fraction_positive, mean_predicted = sklearn_calibration_curve(y, p, n_bins=n_bins, strategy="uniform")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    count = np.bincount(np.searchsorted(edges[1:-1], p), minlength=n_bins)  # scikit-learn's bins, (lo, hi]
    filled = count > 0
    mids = (np.arange(n_bins) + 0.5) / n_bins
    return {
        "bin_mid": mids[filled].tolist(),
        "mean_predicted": mean_predicted.tolist(),
        "fraction_positive": fraction_positive.tolist(),
        "count": count[filled].astype(int).tolist(),
    }


def _as_two_class_logits(logits) -> np.ndarray:
    """Temperature scaling here is for the two-class head: [N, 2] logits."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] != 2:
        raise ValueError(f"expected logits of shape [N, 2], got {z.shape}")
    return z


def _temperature_nll(z: np.ndarray, y: np.ndarray, temperature: float) -> float:
    """Mean NLL of softmax(z / T), computed via the stable logit difference."""
    margin = (z[:, 1] - z[:, 0]) / temperature
    signed = np.where(y == 1, margin, -margin)
    return float(np.mean(np.logaddexp(0.0, -signed)))


def fit_temperature(logits, y) -> float:
    """Temperature T > 0 minimising validation NLL (Guo et al. 2017), for calibrated probabilities:
    scipy's bounded Brent search over log T in [-3, 3] (NLL is unimodal in log T); deterministic."""
    z = _as_two_class_logits(logits)
    y = np.asarray(y).reshape(-1).astype(np.int64)
    if y.shape[0] != z.shape[0]:
        raise ValueError("logits and y differ in length")
    best = minimize_scalar(lambda log_t: _temperature_nll(z, y, float(np.exp(log_t))), bounds=(-3.0, 3.0),
                           method="bounded", options={"xatol": 1e-9})
    return float(np.exp(best.x))


def softmax_pneumonia(logits, temperature: float = 1.0) -> np.ndarray:
    """p(pneumonia) = softmax(logits / T)[:, 1], for turning model outputs into probabilities."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    z = _as_two_class_logits(logits)
    margin = (z[:, 1] - z[:, 0]) / temperature
    return np.exp(-np.logaddexp(0.0, -margin))
