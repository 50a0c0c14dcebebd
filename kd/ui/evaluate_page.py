"""The Evaluate page's logic: the teacher/student table from the model card or recomputed on a split
(remembered in the session), the threshold explorer, the disagreements, and faithfulness."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from kd import cam, metrics
from kd import data as kdata
from kd.checkpoint import CheckpointError
from kd.serving import ModelPair
from kd.model_card import split_overlap, split_rows
from kd.ui.data_page import SPLIT_HELP, split_samples
from kd.ui.served import ROLE_LABEL, ROLES

TABLE_METRICS = ("auc", "accuracy", "sensitivity", "specificity", "f1")
METRIC_NAMES = {"auc": "AUC", "accuracy": "Accuracy", "sensitivity": "Sensitivity", "specificity": "Specificity",
                "f1": "F1", "precision": "Precision"}
EVAL_KEY = "_kd_evaluations"
FAITH_KEY = "_kd_faithfulness"


def _fmt_ci(value, ci) -> str:
    if value is None:
        return "n/a"
    lo, hi = (ci or [None, None])[:2]
    return f"{value:.3f} ({lo:.3f}-{hi:.3f})" if lo is not None and hi is not None else f"{value:.3f}"


CARD_SPLITS = {"validation": "validation (patient-level split of train/: picks epochs and thresholds, optimistic)",
               "test": "test (the dataset's test/ folder: never used for any choice, the external check)"}


def card_splits(card: dict) -> list[str]:
    """The splits the model card reports for both models ("validation", and "test" when the data had one)."""
    return [s for s in CARD_SPLITS if all(card.get("models", {}).get(r, {}).get(s) for r in ROLES)]


def reports_from_card(card: dict, split: str = "validation") -> dict[str, dict]:
    return {role: card["models"][role].get(split) or {} for role in ROLES}


def card_summary_frame(card: dict) -> pd.DataFrame:
    """One row per model and split the card reports (model_card.split_rows): AUC with its 95% CI, accuracy,
    sensitivity and specificity at the card's threshold, and how many images."""
    return pd.DataFrame([{"model": ROLE_LABEL[r["role"]], "split": r["split"],
                          "AUC (95% CI)": _fmt_ci(r["auc"], [r["auc_low"], r["auc_high"]]),
                          **{METRIC_NAMES[m]: None if r[m] is None else round(float(r[m]), 3)
                             for m in ("accuracy", "sensitivity", "specificity")},
                          "threshold": round(float(r["threshold"]), 3), "images": r["n"]}
                         for r in split_rows(card, ROLES)])


def metrics_table(reports: dict[str, dict], card: dict) -> pd.DataFrame:
    """Rows: metrics with 95% CIs, threshold, parameters, CPU ms/image; columns: teacher, student."""
    rows = {METRIC_NAMES[m] + " (95% CI)": {ROLE_LABEL[r]: _fmt_ci(reports[r].get(m), reports[r].get("ci", {}).get(m))
                                           for r in ROLES} for m in TABLE_METRICS}
    rows["Threshold"] = {ROLE_LABEL[r]: f"{reports[r].get('threshold', card['models'][r].get('threshold', 0.5)):.3f}"
                         for r in ROLES}
    rows["Cases (pneumonia / normal)"] = {ROLE_LABEL[r]: f"{reports[r].get('n_positive', '?')} / "
                                          f"{reports[r].get('n_negative', '?')}" for r in ROLES}
    rows["Parameters"] = {ROLE_LABEL[r]: f"{card['models'][r].get('parameters', 0) / 1e6:.1f} M" for r in ROLES}
    rows["CPU ms / image, forward pass only"] = {ROLE_LABEL[r]: f"{card['models'][r].get('cpu_ms_per_image', float('nan')):.1f}"
                              for r in ROLES}
    rows["Architecture"] = {ROLE_LABEL[r]: str(card["models"][r].get("architecture", "")) for r in ROLES}
    return pd.DataFrame(rows).T


def ci_note(reports: dict[str, dict]) -> str:
    """What the 95% CIs resampled (patients or images) and whether the threshold was held fixed in them."""
    report = reports.get("teacher") or {}
    if not report.get("resampled"):
        return "95% bootstrap CIs."
    fixed = report.get("threshold_in_bootstrap", "fixed") == "fixed"
    return (f"95% bootstrap CIs ({report.get('n_boot', '?')} resamples of {report['resampled']}; threshold "
            f"{'held fixed' if fixed else 're-chosen in each resample, as it was chosen on this split'}).")


