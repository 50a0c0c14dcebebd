"""Tests for kd.metrics: agreement with scikit-learn, bootstrap behaviour, thresholds, calibration."""

import json
import math

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from kd import metrics as M

# Fixed toy set with tied scores, including ties across the classes and at thresholds.
Y_FIXED = np.array([0, 0, 1, 1, 0, 1, 0, 1, 1, 0, 1, 0, 0, 1])
P_FIXED = np.array([0.1, 0.4, 0.35, 0.8, 0.5, 0.5, 0.7, 0.9, 0.5, 0.2, 0.6, 0.4, 0.05, 0.3])


def _sigmoid_scores(rng, n, separation=1.0):
    """Noisy but informative probabilities with many ties (rounded to 2 decimals)."""
    y = (rng.random(n) < 0.6).astype(int)
    p = 1.0 / (1.0 + np.exp(-(separation * (2 * y - 1) + rng.normal(size=n))))
    return y, np.round(p, 2)


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.4, 0.5, 0.55, 0.9, 1.0])
def test_binary_metrics_match_sklearn(threshold):
    m = M.binary_metrics(Y_FIXED, P_FIXED, threshold)
    pred = (P_FIXED >= threshold).astype(int)
    assert m["auc"] == pytest.approx(roc_auc_score(Y_FIXED, P_FIXED))
    assert m["accuracy"] == pytest.approx(accuracy_score(Y_FIXED, pred))
    assert m["sensitivity"] == pytest.approx(recall_score(Y_FIXED, pred, zero_division=0))
    assert m["specificity"] == pytest.approx(recall_score(Y_FIXED, pred, pos_label=0, zero_division=0))
    assert m["precision"] == pytest.approx(precision_score(Y_FIXED, pred, zero_division=0))
    assert m["f1"] == pytest.approx(f1_score(Y_FIXED, pred, zero_division=0))
    tn, fp, fn, tp = confusion_matrix(Y_FIXED, pred, labels=[0, 1]).ravel()
    assert m["confusion_matrix"] == {"tn": tn, "fp": fp, "fn": fn, "tp": tp}
    assert (m["threshold"], m["n"], m["n_positive"], m["n_negative"]) == (threshold, 14, 7, 7)


def test_binary_metrics_plain_json_types_and_undefined_cases():
    m = M.binary_metrics(Y_FIXED, P_FIXED, 0.5)
    json.dumps(m)
    assert all(type(m[k]) is float for k in ("auc", "accuracy", "sensitivity", "specificity", "precision", "f1"))
    assert all(type(v) is int for v in m["confusion_matrix"].values())

    only_negatives = M.binary_metrics([0, 0, 0], [0.1, 0.2, 0.3], 0.5)
    assert only_negatives["auc"] is None  # not NaN
    assert only_negatives["precision"] == 0.0 and only_negatives["f1"] == 0.0  # no predicted positives
    assert only_negatives["sensitivity"] == 0.0 and only_negatives["specificity"] == 1.0
    json.dumps(only_negatives)


def test_binary_metrics_rejects_bad_input():
    with pytest.raises(ValueError):
        M.binary_metrics([0, 1], [0.5])
    with pytest.raises(ValueError):
        M.binary_metrics([0, 2], [0.5, 0.5])


def test_rank_auc_equals_sklearn_with_ties():
    rng = np.random.default_rng(1)
    for n in (5, 37, 500):
        y, p = _sigmoid_scores(rng, n)
        y[:2] = [0, 1]
        assert M.rank_auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert M.rank_auc(Y_FIXED, P_FIXED) == pytest.approx(roc_auc_score(Y_FIXED, P_FIXED))


def test_weighted_rank_auc_equals_sklearn_on_explicit_resamples():
    """The bootstrap path (multiplicity weights) equals roc_auc_score on the resampled data."""
    rng = np.random.default_rng(2)
    y, p = _sigmoid_scores(rng, 60)
    idx = rng.integers(0, y.size, size=(8, y.size))
    counts = np.stack([np.bincount(row, minlength=y.size) for row in idx])
    got = M.weighted_rank_auc(y, p, counts)
    want = [roc_auc_score(y[row], p[row]) for row in idx]
    np.testing.assert_allclose(got, want, atol=1e-12)
    one_class = M.weighted_rank_auc(np.array([0, 1]), np.array([0.2, 0.7]), np.array([[2, 0]]))
    assert np.isnan(one_class[0])


