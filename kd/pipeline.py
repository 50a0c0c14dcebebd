"""The phases of a run, in order: SSL-pretrain the teacher, fine-tune it, distil the student (and the
labels-only student of the ablation), then export safetensors and the model card.

Each phase writes `<out>/<phase>/done.json` when it finishes, so `--resume` skips finished phases
and continues an interrupted one from its last epoch.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from kd import distributed, locks, metrics
from kd.augment import center
from kd.cache import ImageSet, build_cache
from kd.checkpoint import load_weights, save_weights, write_json_atomic
from kd.config import Config
from kd.data import describe, list_unlabeled, load_splits
from kd.evaluate import model_report, predict_logits
from kd.model_card import CARD_FILE, base_card, data_fingerprint
from kd.models import (ARCHITECTURES, build, build_student, build_teacher, count_parameters, init_from_file,
                       seed_student_from_teacher)
from kd.objectives import (DistillationObjective, SSLObjective, SupervisedObjective, ValContext, cache_teacher_logits,
                           class_weights)
from kd.progress import Reporter
from kd.train import fit

PIPELINE = ("pretrain", "finetune", "distill", "baseline")
PHASE_OUTPUT = {"pretrain": "teacher", "finetune": "teacher", "distill": "student", "baseline": "student"}


class PhaseOrderError(RuntimeError):
    """A phase was asked for before the phase it builds on produced its weights."""


class RunData:
    """The splits of a run and their decoded-image caches (built once by rank 0, shared by all)."""

    def __init__(self, cfg: Config, dist: distributed.Dist, progress: bool = True):
        self.cfg, self.dist, self.progress = cfg, dist, progress
        self.splits = load_splits(cfg.data, cfg.val_fraction, cfg.seed)
        self.unlabeled = list_unlabeled(cfg.unlabeled) if cfg.unlabeled else []
        self.skipped: dict[str, str] = {}

    def image_set(self, split: str, size: int, with_unlabeled: bool = False) -> ImageSet:
        samples = self.splits[split]
        paths = [s.path for s in samples] + (self.unlabeled if with_unlabeled else [])
        labels = [s.label for s in samples] + ([-1] * len(self.unlabeled) if with_unlabeled else [])
        if self.dist.is_main:
            build_cache(paths, size, self.cfg.resolved_cache_dir(), self.progress)
        distributed.barrier()
        cache = build_cache(paths, size, self.cfg.resolved_cache_dir(), progress=False)
        self.skipped.update(cache.errors)
        return ImageSet.from_cache(cache, labels)


def _load(arch_role: str, path: Path) -> torch.nn.Module:
    if not path.exists():
        raise PhaseOrderError(f"{path} is missing: run the phase that produces it first.")
    return load_weights(build(ARCHITECTURES[arch_role]), path)


def run_phase(name: str, cfg: Config, data: RunData, out: Path, reporter: Reporter, device: torch.device,
              dist: distributed.Dist, resume: bool) -> dict:
    phase_dir, phase = out / name, cfg.phase(name)
    done_path = phase_dir / "done.json"
    if done_path.exists():
        return json.loads(done_path.read_text())
    prep_s = 0.0  # work before the first epoch that belongs to the phase's cost (caching teacher logits)
    train = data.image_set("train", phase.image_size, with_unlabeled=name == "pretrain")
    ctx = ValContext(data.image_set("val", phase.image_size), train, device, batch_size=max(phase.batch_size, 64),
                     knn_k=cfg.knn_k, max_knn_bank=cfg.max_knn_bank)
    weights = class_weights(train.class_counts())
    if name == "pretrain":
        teacher = build_teacher()
        if cfg.init:
            init_from_file(teacher, cfg.init)
        objective = SSLObjective(teacher, cfg.ssl_method, phase.image_size, distributed=dist.enabled)
    elif name == "finetune":
        teacher = build_teacher()
        pretrained = out / "pretrain" / "teacher.safetensors"
        if pretrained.exists():
            load_weights(teacher, pretrained)
        elif cfg.init:
            init_from_file(teacher, cfg.init)
        objective = SupervisedObjective(teacher, "teacher", phase.image_size, weights)
    else:
        teacher = _load("teacher", out / "finetune" / "teacher.safetensors")
        objective, train, prep_s = student_objective(name, cfg, teacher, train, weights, device, reporter)
    reporter.log("phase_start", phase=name, epochs=phase.epochs, image_size=phase.image_size,
                 train_images=len(train), val_images=len(ctx.val))
    history = fit(objective, train, phase, ctx, phase_dir, reporter, name, seed=cfg.seed, grad_clip=cfg.grad_clip,
                  resume=resume, dist=dist)
    last = {k: v for k, v in (history[-1] if history else {}).items() if k not in ("epoch", "seconds")}
    result = {"phase": name, "seconds": prep_s + sum(h["seconds"] for h in history), "prep_seconds": prep_s,
              "metrics": last, "history": history,
              "image_size": phase.image_size, "epochs": phase.epochs, "train_images": len(train)}
    if dist.is_main:
        for role, model in objective.exported().items():
            save_weights(model, phase_dir / f"{role}.safetensors")
        write_json_atomic(done_path, result)
    distributed.barrier()
    return result


def student_objective(name: str, cfg: Config, teacher: torch.nn.Module, train: ImageSet, class_weight: torch.Tensor,
                      device: torch.device, reporter: Reporter | None = None):
    """A new student (stem copied from the teacher) and its objective for phase `name` (distill, or the
    labels-only baseline), with the training set it sees: under cfg.teacher_targets == "cached" that set
    carries the teacher's logits, computed here. Returns (objective, train, seconds spent caching)."""
    phase = cfg.phase(name)
    student = build_student()
    seed_student_from_teacher(student, teacher)
    if name != "distill":  # the ablation: same student, same budget, labels only
        return SupervisedObjective(student, "student", phase.image_size, class_weight), train, 0.0
    objective = DistillationObjective(student, teacher, phase.image_size, class_weight, cfg.temperature, cfg.alpha,
                                      cfg.hint_weight)
    if cfg.teacher_targets != "cached":
        return objective, train, 0.0
    if reporter is not None:
        reporter.log("teacher_targets", phase=name, images=len(train))
    t0 = time.time()
    train = cache_teacher_logits(teacher, train, phase.image_size, device, max(phase.batch_size, 64))
    return objective, train, time.time() - t0


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


