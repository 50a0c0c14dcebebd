"""The phases of a run, in order: SSL-pretrain the teacher, fine-tune it, distil the student (and the
labels-only student of the ablation), then export safetensors and the model card (kd.export).

Each phase writes `<out>/<phase>/done.json` when it finishes, so `--resume` skips finished phases
and continues an interrupted one from its last epoch.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from kd import distributed, locks, statefile
from kd.augment import TTA_VIEWS, Augment
from kd.cache import ImageSet
from kd.checkpoint import load_weights, save_weights, write_json_atomic
from kd.config import NO_CORPUS, PHASES, PROBE, Config, PhaseConfig, builds_on
from kd.data import describe
from kd.export import export
from kd.models import (ARCHITECTURES, build, build_student, build_teacher, init_from_file,
                       seed_student_from_teacher)
from kd.objectives import (DistillationObjective, SSLObjective, SupervisedObjective, ValContext, cache_teacher_logits,
                           class_weights)
from kd.progress import Reporter
from kd.run_data import RunData
from kd.refusal_fit import fit_checks
from kd.runs import check_not_reserved
from kd.train import fit, phase_seed

PIPELINE = PHASES  # the phases of a run, in order (kd.config, with the commands that run them)


class PhaseOrderError(RuntimeError):
    """A phase was asked for before the phase it builds on produced its weights."""


PHASE_EXPORTS = {"pretrain": "teacher", "finetune": "teacher", "distill": "student", "baseline": "student"}
# what export and --resume use of a finished phase's done.json: a hand-edited or foreign one is refused up front
DONE_SHAPE = statefile.object_with({"seconds": statefile.NUMBER, "history": list, "epochs": int, "image_size": int},
                                   {"metrics": dict, "prep_seconds": statefile.NUMBER, "train_images": int})


def read_done(out: Path, name: str) -> dict | None:
    """The finished phase's record, None when it has not finished; PhaseOrderError naming the file when the
    record is unreadable, when the weights it vouches for are gone, or when it is not unusable otherwise."""
    phase_dir = out / name
    try:
        done = statefile.read_json(phase_dir / "done.json", DONE_SHAPE, default=None)
    except statefile.UnreadableState as e:
        raise PhaseOrderError(f"{e}: delete {phase_dir} to train the {name} phase again.") from None
    if done is not None and not (phase_dir / f"{PHASE_EXPORTS[name]}.safetensors").is_file():
        raise PhaseOrderError(f"{phase_dir / 'done.json'} says {name} finished, but "
                              f"{phase_dir / (PHASE_EXPORTS[name] + '.safetensors')} is missing: delete {phase_dir} "
                              "to train that phase again.")
    return done


def check_fresh_folder(out: Path, phases: tuple[str, ...]) -> None:
    """A run started without --resume must not find earlier output of the phases it runs: it would skip them and
    export the old weights under a card naming the new settings. Phases that build on earlier ones in the same
    folder (`kd distill` after `kd finetune`) still can."""
    found = [name for name in phases if (out / name).is_dir() and any((out / name).iterdir())]
    if found:
        raise PhaseOrderError(f"{out} already holds {', '.join(found)} output of an earlier run: continue that run "
                              "with --resume, or choose a new run folder (nothing was changed).")


def check_matches(done: dict, cfg: Config, name: str, out: Path) -> None:
    """A finished phase is reused only if it was trained with this run's budget for it."""
    phase = cfg.phase(name)
    if (done["epochs"], done["image_size"]) != (phase.epochs, phase.image_size):
        raise PhaseOrderError(f"{out / name} was trained for {done['epochs']} epochs at {done['image_size']} px, "
                              f"but this run's settings ask for {phase.epochs} at {phase.image_size} px: resume with "
                              f"the run's own settings, or delete {out / name} to train it again.")


def _load(arch_role: str, path: Path) -> torch.nn.Module:
    if not path.exists():
        raise PhaseOrderError(f"{path} is missing: run the phase that produces it first, or build on another run's "
                              "(--from-run RUN; on the Train page, \"Build on run\").")
    return load_weights(build(ARCHITECTURES[arch_role]), path)


# the settings that describe how each adoptable phase trained: they follow its weights into the run that adopts them
ADOPTED_SETTINGS = {"pretrain": ("pretrain", "ssl_method", "init", "pretrain_labelled"),
                    "finetune": ("finetune", "probe_epochs", "probe_lr")}