def test_bootstrap_ci_deterministic_and_brackets_point_estimate():
    rng = np.random.default_rng(3)
    y, p = _sigmoid_scores(rng, 400)
    ci_a = M.bootstrap_ci(y, p, threshold=0.5, n_boot=300, seed=7)
    ci_b = M.bootstrap_ci(y, p, threshold=0.5, n_boot=300, seed=7)
    assert ci_a == ci_b
    assert ci_a != M.bootstrap_ci(y, p, threshold=0.5, n_boot=300, seed=8)
    point = M.binary_metrics(y, p, 0.5)
    assert set(ci_a) == {"auc", "accuracy", "sensitivity", "specificity", "precision", "f1"}
    for name, (lo, hi) in ci_a.items():
        assert lo <= point[name] <= hi, name
        assert hi - lo < 0.25, name


def test_bootstrap_ci_wider_for_smaller_n():
    rng = np.random.default_rng(4)
    y, p = _sigmoid_scores(rng, 2000)
    small = M.bootstrap_ci(y[:60], p[:60], n_boot=400, seed=0, metrics=("auc", "accuracy"))
    large = M.bootstrap_ci(y, p, n_boot=400, seed=0, metrics=("auc", "accuracy"))
    for name in ("auc", "accuracy"):
        assert small[name][1] - small[name][0] > 2 * (large[name][1] - large[name][0])


def test_bootstrap_ci_skips_single_class_resamples_for_auc():
    y = np.array([0, 0, 0, 0, 0, 0, 0, 1])  # many resamples have no positive
    p = np.linspace(0.1, 0.8, 8)
    ci = M.bootstrap_ci(y, p, n_boot=200, seed=0, metrics=("auc",))
    assert ci["auc"] == (1.0, 1.0)


def test_report_structure():
    rng = np.random.default_rng(6)
    y, p = _sigmoid_scores(rng, 200)
    r = M.report(y, p, threshold=0.42, n_boot=100, seed=0)
    json.dumps(r)
    assert r["threshold"] == 0.42 and r["ci_level"] == 0.95
    assert r["ci"]["auc"][0] <= r["auc"] <= r["ci"]["auc"][1]
    assert r["at_0.5"]["threshold"] == 0.5 and "ci" in r["at_0.5"]
    assert "at_0.5" not in M.report(y, p, threshold=0.5, n_boot=50)


def test_choose_threshold_youden_separates_toy_set():
    y = np.array([0, 0, 0, 0, 1, 1, 1])
    p = np.array([0.05, 0.2, 0.3, 0.35, 0.6, 0.7, 0.95])
    t = M.choose_threshold(y, p)
    assert 0.35 < t <= 0.6
    m = M.binary_metrics(y, p, t)
    assert m["sensitivity"] == 1.0 and m["specificity"] == 1.0


def test_choose_threshold_youden_tie_goes_closest_to_half():
    # calling only 0.6 positive, or everything above 0.1, both give J = 0.5; the first lies nearer 0.5
    y = np.array([0, 1, 0, 1])
    p = np.array([0.1, 0.2, 0.4, 0.6])
    t = M.choose_threshold(y, p)
    assert (p >= t).tolist() == [False, False, False, True]
    assert 0.4 < t < 0.6


@pytest.mark.parametrize("method", ["youden", "sensitivity"])
def test_a_chosen_threshold_survives_rounding_of_the_scores(method):
    """Float16 weights or another machine move every score a little: no decision on the cases the
    threshold was chosen on may change by less than half the gap between neighbouring scores."""
    rng = np.random.default_rng(12)
    for _ in range(20):
        y, p = _sigmoid_scores(rng, 40)
        y[:2] = [0, 1]
        t = M.choose_threshold(y, p, method)
        gaps = np.diff(np.unique(np.r_[p, 0.0]))
        for nudge in (-0.49, 0.49):
            moved = p + nudge * gaps.min()
            assert ((moved >= t) == (p >= t)).all()