def card_caption(card: dict, split: str = "validation") -> str:
    thr = ", ".join(f"{ROLE_LABEL[r].lower()} {card['models'][r].get('threshold', 0.5):.3f}" for r in ROLES)
    described = card.get("metrics_split", "validation split")
    if isinstance(described, dict):  # one description per split the card reports
        described = described.get(split, split)
    rule = card["models"]["teacher"].get("threshold_rule", "Youden's J on validation")
    return (f"From the model card. Split: **{split}**, {described}. Thresholds ({rule}): {thr}. "
            f"{ci_note(reports_from_card(card, split))} CPU ms/image: one forward pass at batch 1, "
            f"{card.get('input', {}).get('size', '?')} px, when the weights were exported; a diagnosis also decodes "
            "the file, runs the refusal check and a backward pass for the heat map (Diagnose shows each step's time).")


def result_caption(result: dict) -> str:
    thr = ", ".join(f"{ROLE_LABEL[r].lower()} {result[r]['threshold']:.3f}" for r in ROLES)
    skipped = len(result.get("skipped_unreadable") or {})
    return (f"Recomputed on split **{result['split']}** ({SPLIT_HELP.get(result['split'], '')}) of `{result['data']}`: "
            f"{result['n']} images{f', {skipped} unreadable skipped' if skipped else ''}. Thresholds from the model "
            f"card: {thr}. {ci_note(result)}")


def overlap_notes(result: dict) -> list[tuple[str, str]]:
    """(kind, sentence) about what the evaluated images were to these weights, from the weights' own list of
    training and validation images (kd.model_card.split_overlap): figures on images a model learnt from say
    nothing about new patients, and validation chose its epochs and thresholds."""
    overlap, n = result.get("overlap"), result.get("n", 0)
    if overlap is None:
        return [("info", "These weights do not list the images they were trained on (exported before they did), so "
                         "whether these images were among them cannot be checked.")]
    notes = []
    if overlap["train"]:
        notes.append(("warning", f"{overlap['train']} of {overlap['n']} of these images are among the images these "
                                 "weights were trained on: their figures say nothing about new patients."))
    if overlap["val"]:
        notes.append(("info", f"{overlap['val']} of {overlap['n']} of these images are the weights' own validation "
                              "split, which chose their epochs, calibration and thresholds: optimistic figures."))
    if not notes and n:
        notes.append(("success", f"None of these {overlap['n']} images was used to train or select these weights."))
    return notes


NO_TEST_NOTE = ("This dataset has no test/ folder: no external check is possible here. Validation chose the "
                "thresholds, and the training split is what the models learnt from; only images of other children, "
                "never used for any choice, say how the models do on new patients.")


def default_card_split(card: dict, chosen_split: str | None) -> int:
    """Index of the model card's split that matches the split box (test -> test, val -> validation), else 0, so
    the page never opens on one split's figures under a box that names another."""
    splits = card_splits(card)
    wanted = {"test": "test", "val": "validation"}.get(chosen_split or "", "")
    return splits.index(wanted) if wanted in splits else 0


def evaluation_key(weights_dir: Path, root: Path, split: str) -> str:
    return f"{Path(weights_dir).resolve()}|{Path(root).resolve()}|{split}"


def evaluate_split(pair: ModelPair, root: Path, split: str, progress=None,
                   n_boot: int = 1000) -> tuple[dict | None, str | None]:
    """kd.evaluate on a split with the pair the pages already hold (not loaded again), remembered in the
    session: (result, None) or (None, a message)."""
    from kd.evaluate import evaluate_pair

    store = st.session_state.setdefault(EVAL_KEY, {})
    key = evaluation_key(pair.weights_dir, root, split)
    if key not in store:
        try:
            result = evaluate_pair(pair, root, split, n_boot=n_boot, progress=progress)
            result["overlap"] = split_overlap(pair.weights_dir, result["files"])
            store[key] = result
        except (kdata.DatasetError, CheckpointError, ValueError, RuntimeError) as e:
            return None, f"Could not evaluate on {split}: {e}"
    return store[key], None