def phases_to_adopt(cfg: Config, phases: tuple[str, ...]) -> tuple[str, ...]:
    """With cfg.from_run: the finished phases of that run this one builds on, the ones before the first of `phases`
    (for finetune its pretraining; for distill its fine-tuned teacher and that teacher's pretraining, when it had
    one), after checking they can be: same preprocessing and validation split settings, the phase built on
    finished. Their settings replace this config's (ADOPTED_SETTINGS), so that the model card says how the adopted
    teacher was trained; the source's unlabeled folders too when this run names none (the card lists the corpus's
    licences). () without cfg.from_run; PhaseOrderError naming what does not fit."""
    if not cfg.from_run:
        return ()
    source, needed = Path(cfg.from_run), builds_on(phases)
    if needed is None:
        raise PhaseOrderError("--from-run builds on a run's pretrained or fine-tuned teacher: use it with finetune "
                              "or distill, not with a run's first phase (nothing was changed).")
    try:
        theirs = Config.load(source / "config.json")
    except ValueError as e:
        raise PhaseOrderError(f"cannot build on {source}: {e}") from None
    if read_done(source, needed) is None:
        raise PhaseOrderError(f"cannot build on {source}: its {needed} phase has not finished.")
    if theirs.contrast != cfg.contrast:
        raise PhaseOrderError(f"cannot build on {source}: its teacher saw contrast {theirs.contrast!r}, this run "
                              f"trains with {cfg.contrast!r} (choose the same preset or contrast).")
    if (theirs.split_seed, theirs.val_fraction) != (cfg.split_seed, cfg.val_fraction):
        raise PhaseOrderError(f"cannot build on {source}: it carved its validation split with split seed "
                              f"{theirs.split_seed} and fraction {theirs.val_fraction}, this run with {cfg.split_seed} "
                              f"and {cfg.val_fraction}; its teacher may have trained on this run's validation "
                              "patients (use the same --split-seed and --val-fraction).")
    adopted = tuple(p for p in PIPELINE[:PIPELINE.index(needed) + 1] if p == needed or read_done(source, p) is not None)
    for name in adopted:
        for key in ADOPTED_SETTINGS[name]:
            setattr(cfg, key, getattr(theirs, key))
    if "pretrain" in adopted and not cfg.unlabeled:
        cfg.unlabeled = list(theirs.unlabeled)
    return adopted


def adopt_phases(cfg: Config, out: Path, adopted: tuple[str, ...], val_patients: set[str]) -> None:
    """Copy the finished `adopted` phases of cfg.from_run into `out` (their weights and done.json, which records
    where they came from) unless `out` has them already (a resumed run), once the source's validation patients are
    known to be this run's: a teacher that trained on one of them would make validation's choices optimistic."""
    source = Path(cfg.from_run)
    try:
        split = statefile.read_json(source / "split.json")
        theirs = set(split["val"]["patients"])
    except (statefile.UnreadableState, KeyError, TypeError) as e:
        raise PhaseOrderError(f"cannot build on {source}: its split.json does not say its validation patients "
                              f"({e}).") from None
    if theirs != val_patients:
        raise PhaseOrderError(f"cannot build on {source}: its validation patients are not this run's (another "
                              f"dataset, or another split): its teacher may have trained on {len(val_patients - theirs)} "
                              "of this run's validation patients.")
    for name in adopted:
        if (own := read_done(out, name)) is not None:
            if own.get("from_run") != str(source.resolve()):
                raise PhaseOrderError(f"{out / name} holds a {name} phase of its own: --from-run would not replace it "
                                      "(choose a new run folder; nothing was changed).")
            continue  # adopted when the run started: a resumed run
        done = read_done(source, name)
        export = f"{PHASE_EXPORTS[name]}.safetensors"
        (out / name).mkdir(parents=True, exist_ok=True)
        save_weights(_load(PHASE_EXPORTS[name], source / name / export), out / name / export)  # a bad file: refused
        write_json_atomic(out / name / "done.json", {**done, "from_run": str(source.resolve())})


