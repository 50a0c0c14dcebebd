"""`python -m kd ...`: the pipeline and each phase alone, evaluation and prediction."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from kd.config import PHASE_COMMANDS, PRESETS, SSL_METHODS, STUDENT_INITS, TEACHER_TARGETS, Config, preset
from kd.preprocess import FORMAT_NAMES



def _train_parser(sub, name: str, help: str):
    p = sub.add_parser(name, help=help)
    p.add_argument("--data", required=True, help="dataset root with train/{NORMAL,PNEUMONIA} (val/, test/ optional)")
    p.add_argument("--out", required=True, help="run folder (weights, model card, progress, checkpoints)")
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--image-size", type=int, help="training and inference size of every phase")
    p.add_argument("--epochs", type=int, help="epochs of every phase")
    p.add_argument("--batch-size", type=int, help="global batch size of every phase")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--cpu-bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast in CPU training steps where the CPU has native bf16 (AVX512-BF16 or AMX; "
                        "float32 elsewhere, where bf16 is emulated and slower); always on with CUDA; the cpu preset "
                        "turns it on")
    p.add_argument("--ssl-method", choices=SSL_METHODS)
    p.add_argument("--temperature", "-T", type=float, help="distillation temperature T")
    p.add_argument("--alpha", type=float, help="weight of the label loss in distillation (0-1)")
    p.add_argument("--hint-weight", type=float, help="weight of the FitNets layer4 feature hint (0 = off)")
    p.add_argument("--teacher-targets", choices=TEACHER_TARGETS,
                   help="distillation: teacher run on every augmented view (online), its logits computed once (cached), "
                        "or computed once as its mean over 7 framings of each image (cached-tta)")
    p.add_argument("--extra-teachers", nargs="*", default=None, metavar="WEIGHTS",
                   help="more teachers' teacher.safetensors (other seeds): their logits are averaged with this "
                        "run's teacher's into the distillation targets (needs --teacher-targets cached or cached-tta)")
    p.add_argument("--seed", type=int, help="training seed (initialisation, augmentation, batch order)")
    p.add_argument("--split-seed", type=int, help="seed of the patient-level validation split (default 0; "
                   "independent of --seed, so runs with different seeds share one validation split)")
    p.add_argument("--val-fraction", type=float)
    p.add_argument("--init", help="local weights file to initialise the teacher (ImageNet, SwAV, ...)")
    p.add_argument("--from-run", metavar="RUN", help="a finished run to build on: distill takes its fine-tuned "
                   "teacher, finetune its pretrained backbone (copied into --out with their settings and records; "
                   "same contrast and validation split required)")
    p.add_argument("--unlabeled", nargs="*", default=None,
                   help="folders of unlabeled X-rays: SSL pretraining's corpus (and distillation's, with --distill-unlabeled)")
    p.add_argument("--pretrain-labelled", action=argparse.BooleanOptionalAction, default=None,
                   help="the labelled train images join the --unlabeled images in SSL pretraining (default); "
                   "--no-pretrain-labelled pretrains on the --unlabeled images alone")
    p.add_argument("--distill-unlabeled", action=argparse.BooleanOptionalAction, default=None,
                   help="the student matches the teacher on the --unlabeled images too (labels' term where there are labels)")
    p.add_argument("--student-init", choices=STUDENT_INITS,
                   help="teacher-stem: the student starts from the teacher's conv1/bn1; scratch: random")
    p.add_argument("--cache-dir", help="decoded-image cache (default: next to the run folder)")
    p.add_argument("--no-baseline", action="store_true", help="skip the labels-only student of the ablation")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--config", help="a config.json to start from (the app writes one)")
    return p


def config_from_args(args) -> Config:
    saved = Path(args.out) / "config.json"
    if args.config:
        cfg = Config.load(args.config)
    elif args.resume and saved.exists():
        cfg = Config.load(saved)  # a resumed run keeps its settings
    else:
        cfg = preset(args.preset, image_size=args.image_size, epochs=args.epochs, batch_size=args.batch_size)
    for key in ("seed", "split_seed", "temperature", "alpha", "hint_weight", "ssl_method", "val_fraction", "init", "unlabeled",
                "cache_dir", "teacher_targets", "cpu_bf16", "distill_unlabeled", "pretrain_labelled", "student_init",
                "extra_teachers", "from_run"):
        value = getattr(args, key, None)
        if value is not None:
            setattr(cfg, key, value)
    cfg.data, cfg.out, cfg.device = args.data, args.out, args.device
    if cfg.from_run:  # recorded in config.json and the card: where the teacher came from, wherever the job runs
        cfg.from_run = str(Path(cfg.from_run).resolve())
    if args.no_baseline:
        cfg.baseline = False
    cfg.validate()
    return cfg


def cmd_train(args) -> int:
    cfg = config_from_args(args)  # a bad setting or saved config.json is reported before torch is imported
    from kd.pipeline import run

    # recorded in the model card: how to make these weights from scratch (a resumed session's --resume is not)
    command = "python -m kd " + shlex.join(a for a in args.argv if a != "--resume")
    card = run(cfg, PHASE_COMMANDS[args.command], resume=args.resume, command=command)
    if card:
        print(summary(card))
    print(f"Run folder: {cfg.out}")
    return 0


def summary(card: dict) -> str:
    """Validation and test side by side for each model, at the card's threshold (calibrated probability)."""
    from kd.model_card import split_rows

    lines = [f"{'model':17} {'split':10} {'AUC (95% CI)':22} {'acc':>6} {'sens':>6} {'spec':>6} {'thr':>6}"]
    for r in split_rows(card):
        auc = ("n/a" if r["auc"] is None else f"{r['auc']:.3f} ({r['auc_low']:.3f}-{r['auc_high']:.3f})"
               if r["auc_low"] is not None else f"{r['auc']:.3f}")
        lines.append(f"{r['role']:17} {r['split']:10} {auc:22} {r['accuracy']:6.3f} {r['sensitivity']:6.3f} "
                     f"{r['specificity']:6.3f} {card['models'][r['role']]['threshold']:6.3f}")
    lines.append("validation: patient-level split of train/ (chooses epochs, calibration, thresholds; optimistic); "
                 "test: the dataset's test/ folder, the external check")
    return "\n".join(lines)