def export(cfg: Config, data: RunData, out: Path, device: torch.device, reporter: Reporter) -> dict:
    """Choose thresholds and temperatures on validation, write weights + model card."""
    size = cfg.eval_image_size
    val = data.image_set("val", size)
    card = base_card(size)
    # role -> the phase that trained it (its weights file and its training resolution)
    sources = {"teacher": "finetune", "student": "distill", "student_baseline": "baseline"}
    official = data.image_set("official-val", size) if "official-val" in data.splits else None
    train_at_size = None
    for role, phase_name in sources.items():
        path = out / phase_name / f"{PHASE_OUTPUT[phase_name]}.safetensors"
        trained_px = cfg.phase(phase_name).image_size
        if not path.exists():
            continue
        reporter.log("export", phase="export", model=role)
        model = _load("student" if role.startswith("student") else "teacher", path).to(device)
        recalibrated = None
        if trained_px != size:
            train_at_size = train_at_size or data.image_set("train", size)
            recalibrated = {"from_px": trained_px, "to_px": size,
                            "train_images": recalibrate_batchnorm(model, train_at_size, size, device)}
        logits = predict_logits(model, val, size, device)
        p = metrics.softmax_pneumonia(logits)
        threshold = metrics.choose_threshold(val.labels, p) if len(set(val.labels.tolist())) == 2 else 0.5
        temperature = metrics.fit_temperature(logits, val.labels)
        entry = {
            "architecture": ARCHITECTURES["student" if role.startswith("student") else "teacher"],
            "file": f"{role}.safetensors", "threshold": threshold, "threshold_rule": "Youden's J on validation",
            "temperature": temperature, "parameters": count_parameters(model),
            "batchnorm_recalibrated": recalibrated,
            "cpu_ms_per_image": cpu_latency_ms(model, size),
            "validation": model_report(val.labels, logits, threshold, temperature, seed=cfg.seed),
        }
        if official is not None and len(official):
            off = metrics.softmax_pneumonia(predict_logits(model.to(device), official, size, device))
            entry["official_val_sanity_check"] = metrics.binary_metrics(official.labels, off, threshold)
        card["models"][role] = entry
        save_weights(model, out / entry["file"], fp16=cfg.fp16_weights, metadata={"role": role})
    phases = {}
    for name in PIPELINE:
        done = out / name / "done.json"
        if done.exists():
            phases[name] = json.loads(done.read_text())
    card["phases"] = phases
    card["wall_time_s"] = {name: ph["seconds"] for name, ph in phases.items()}
    card["wall_time_s"]["total"] = sum(card["wall_time_s"].values())
    card["metrics_split"] = (f"patient-level validation split carved from train/ (val_fraction={cfg.val_fraction}, "
                             f"seed={cfg.seed}); thresholds were chosen on the same split, so its metrics at the "
                             "chosen threshold are optimistic")
    card["data"] = {"fingerprint": data_fingerprint(data.splits["train"] + data.splits["val"]),
                    **{split: describe(samples) for split, samples in data.splits.items() if split != "test"},
                    "unlabeled_images": len(data.unlabeled), "skipped_unreadable": len(data.skipped)}
    if "pretrain" in phases:
        card["ssl_knn_probe"] = phases["pretrain"].get("metrics", {})
    card["config"] = cfg.to_dict()
    write_json_atomic(out / CARD_FILE, card)
    return card