def test_choose_threshold_sensitivity_mode_meets_minimum():
    rng = np.random.default_rng(8)
    y, p = _sigmoid_scores(rng, 500)
    for target in (0.8, 0.95, 0.99):
        t = M.choose_threshold(y, p, method="sensitivity", min_sensitivity=target)
        assert 0.0 <= t <= 1.0
        assert M.binary_metrics(y, p, t)["sensitivity"] >= target
        # highest such operating point: calling one more score negative falls below the target
        lowest_positive = p[p >= t].min()
        assert M.binary_metrics(y, p, np.nextafter(lowest_positive, 2.0))["sensitivity"] < target
    with pytest.raises(ValueError):
        M.choose_threshold(y, p, method="nope")


def test_roc_points_json_safe_bounded_and_keeps_endpoints():
    rng = np.random.default_rng(9)
    y = (rng.random(3000) < 0.5).astype(int)
    p = 1.0 / (1.0 + np.exp(-(y + rng.normal(size=y.size))))
    full = M.roc_points(y, p, max_points=10**6)
    pts = M.roc_points(y, p, max_points=50)
    text = json.dumps(pts)
    assert "Infinity" not in text and "NaN" not in text
    assert len(pts["fpr"]) == len(pts["tpr"]) == len(pts["thresholds"]) <= 50
    assert len(full["fpr"]) > 50
    for key in ("fpr", "tpr", "thresholds"):
        assert pts[key][0] == full[key][0] and pts[key][-1] == full[key][-1]
    assert (pts["fpr"][0], pts["tpr"][0]) == (0.0, 0.0)
    assert (pts["fpr"][-1], pts["tpr"][-1]) == (1.0, 1.0)
    assert all(0.0 <= t <= 1.0 for t in pts["thresholds"])


def test_ece_zero_for_perfectly_calibrated_bins():
    # 10 cases at p=0.8 with 8 positives; 10 cases at p=0.3 with 3 positives (confidence 0.7, 7 correct)
    y = np.array([1] * 8 + [0] * 2 + [1] * 3 + [0] * 7)
    p = np.array([0.8] * 10 + [0.3] * 10)
    assert M.expected_calibration_error(y, p) == pytest.approx(0.0, abs=1e-12)


def test_ece_matches_hand_computation():
    # 5 bins (0,.2] ... (.8,1]; confidences 0.9 | 0.75 0.7 0.65 | 0.55
    p = np.array([0.9, 0.75, 0.3, 0.65, 0.45])
    y = np.array([1, 0, 0, 0, 1])  # correct: 1, 0, 1, 0, 0
    # bin (.8,1]: |1 - 0.9| * 1; bin (.6,.8]: |1/3 - 0.7| * 3; bin (.4,.6]: |0 - 0.55| * 1
    expected = (0.1 + 1.1 + 0.55) / 5
    assert M.expected_calibration_error(y, p, n_bins=5) == pytest.approx(expected)


def test_calibration_curve_bins():
    p = np.array([0.05, 0.15, 0.12, 0.95, 1.0, 0.55])
    y = np.array([0, 1, 0, 1, 1, 0])
    c = M.calibration_curve(y, p, n_bins=10)
    json.dumps(c)
    assert c["bin_mid"] == pytest.approx([0.05, 0.15, 0.55, 0.95])
    assert c["count"] == [1, 2, 1, 2]
    assert c["mean_predicted"] == pytest.approx([0.05, 0.135, 0.55, 0.975])
    assert c["fraction_positive"] == pytest.approx([0.0, 0.5, 0.0, 1.0])


def _labels_from_logits(rng, z):
    return (rng.random(z.shape[0]) < M.softmax_pneumonia(z)).astype(int)


def test_fit_temperature_recovers_known_temperature():
    rng = np.random.default_rng(10)
    z = rng.normal(scale=2.0, size=(20000, 2))
    y = _labels_from_logits(rng, z)
    assert M.fit_temperature(3.0 * z, y) == pytest.approx(3.0, rel=0.08)
    assert M.fit_temperature(z, y) == pytest.approx(1.0, rel=0.08)
    assert M.fit_temperature(3.0 * z, y) == M.fit_temperature(3.0 * z, y)  # deterministic


