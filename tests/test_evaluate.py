"""The model card's validation numbers and a recompute of the served weights on the same split are one
computation: the Evaluate page must never show two answers for the same models, split and thresholds."""
from __future__ import annotations

import pytest

from kd.evaluate import evaluate_weights
from kd.model_card import read_card

POINT = ("n", "n_positive", "confusion_matrix", "auc", "accuracy", "sensitivity", "specificity", "precision", "f1")


@pytest.fixture(scope="module")
def card_and_recompute(kd_tiny):
    card = read_card(kd_tiny.weights).document
    n_boot = card["models"]["teacher"]["validation"]["n_boot"]
    return card, evaluate_weights(kd_tiny.weights, kd_tiny.data, "val", n_boot=n_boot)


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_card_metrics_equal_a_recompute_on_val_at_the_same_threshold(card_and_recompute, role):
    card, result = card_and_recompute
    shown, again = card["models"][role]["validation"], result[role]
    assert again["threshold"] == shown["threshold"] == card["models"][role]["threshold"]
    for key in POINT:
        assert again[key] == pytest.approx(shown[key]), key
    decisions = [p >= again["threshold"] for p in again["probabilities"]]
    assert sum(decisions) == shown["confusion_matrix"]["tp"] + shown["confusion_matrix"]["fp"]


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_card_cis_equal_a_recompute_on_val_resampling_patients(card_and_recompute, role):
    card, result = card_and_recompute
    shown, again = card["models"][role]["validation"], result[role]
    assert again["resampled"].startswith("patients (n=")
    for key in ("resampled", "threshold_in_bootstrap"):
        assert shown[key] == again[key], key
    assert shown["ci"] == pytest.approx(again["ci"])
