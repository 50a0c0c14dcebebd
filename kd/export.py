"""Export of a finished run: the weights as shipped and their model card.

For each trained model: BatchNorm statistics re-estimated at the serving resolution when it was trained
at another, the weights saved (float16 by default), the calibration temperature and the decision
threshold chosen on validation (patient-level halves, so the threshold is never chosen on the images
that calibrated it), the CPU latency, and the reports on validation and, as the external check, on the
dataset's test split. `kd.pipeline.run` calls `export` after the phases.
"""
from __future__ import annotations

import statistics
import time
import zlib
from pathlib import Path
import numpy as np
import torch

from kd import metrics
from kd.augment import center
from kd.cache import ImageSet
from kd.checkpoint import load_weights, save_weights, write_json_atomic
from kd.config import THRESHOLD_RULES, Config
from kd.data import describe, unlabeled_provenance
from kd.evaluate import model_report
from kd.scoring import predict_logits
from kd.model_card import base_card, data_fingerprint, write_card, write_split_hashes
from kd.models import ARCHITECTURES, build, count_parameters
from kd.progress import Reporter
from kd.run_data import RunData

# role in the model card -> (the phase that trained it, the model that phase writes)
SOURCES = {"teacher": ("finetune", "teacher"), "student": ("distill", "student"),
           "student_baseline": ("baseline", "student")}


def _load(role: str, path: Path) -> torch.nn.Module:
    return load_weights(build(ARCHITECTURES["student" if role.startswith("student") else "teacher"]), path)


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, images: ImageSet, size: int, device: torch.device,
                          max_images: int = 1024, batch_size: int = 64) -> int:
    """Re-estimate BatchNorm statistics on training images at the inference resolution.

    Touvron et al., "Fixing the train-test resolution discrepancy" (NeurIPS 2019): a network trained at
    a lower resolution sees other activation statistics at a higher one; refreshing the BN statistics (not
    the weights) on training images at test resolution recovers most of the gap. Returns images used."""
    index = np.linspace(0, len(images) - 1, min(max_images, len(images))).astype(int)
    batches = (center(images.batch(index[i:i + batch_size], device)[0], size).contiguous(
        memory_format=torch.channels_last) for i in range(0, len(index), batch_size))
    torch.optim.swa_utils.update_bn(batches, model, device)
    model.eval()
    return len(index)