def stored_evaluation(weights_dir: Path, root: Path | None, split: str) -> dict | None:
    if root is None:
        return None
    return st.session_state.get(EVAL_KEY, {}).get(evaluation_key(weights_dir, root, split))


def at_threshold(result: dict, threshold: float) -> dict[str, dict]:
    """binary_metrics of both models at one threshold, from the stored probabilities."""
    y = np.asarray(result["labels"])
    return {role: metrics.binary_metrics(y, np.asarray(result[role]["probabilities"]), threshold) for role in ROLES}


def threshold_table(at: dict[str, dict]) -> pd.DataFrame:
    rows = {}
    for key in ("sensitivity", "specificity", "accuracy", "precision", "f1"):
        rows[METRIC_NAMES[key]] = {ROLE_LABEL[r]: round(at[r][key], 3) for r in ROLES}
    for key in ("tp", "fn", "tn", "fp"):
        rows[key.upper()] = {ROLE_LABEL[r]: at[r]["confusion_matrix"][key] for r in ROLES}
    return pd.DataFrame(rows).T


def operating_points(at: dict[str, dict]) -> dict[str, tuple[float, float]]:
    return {r: (1 - at[r]["specificity"], at[r]["sensitivity"]) for r in ROLES}


def disagreement_frame(result: dict) -> pd.DataFrame:
    """Images where the two models disagree or at least one is wrong; disagreements first."""
    y = np.asarray(result["labels"])
    pt, ps = np.asarray(result["teacher"]["probabilities"]), np.asarray(result["student"]["probabilities"])
    dt, ds = (metrics.is_pneumonia(pt, result["teacher"]["threshold"]),
              metrics.is_pneumonia(ps, result["student"]["threshold"]))
    rows = []
    for i, path in enumerate(result["files"]):
        t_ok, s_ok = dt[i] == y[i], ds[i] == y[i]
        if t_ok and s_ok:
            continue
        if dt[i] != ds[i]:
            reason = f"disagree ({'teacher' if t_ok else 'student'} right)"
        else:
            reason = "both wrong"
        rows.append({"file": Path(path).name, "truth": kdata.CLASSES[y[i]], "teacher p": round(float(pt[i]), 3),
                     "student p": round(float(ps[i]), 3), "reason": reason, "path": path,
                     "_order": (0 if dt[i] != ds[i] else 1, -abs(float(pt[i] - ps[i])))})
    if not rows:
        return pd.DataFrame(columns=["file", "truth", "teacher p", "student p", "reason", "path"])
    rows.sort(key=lambda r: r.pop("_order"))
    return pd.DataFrame(rows)


def empty_maps_note(res: dict) -> str:
    empty = res["agreement"].get("empty_maps", 0)
    return f" {empty} of {res['n']} images had an empty map in a model and are left out of the means." if empty else ""


def faithfulness_frame(res: dict) -> pd.DataFrame:
    return pd.DataFrame({
        ROLE_LABEL[r]: {"ROAD (mean)": round(res["road"][r]["mean"], 4), "ROAD (sd)": round(res["road"][r]["std"], 4),
                        "images": res["n"]} for r in ROLES if r in res["road"]}).T


def stored_faithfulness(key: str) -> dict | None:
    return st.session_state.get(FAITH_KEY, {}).get(key)


def faithfulness_key(weights_dir: Path, root: Path, split: str, n: int, method: str) -> str:
    return f"{evaluation_key(weights_dir, root, split)}|{n}|{method}"


def compute_faithfulness(pair: ModelPair, root: Path, split: str, n: int, method: str, progress=None) -> dict:
    """kd.cam.faithfulness on a balanced sample of n images of a split, remembered in the session
    (stored_faithfulness(faithfulness_key(...)) gives it back)."""
    res = cam.faithfulness(pair, kdata.stratified_sample(split_samples(root, split), n), method, progress=progress)
    st.session_state.setdefault(FAITH_KEY, {})[faithfulness_key(pair.weights_dir, root, split, n, method)] = res
    return res


def page_count(rows: int, per_page: int) -> int:
    return max(1, -(-rows // max(1, int(per_page))))


def page_rows(frame: pd.DataFrame, page: int, per_page: int) -> pd.DataFrame:
    """Rows of page `page` (from 1) of `frame`, `per_page` at a time."""
    start = (int(page) - 1) * int(per_page)
    return frame.iloc[start:start + int(per_page)]