def run_phase(name: str, cfg: Config, data: RunData, out: Path, reporter: Reporter, device: torch.device,
              dist: distributed.Dist, resume: bool) -> dict:
    phase_dir, phase = out / name, cfg.phase(name)
    done_path = phase_dir / "done.json"
    done = read_done(out, name)
    if done is not None:
        check_matches(done, cfg, name, out)
        return done
    # each phase draws from its own (seed, phase) stream: a resumed run that skips finished phases
    # initialises this one exactly as the uninterrupted run did
    torch.manual_seed(phase_seed(cfg.seed, name, "init"))
    probe_history = None  # the linear probe's epochs, when fine-tuning opens with one
    prep_s = 0.0  # work before the first epoch that belongs to the phase's cost (caching teacher logits)
    with_unlabeled = name == "pretrain" or (name == "distill" and cfg.distill_unlabeled)  # never for labels alone
    train = data.image_set("train", phase.image_size, with_unlabeled=with_unlabeled)
    ctx = ValContext(data.image_set("val", phase.image_size), train, device, batch_size=max(phase.batch_size, 64),
                     knn_k=cfg.knn_k, max_knn_bank=cfg.max_knn_bank)
    weights = class_weights(train.class_counts())
    if name == "pretrain":
        teacher = build_teacher()
        if cfg.init:
            init_from_file(teacher, cfg.init)
        objective = SSLObjective(teacher, cfg.ssl_method, phase.image_size, distributed=dist.enabled)  # its backbone
        if not cfg.pretrain_labelled:  # the corpus alone; ctx keeps the labelled split as the kNN probe's bank
            train = train.unlabeled_only()
    elif name == "finetune":
        teacher = build_teacher()
        pretrained = out / "pretrain" / "teacher.safetensors"
        if read_done(out, "pretrain") is not None:  # refuses a finished pretraining whose weights are gone
            load_weights(teacher, pretrained)
        elif cfg.init:
            init_from_file(teacher, cfg.init)
        if cfg.probe_epochs:
            probe_history = probe_teacher(teacher, cfg, train, ctx, phase_dir, reporter, dist, resume, weights)
        objective = SupervisedObjective(teacher, "teacher", phase.image_size, weights,
                                        Augment.from_config(cfg.augment), cfg.label_smoothing).use_ema(cfg.ema_decay)
    else:
        teacher = _load("teacher", out / "finetune" / "teacher.safetensors")
        objective, train, prep_s = student_objective(name, cfg, teacher, train, weights, device, reporter)
    reporter.log("phase_start", phase=name, epochs=phase.epochs, image_size=phase.image_size,
                 train_images=len(train), val_images=len(ctx.val))
    history = fit(objective, train, phase, ctx, phase_dir, reporter, name, seed=cfg.seed, grad_clip=cfg.grad_clip,
                  resume=resume, dist=dist, bf16=cfg.cpu_bf16)
    last = {k: v for k, v in (history[-1] if history else {}).items() if k not in ("epoch", "seconds")}
    result = {"phase": name, "seconds": prep_s + sum(h["seconds"] for h in history), "prep_seconds": prep_s,
              "metrics": last, "history": history,
              "image_size": phase.image_size, "epochs": phase.epochs, "train_images": len(train),
              "unlabeled_images": int((train.labels < 0).sum())}
    if probe_history is not None:
        result["probe"] = {"epochs": cfg.probe_epochs, "lr": cfg.probe_lr, "history": probe_history,
                           "seconds": sum(h["seconds"] for h in probe_history)}
        result["seconds"] += result["probe"]["seconds"]
    if dist.is_main:
        for role, model in objective.exported().items():
            save_weights(model, phase_dir / f"{role}.safetensors")
        write_json_atomic(done_path, result)
    distributed.barrier()
    return result


def probe_teacher(teacher: torch.nn.Module, cfg: Config, train: ImageSet, ctx: ValContext, phase_dir: Path,
                  reporter: Reporter, dist: distributed.Dist, resume: bool, class_weight: torch.Tensor) -> list[dict]:
    """LP-FT's first step (Config.probe_epochs): the head alone trains on the frozen pretrained features, by the
    same loop, with its own training state in finetune/probe/ (a killed probe resumes; a finished one reloads)."""
    ft = cfg.finetune
    phase = PhaseConfig(epochs=cfg.probe_epochs, image_size=ft.image_size, batch_size=ft.batch_size,
                        lr=cfg.probe_lr, weight_decay=0.0, warmup_epochs=0.0)
    objective = SupervisedObjective(teacher, "teacher", ft.image_size, class_weight, Augment.from_config(cfg.augment),
                                    cfg.label_smoothing, head_only=True)
    reporter.log("phase_start", phase=PROBE, epochs=phase.epochs, image_size=phase.image_size,
                 train_images=len(train), val_images=len(ctx.val))
    return fit(objective, train, phase, ctx, phase_dir / PROBE, reporter, PROBE, seed=cfg.seed,
               grad_clip=cfg.grad_clip, resume=resume, dist=dist, bf16=cfg.cpu_bf16)