def cmd_evaluate(args) -> int:
    from kd.distributed import resolve_device
    from kd.evaluate import evaluate_weights
    from kd.paths import default_weights

    result = evaluate_weights(args.weights or default_weights(), args.data, args.split, resolve_device(args.device),
                              n_boot=args.bootstrap)
    for role in ("teacher", "student"):
        r = result[role]
        lo, hi = r["ci"]["auc"]
        print(f"{role:8} split={args.split} n={result['n']} threshold={r['threshold']:.3f}  AUC {r['auc']:.3f} "
              f"[{lo:.3f}, {hi:.3f}]  acc {r['accuracy']:.3f}  sens {r['sensitivity']:.3f}  spec {r['specificity']:.3f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"Wrote {args.json}")
    return 0


def cmd_predict(args) -> int:
    from tqdm.auto import tqdm

    from kd.serving import load_pair, no_check_reason, predict_files

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1 (got {args.batch_size})")
    pair = load_pair(args.weights)
    if pair.ood is None:  # one sentence, not the same refusal for every file
        raise ValueError(no_check_reason(pair.weights_dir))
    refused = 0
    # one line per file on stdout as each batch finishes; the bar is on stderr (off when it is not a terminal)
    with tqdm(total=len(args.files), desc="predict", unit="file", disable=None, file=sys.stderr) as bar:
        for path, r, error in predict_files(pair, args.files, batch_size=args.batch_size):
            bar.update(1)
            if error is not None:
                refused += 1
                print(json.dumps({"file": path, "error": error}) if args.json else f"{path}: refused: {error}",
                      flush=True)
                continue
            r["file"] = path
            if args.json:
                print(json.dumps(r, allow_nan=False), flush=True)
            else:
                t, s = r["teacher"], r["student"]
                note = f"  [{'; '.join(r['warnings'])}]" if r["warnings"] else ""
                print(f"{path}: teacher p(pneumonia)={t['probability']:.3f} {t['decision']}, "
                      f"student p(pneumonia)={s['probability']:.3f} {s['decision']}{note}", flush=True)
    return 2 if refused else 0


def cmd_fit_ood(args) -> int:
    from kd import framing
    from kd.ood import CARD_KEY
    from kd.refusal_fit import fit_checks

    fitted = fit_checks(args.weights, args.data, command="python -m kd " + shlex.join(args.argv),
                        max_train=args.max_train)
    info, framed = fitted[CARD_KEY], fitted[framing.CARD_KEY]
    for split, r in info["refused"].items():
        print(f"{split:10} refused {r['refused']:4d} of {r['n']:5d} ({r['fraction']:.2%}): "
              f"{r['by_image_statistics']} by image statistics, {r['by_embedding_distance']} by embedding distance")
    print(f"threshold {info['threshold']:.1f} ({info['threshold_rule']}); wrote {args.weights}/{info['file']} "
          f"and the card's {CARD_KEY!r} section")
    for what, r in framed["warned"].items():
        print(f"framing: {what:34} warned {r['warned']:4d} of {r['n']:5d} ({r['fraction']:.1%})")
    print(f"wrote {args.weights}/{framed['file']} and the card's {framing.CARD_KEY!r} section")
    return 0


def _resumable(args) -> str:
    """The note for a failed training command, said only when its run folder holds something to resume."""
    if args.command not in PHASE_COMMANDS:
        return ""
    try:
        out = Path(args.out)
        kept = any(out.glob("*/state.pt")) or any(out.glob("*/done.json"))
    except OSError:
        kept = False
    return " Checkpoints already written are intact: --resume continues from them." if kept else ""


WEIGHTS_HELP = ("weights folder (teacher.safetensors, student.safetensors, model_card.json; a run folder works); "
                "default: $KD_WEIGHTS if set, else the weights/ shipped in this checkout")
SPLIT_HELP = ("test: DATA/test/; official-val: DATA/val/ (16 images in Kermany's release, a sanity check only); "
              "val: the patient-level validation split carved from DATA/train/ with the weights' seed and fraction "
              "(what the thresholds were chosen on: optimistic); train: the rest of DATA/train/. Default: test")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser. Imports no torch, so `kd --help` and usage errors answer at once."""
    prog = "kd" if Path(sys.argv[0]).name == "kd" else "python -m kd"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub, "pipeline", "all phases: SSL pretrain, fine-tune, distil (+ labels-only baseline), export")
    _train_parser(sub, "pretrain", "self-supervised pretraining of the ResNet50 teacher")
    _train_parser(sub, "finetune", "fine-tune the teacher on the labels")
    _train_parser(sub, "distill", "distil the fine-tuned teacher into the ResNet18 student")
    e = sub.add_parser("evaluate", help="evaluate teacher and student of a weights folder on a split")
    e.add_argument("--data", required=True, help="dataset root in the Kermany layout (train/, val/, test/ with "
                   "NORMAL/ and PNEUMONIA/ inside); the chosen split's folder must exist")
    e.add_argument("--split", default="test", choices=("test", "official-val", "val", "train"), help=SPLIT_HELP)
    e.add_argument("--weights", help=WEIGHTS_HELP)
    e.add_argument("--json", help="write the full report here")
    e.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    e.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs")
    p = sub.add_parser("predict", help="probability of pneumonia for X-ray files (JPEG, PNG, DICOM)")
    p.add_argument("files", nargs="+", help=f"chest X-rays: {FORMAT_NAMES} files")
    p.add_argument("--batch-size", type=int, default=16, help="files decoded ahead and predicted together")
    p.add_argument("--weights", help=WEIGHTS_HELP)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    o = sub.add_parser("fit-ood", help="fit the check that refuses what is not a chest radiograph (kd/ood.py), and "
                       "the framing warnings for crops, zooms and mirror images (kd/framing.py), on a weights folder; "
                       "re-run it whenever the weights change")
    o.add_argument("--weights", required=True, help="weights folder to fit it for; ood.safetensors and the model "
                   "card's 'ood' section are written there")
    o.add_argument("--data", required=True, help="dataset root in the Kermany layout: fitted on the patient-level "
                   "train split, threshold set on the validation split (the card's seed and fraction); test/ is "
                   "only counted")
    o.add_argument("--max-train", type=int, help="fit on a seeded random subset of this many training images "
                   "(default: all)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # --help and usage errors exit here, before torch is imported
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    handlers = {"evaluate": cmd_evaluate, "predict": cmd_predict, "fit-ood": cmd_fit_ood}
    try:
        return handlers.get(args.command, cmd_train)(args)
    except (ValueError, FloatingPointError, RuntimeError) as e:  # DatasetError, CheckpointError,
        print(f"error: {e}", file=sys.stderr)  # PhaseOrderError and unreadable state files are among them
        return 1
    except OSError as e:  # unwritable output folder, disk full, unreadable input
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"error: {e.strerror or e}{where}.{_resumable(args)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: resume with --resume", file=sys.stderr)
        return 130