def test_softmax_pneumonia():
    z = np.array([[0.0, 0.0], [1.0, 3.0], [1000.0, -1000.0], [-1000.0, 1000.0]])
    p = M.softmax_pneumonia(z)
    assert p[0] == pytest.approx(0.5)
    assert p[1] == pytest.approx(math.exp(3) / (math.exp(1) + math.exp(3)))
    assert p[2] == pytest.approx(0.0) and p[3] == pytest.approx(1.0)
    assert np.isfinite(p).all()
    assert M.softmax_pneumonia(z[:2], temperature=2.0)[1] == pytest.approx(1 / (1 + math.exp(-1)))
    with pytest.raises(ValueError):
        M.softmax_pneumonia(np.zeros((3, 3)))


def test_paired_auc_difference_cancels_what_the_cases_share():
    """Two models that differ on a few cases only: the paired CI of their AUC difference is far narrower
    than an unpaired comparison of their own CIs would be, it brackets the difference, and swapping the
    models mirrors it."""
    rng = np.random.default_rng(3)
    y, p_a = _sigmoid_scores(rng, 200)
    y[:2] = [0, 1]
    p_b = p_a.copy()
    positives = np.flatnonzero(y == 1)
    p_b[positives[np.argsort(p_a[positives])[:10]]] += 0.2  # b ranks the ten least suspected pneumonias higher
    diff, lo, hi = M.paired_auc_difference(y, p_a, p_b, n_boot=500, seed=7)
    assert diff == pytest.approx(roc_auc_score(y, p_b) - roc_auc_score(y, p_a)) and diff > 0
    assert 0 < lo <= diff <= hi
    own = [_width(M.bootstrap_ci(y, q, n_boot=500, seed=s, metrics=("auc",))["auc"]) for s, q in ((1, p_a), (2, p_b))]
    assert hi - lo < 0.5 * np.hypot(*own)  # the spread of the difference of two unpaired AUCs
    back, lo_back, hi_back = M.paired_auc_difference(y, p_b, p_a, n_boot=500, seed=7)
    assert (back, lo_back, hi_back) == pytest.approx((-diff, -hi, -lo))
    assert M.paired_auc_difference(y, p_a, p_a, n_boot=50) == (0.0, 0.0, 0.0)



def test_pooled_auc_difference_is_the_mean_over_seeds_on_shared_resamples():
    """Over several seeds' pairs: the point is the mean of the plain AUC differences (sklearn), one pair gives
    exactly paired_auc_difference, and each resample scores every pair on the same cases (so a seed that loses
    widens the interval by its own spread, not by case noise)."""
    rng = np.random.default_rng(5)
    y, p_a = _sigmoid_scores(rng, 200)
    y[:2] = [0, 1]
    positives = np.flatnonzero(y == 1)
    pairs = []
    for k, lift in enumerate((0.2, 0.1, 0.0)):
        p_b = p_a.copy()
        p_b[positives[np.argsort(p_a[positives])[:10 + k]]] += lift
        pairs.append((p_a, p_b))
    point, lo, hi = M.pooled_auc_difference(y, pairs, n_boot=500, seed=7)
    assert point == pytest.approx(np.mean([roc_auc_score(y, b) - roc_auc_score(y, a) for a, b in pairs]))
    assert lo <= point <= hi
    assert M.pooled_auc_difference(y, pairs[:1], n_boot=500, seed=7) == \
        pytest.approx(M.paired_auc_difference(y, *pairs[0], n_boot=500, seed=7))
    groups = np.repeat(np.arange(100), 2)  # patients of two images each
    assert M.pooled_auc_difference(y, pairs[:1], n_boot=300, seed=2, groups=groups) == \
        pytest.approx(M.paired_auc_difference(y, *pairs[0], n_boot=300, seed=2, groups=groups))
    with pytest.raises(ValueError, match="at least one"):
        M.pooled_auc_difference(y, [], n_boot=10)