def run(cfg: Config, phases: tuple[str, ...] = PIPELINE, resume: bool = False, progress: bool = True) -> dict | None:
    """Run the given phases (finished ones are skipped) and export; returns the model card (rank 0)."""
    cfg.validate()
    out = Path(cfg.out)
    device = distributed.resolve_device(cfg.device)
    dist = distributed.setup(device)
    # one run per folder, whoever started it (CLI, app job, torchrun): a second is refused before it writes
    run_lock = locks.run_folder(out) if dist.is_main else None
    reporter = Reporter(out, enabled=dist.is_main)
    try:
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            cfg.save(out / "config.json")
        torch.manual_seed(cfg.seed)
        if not cfg.baseline:
            phases = tuple(p for p in phases if p != "baseline")
        reporter.update(state="running", phases=list(phases), started=time.time(), device=str(device),
                        world_size=dist.world_size, error=None)
        data = RunData(cfg, dist, progress)
        if dist.is_main:
            write_json_atomic(out / "split.json", {name: {"patients": sorted({s.patient for s in ss}),
                                                          **describe(ss)} for name, ss in data.splits.items()})
        for name in phases:
            run_phase(name, cfg, data, out, reporter, device, dist, resume)
        card = None
        if dist.is_main and any((out / p / "done.json").exists() for p in ("finetune", "distill")):
            card = export(cfg, data, out, device, reporter)
        reporter.update(state="finished", finished=time.time())
        reporter.log("finished", phase="done")
        return card
    except BaseException as e:
        try:  # best effort: on a full disk this write fails too, and must not hide the error that matters
            reporter.update(state="failed" if not isinstance(e, KeyboardInterrupt) else "stopped", error=str(e))
        except Exception:
            pass  # status.json still says running; with the folder's lock released, kd.jobs reads it as failed
        raise
    finally:
        distributed.cleanup()
        if run_lock is not None:
            run_lock.release()