def student_objective(name: str, cfg: Config, teacher: torch.nn.Module, train: ImageSet, class_weight: torch.Tensor,
                      device: torch.device, reporter: Reporter | None = None):
    """A new student (stem copied from the teacher unless cfg.student_init is "scratch") and its objective for phase `name` (distill, or the
    labels-only baseline), with the training set it sees: under cached teacher targets that set
    carries the teacher's logits, computed here. Returns (objective, train, seconds spent caching)."""
    phase = cfg.phase(name)
    student = build_student()
    if cfg.student_init == "teacher-stem":
        seed_student_from_teacher(student, teacher)
    augmentation = Augment.from_config(cfg.augment)
    if name != "distill":  # the ablation: same student, same budget, labels only
        objective = SupervisedObjective(student, "student", phase.image_size, class_weight, augmentation,
                                        cfg.label_smoothing)
        return objective.use_ema(cfg.ema_decay), train, 0.0
    objective = DistillationObjective(student, teacher, phase.image_size, class_weight, cfg.temperature, cfg.alpha,
                                      cfg.hint_weight, augmentation, cfg.label_smoothing, cfg.lung_cam_weight,
                                      cfg.lung_cam_stage, cfg.lung_gradient_weight,
                                      cfg.outside_reliance_weight, cfg.outside_reliance_fill).use_ema(cfg.ema_decay)
    if not cfg.cached_targets:
        return objective, train, 0.0
    teachers = [teacher] + [_load("teacher", Path(path)) for path in cfg.extra_teachers]
    if reporter is not None:
        reporter.log("teacher_targets", phase=name, images=len(train), teachers=len(teachers))
    t0 = time.time()
    train = cache_teacher_logits(teachers, train, phase.image_size, device, max(phase.batch_size, 64),
                                 views=TTA_VIEWS if cfg.teacher_targets == "cached-tta" else None)
    return objective, train, time.time() - t0


def finished_phases(out: Path) -> dict[str, dict]:
    """The done.json of each finished phase of the run in `out`, in pipeline order (PhaseOrderError naming an
    unusable one)."""
    return {name: done for name in PIPELINE if (done := read_done(out, name)) is not None}


def run(cfg: Config, phases: tuple[str, ...] = PIPELINE, resume: bool = False, progress: bool = True,
        command: str | None = None) -> dict | None:
    """Run the given phases (finished ones are skipped) and export; returns the model card (rank 0).
    `command` is the command line that started the run, recorded in the model card."""
    cfg.validate()
    out = Path(cfg.out)
    check_not_reserved(out)
    adopted = phases_to_adopt(cfg, phases)  # before the config is saved: it takes the adopted phases' settings
    runnable = cfg.runnable_phases(phases)
    if runnable != phases and progress:
        print(f"{NO_CORPUS}: SSL pretraining skipped, the teacher is fine-tuned from "
              f"{cfg.init or 'scratch'}.", file=sys.stderr)
    phases = runnable
    device = distributed.resolve_device(cfg.device)
    dist = distributed.setup(device)
    # one run per folder, whoever started it (CLI, app job, torchrun): a second is refused before it writes
    if not resume:
        check_fresh_folder(out, phases if cfg.baseline else tuple(p for p in phases if p != "baseline"))
    elif dist.is_main:
        finished_phases(out)  # an unusable done.json is said before any training, not after it
    run_lock = locks.run_folder(out) if dist.is_main else None
    reporter = Reporter(out, enabled=dist.is_main)
    try:
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            cfg.save(out / "config.json")
        torch.manual_seed(cfg.seed)
        if not cfg.baseline:
            phases = tuple(p for p in phases if p != "baseline")
        precision = distributed.training_precision(device, cfg.cpu_bf16)
        reporter.start(state="running", phases=list(phases), device=str(device), world_size=dist.world_size,
                       error=None, precision=precision)
        data = RunData(cfg, dist, progress)
        if progress and dist.is_main:  # once the data is usable: a bad dataset's message comes first and alone
            print(f"training precision: {precision}", file=sys.stderr)
        if dist.is_main:
            write_json_atomic(out / "split.json", {name: {"patients": sorted({s.patient for s in ss}),
                                                          **describe(ss)} for name, ss in data.splits.items()})
        if adopted and dist.is_main:
            adopt_phases(cfg, out, adopted, {s.patient for s in data.splits["val"]})
        distributed.barrier()
        for name in phases:
            run_phase(name, cfg, data, out, reporter, device, dist, resume)
        card = None
        if dist.is_main and any((out / p / "done.json").exists() for p in ("finetune", "distill")):
            card = export(cfg, data, out, device, reporter, finished_phases(out), command)
            if all("threshold" in card["models"].get(r, {}) for r in ("teacher", "student")):  # servable: guard it
                reporter.update(phase="export", model="refusal check")
                reporter.log("export", phase="export", model="refusal check")
                card.update(fit_checks(out, cfg.data, command=command or "", max_train=cfg.max_train_images))
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
