"""Fitting what guards the served weights: the out-of-distribution refusal (kd.ood) and the framing warnings
(kd.framing), on the weights as exported and the run's own patient-level splits.

Without the refusal check nothing tells a chest X-ray from a photograph, and the models give a confident
probability for both, so every exported run carries one: `kd.pipeline.run` calls `fit_checks` right after the
export, and `python -m kd fit-ood` calls it on any weights folder (re-run it whenever the weights change).
"""
from __future__ import annotations

from pathlib import Path


def fit_checks(weights_dir: str | Path, data_root: str | Path, command: str = "",
               max_train: int | None = None) -> dict[str, dict]:
    """Fit both on `weights_dir` (its teacher, its card's split settings) and write their files and card
    sections; returns {"ood": section, "framing": section}."""
    from kd import framing, ood

    refusal = ood.fit(weights_dir, data_root, max_train=max_train, command=command)
    warnings = framing.fit_weights(weights_dir, data_root, command=command, max_train=max_train)
    return {ood.CARD_KEY: refusal, framing.CARD_KEY: warnings}