def _patients(rng, n_patients, copies):
    """Per patient a label and a score; then each patient's image repeated `copies` times, shuffled."""
    ids = np.array([f"person{i:03d}" for i in range(n_patients)])
    y, p = _sigmoid_scores(rng, n_patients, separation=0.5)
    order = rng.permutation(n_patients * copies)
    return (y, p), (np.repeat(y, copies)[order], np.repeat(p, copies)[order], np.repeat(ids, copies)[order])


def _width(ci):
    return ci[1] - ci[0]


def test_patient_bootstrap_of_identical_copies_is_the_bootstrap_of_one_image_per_patient():
    """Three identical images per patient carry no more information than one: resampling patients
    gives the CIs of one image per patient; resampling images pretends to three times the data."""
    (y1, p1), (y, p, patients) = _patients(np.random.default_rng(5), 60, 3)
    one_each = M.bootstrap_ci(y1, p1, 0.5, n_boot=4000, seed=1)
    by_patient = M.bootstrap_ci(y, p, 0.5, n_boot=4000, seed=2, groups=patients)
    by_image = M.bootstrap_ci(y, p, 0.5, n_boot=4000, seed=2)
    for name in one_each:
        assert _width(by_patient[name]) == pytest.approx(_width(one_each[name]), rel=0.15), name
        assert by_patient[name] == pytest.approx(one_each[name], abs=0.03), name
        assert _width(by_image[name]) < 0.75 * _width(by_patient[name]), name


def test_patient_bootstrap_needs_one_id_per_image():
    with pytest.raises(ValueError, match="patient ids"):
        M.bootstrap_ci([0, 1, 1], [0.1, 0.8, 0.7], groups=["a", "b"])


def test_report_says_what_its_cis_resampled():
    _, (y, p, patients) = _patients(np.random.default_rng(6), 40, 2)
    by_patient = M.report(y, p, 0.4, n_boot=50, groups=patients)
    assert by_patient["resampled"] == "patients (n=40)" and by_patient["at_0.5"]["resampled"] == "patients (n=40)"
    assert by_patient["threshold_in_bootstrap"] == "fixed"
    assert M.report(y, p, 0.4, n_boot=50)["resampled"] == "images (n=80)"
    rechosen = M.report(y, p, 0.4, n_boot=50, groups=patients, rechoose=M.choose_threshold)
    assert rechosen["threshold_in_bootstrap"].startswith("re-chosen")
    assert rechosen["at_0.5"]["threshold_in_bootstrap"] == "fixed"  # 0.5 is not chosen on the data
    json.dumps(rechosen)


def test_rechoosing_the_threshold_carries_its_uncertainty_into_the_cis():
    """A Youden threshold chosen on weakly separated cases is unstable: re-chosen in each resample,
    sensitivity and specificity spread much wider than with the threshold held fixed; AUC, which
    has no threshold, is unchanged."""
    rng = np.random.default_rng(0)
    y = (rng.random(60) < 0.5).astype(int)
    p = np.round(1 / (1 + np.exp(-(0.6 * (2 * y - 1) + rng.normal(size=60)))), 3)
    t = M.choose_threshold(y, p)
    fixed = M.bootstrap_ci(y, p, t, n_boot=1000, seed=1)
    rechosen = M.bootstrap_ci(y, p, t, n_boot=1000, seed=1, rechoose=M.choose_threshold)
    assert rechosen["auc"] == fixed["auc"]
    for name in ("sensitivity", "specificity"):
        assert _width(rechosen[name]) > 1.3 * _width(fixed[name]), name


def test_threshold_chooser_follows_the_rule():
    y, p = Y_FIXED, P_FIXED
    assert M.threshold_chooser("youden")(y, p) == M.choose_threshold(y, p)
    assert M.threshold_chooser("sensitivity", 0.9)(y, p) == M.choose_threshold(y, p, "sensitivity", 0.9)
    assert M.threshold_chooser("calibrated-0.5") is None
    with pytest.raises(ValueError, match="threshold rule"):
        M.threshold_chooser("nope")