@torch.inference_mode()
def cpu_latency_ms(model: torch.nn.Module, size: int, repeats: int = 10) -> float:
    """Median CPU milliseconds per image at batch 1 (channels_last, inference mode)."""
    model = model.to("cpu").eval().to(memory_format=torch.channels_last)
    x = torch.zeros(1, 1, size, size).contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        model(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def calibration_halves(patients: list[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split validation images by patient into two halves: one fits the calibration temperature, the other
    chooses the threshold, so the threshold is never chosen on the data that calibrated it."""
    half = np.array([zlib.crc32(f"{seed}-{p}".encode()) % 2 for p in patients])
    return np.flatnonzero(half == 0), np.flatnonzero(half == 1)


def choose_operating_point(cfg: Config, labels: np.ndarray, logits: np.ndarray, patients: list[str],
                           rule: str | None = None) -> dict:
    """Calibration temperature (fitted on one patient half of validation) and the decision threshold on the
    calibrated probability (`rule`, default cfg.threshold_rule, chosen on the other half)."""
    rule_name = rule or cfg.threshold_rule
    fit_rows, pick_rows = calibration_halves(patients, cfg.seed)
    if min(len(fit_rows), len(pick_rows)) == 0 or len(set(labels[fit_rows].tolist())) < 2:
        fit_rows = pick_rows = np.arange(len(labels))  # too small to halve (tiny test data)
    temperature = metrics.fit_temperature(logits[fit_rows], labels[fit_rows])
    p = metrics.softmax_pneumonia(logits[pick_rows], temperature)
    y = labels[pick_rows]
    if rule_name == "calibrated-0.5" or len(set(y.tolist())) < 2:
        threshold, rule = 0.5, "0.5 on the calibrated probability"
    elif rule_name == "sensitivity":
        threshold = metrics.choose_threshold(y, p, "sensitivity", cfg.min_sensitivity)
        rule = f"highest threshold with sensitivity >= {cfg.min_sensitivity} on the threshold half of validation"
    else:
        threshold, rule = metrics.choose_threshold(y, p), "Youden's J on the threshold half of validation"
    return {"threshold": threshold, "threshold_rule": rule, "calibration_temperature": temperature,
            "calibration": (f"temperature fitted on {len(fit_rows)} validation images, threshold chosen on "
                            f"{len(pick_rows)} others (patient-level halves)")}


def compare_threshold_rules(cfg: Config, val: ImageSet, logits: np.ndarray, patients: list[str],
                            external: dict[str, ImageSet], ext_logits: dict[str, np.ndarray]) -> dict:
    """Each threshold rule's threshold (chosen on validation alone) and its metrics on every split, so the
    effect of the rule under the test split's other prevalence is on record; only cfg.threshold_rule is used."""
    table = {}
    for rule in THRESHOLD_RULES:
        point = choose_operating_point(cfg, val.labels, logits, patients, rule)
        row = {"threshold": point["threshold"]}
        for name, labels, z in [("validation", val.labels, logits)] + [(n, external[n].labels, ext_logits[n])
                                                                        for n in ext_logits]:
            p = metrics.softmax_pneumonia(z, point["calibration_temperature"])
            m = metrics.binary_metrics(labels, p, point["threshold"])
            row[name] = {k: m[k] for k in ("accuracy", "sensitivity", "specificity")}
        table[rule] = row
    return table


def export(cfg: Config, data: RunData, out: Path, device: torch.device, reporter: Reporter, phases: dict[str, dict],
           command: str | None = None) -> dict:
    """Choose thresholds and calibration on validation, write weights + model card; then report the
    official test split, when the dataset has one, as the external check (used for nothing else).
    `phases`: each finished phase's done.json (kd.pipeline.finished_phases), recorded in the card."""
    size = cfg.eval_image_size
    val = data.image_set("val", size, collective=False)
    val_patients = data.patients("val", val)
    card = base_card(size, cfg.contrast)
    external = {name: data.image_set(name, size, collective=False)
                for name in ("official-val", "test") if name in data.splits}
    train_at_size = None
    for role, (phase_name, phase_model) in SOURCES.items():
        path = out / phase_name / f"{phase_model}.safetensors"
        trained_px = cfg.phase(phase_name).image_size
        if not path.exists():
            continue
        reporter.log("export", phase="export", model=role)
        model = _load(role, path).to(device)
        recalibrated = None
        if trained_px != size:
            train_at_size = train_at_size or data.image_set("train", size, collective=False)
            recalibrated = {"from_px": trained_px, "to_px": size,
                            "train_images": recalibrate_batchnorm(model, train_at_size, size, device)}
        # score the weights as shipped (float16 when cfg.fp16_weights), so the card and `kd evaluate` agree
        save_weights(model, out / f"{role}.safetensors", fp16=cfg.fp16_weights, metadata={"role": role})
        model = _load(role, out / f"{role}.safetensors").to(device)
        logits = predict_logits(model, val, size, device)
        point = choose_operating_point(cfg, val.labels, logits, val_patients)
        chooser = metrics.threshold_chooser(cfg.threshold_rule, cfg.min_sensitivity)
        entry = {
            "architecture": ARCHITECTURES["student" if role.startswith("student") else "teacher"],
            "file": f"{role}.safetensors", **point, "parameters": count_parameters(model),
            "batchnorm_recalibrated": recalibrated,
            "cpu_ms_per_image": cpu_latency_ms(model, size),
            "validation": model_report(val.labels, logits, point["threshold"], point["calibration_temperature"],
                                       n_boot=cfg.bootstrap, seed=cfg.seed, groups=val_patients, rechoose=chooser),
        }
        model = model.to(device)
        ext_logits = {name: predict_logits(model, images, size, device) for name, images in external.items()
                      if len(images)}
        for name, z in ext_logits.items():
            key = "test" if name == "test" else "official_val_sanity_check"
            entry[key] = model_report(external[name].labels, z, point["threshold"], point["calibration_temperature"],
                                      n_boot=cfg.bootstrap, seed=cfg.seed, groups=data.patients(name, external[name]))
        entry["threshold_rules"] = compare_threshold_rules(cfg, val, logits, val_patients, external, ext_logits)
        card["models"][role] = entry
    card["phases"] = phases
    card["wall_time_s"] = {name: ph["seconds"] for name, ph in phases.items()}
    card["wall_time_s"]["total"] = sum(card["wall_time_s"].values())
    card["metrics_split"] = {
        "validation": (f"patient-level split carved from train/ (val_fraction={cfg.val_fraction}, split seed={cfg.split_seed}); "
                       "it picks epochs, calibration and thresholds, so its metrics are optimistic"),
        "test": ("the dataset's test/ folder (for Kermany: the official test split, other children and acquisition "
                 "period than train/): never trained on, never used for any choice; the external check"),
    }
    if "test" not in data.splits:  # said, not described: a dataset without test/ has no external check
        card["metrics_split"]["test"] = "none: the dataset has no test/ folder, so these weights have no external check"
    card["data"] = {"fingerprint": data_fingerprint(data.splits["train"] + data.splits["val"]),
                    **{split: describe(samples) for split, samples in data.splits.items()},
                    "unlabeled_images": len(data.unlabeled), "skipped_unreadable": len(data.skipped)}
    if data.unlabeled:
        labelled = len(data.splits["train"])  # done.json written before it counted unlabeled images: the excess

        def unlabeled_used(done: dict) -> int:
            return done.get("unlabeled_images", max(0, done.get("train_images", 0) - labelled))

        uses = [what for what, phase in (("SSL pretraining", "pretrain"), ("distillation's transfer set", "distill"))
                if phase in phases and unlabeled_used(phases[phase]) > 0 and phases[phase].get("epochs", 0) > 0]
        card["data"]["unlabeled"] = {
            "used_for": uses, "folders": unlabeled_provenance(cfg.unlabeled, data.unlabeled),
            "kept_apart": "no file byte-identical to a validation, official-val or test image (checked before "
                          "training; the run stops otherwise); never evaluated on",
        }
    if "pretrain" in phases:
        card["ssl_knn_probe"] = phases["pretrain"].get("metrics", {})
    card["config"] = cfg.to_dict()
    card["reproduce"] = command
    write_split_hashes(out, data.splits)
    return write_card(out, card).document
