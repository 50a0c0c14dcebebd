"""Does distillation transfer? The distilled student against the labels-only student of the same run.

Both are ResNet18s trained under the same budget from the same teacher stem (weights/student.safetensors and
weights/student_baseline.safetensors); they differ only in the teacher's softened outputs. On each split:
each model's AUC and the paired difference (distilled - labels-only) with a 95 % bootstrap CI that resamples
patients (both models scored on every resample). Also the teacher against the labels-only student, which is
what "a teacher worth distilling" asks (issue: teacher AUC >= labels-only + 0.01).

`--ensemble RUN ...`: more teachers of the same recipe trained with other seeds (`kd finetune --seed N
--out RUN`, same preset, same validation split); their calibrated probabilities are averaged with the
weights' teacher's, and that ensemble is compared with the labels-only student too (Lakshminarayanan et
al. 2017, "Simple and scalable predictive uncertainty estimation using deep ensembles": a mean of
independently trained networks).

`--labels-only RUN`: the labels-only student from another run of the same recipe, seed and init, trained with
`--alpha 1` (its "distilled" student then learns from the labels alone): what a run trained with `--no-baseline`
is compared with.

`--scratch RUN`: the same recipe and seed with `--student-init scratch` (issue 18's third item: does the
teacher's stem help?): its labels-only student (its `student_baseline`, or its `student` when the run was trained
with alpha 1, the labels alone) and its distilled student, each against its teacher-stem twin here; then the
teacher and the distilled student against the labels-only student from scratch.

`--variant RUN`: a run of the same recipe and seed that changes one distillation lever (e.g. `--teacher-targets
cached-tta`): its distilled student against this one's and against the labels-only student.

`--variants RUN ...`: `--variant` over seeds: one run per seed (the weights' seed first, then --seeds'), each of that
seed with the same one lever changed (e.g. `--distill-unlabeled`); its student against that seed's distilled and
labels-only students, per seed and pooled: does the lever help over seeds, not just on one.

`--teacher-variants RUN ...`: the same for a lever of the teacher's (e.g. more pretraining epochs): one run per seed,
each of that seed with the lever changed; its teacher against that seed's teacher and labels-only student, per seed
and pooled.

`--teacher RUN`: the teacher of another run (e.g. another self-supervised pretraining, `kd pretrain` then `kd
finetune`, same input size, contrast and validation split) in place of the weights' teacher in every comparison:
is that teacher better than the labels-only student?

`--tta`: each model also scored as the mean logit over kd.augment.TTA_VIEWS (the whole image, a closer and a wider
framing, four small shifts): is the teacher, scored that way, a better one to distil from?

`--seeds RUN ...`: runs of the same recipe with other training seeds (same validation split; a run trained
without its labels-only student, `--no-baseline`, is left out of the comparisons that need one); each one's
distilled - labels-only is printed, then the mean over all seeds (the weights' own included) with a pooled 95 % CI
(kd.metrics.pooled_auc_difference: every seed scored on the same patient resamples), what issue 18's target reads;
the same for teacher - labels-only when every seed trained its own teacher.

`--plain-teachers RUN ...`: the same recipe's teacher fine-tuned without SSL pretraining, one run per seed (the
weights' seed first, then --seeds'): pretrained teacher - plain teacher per seed and pooled, "does pretraining make
the teacher better", paired on the same images.

    python bench/kd_transfer.py [--weights weights] [--data ../shared/data/chest_xray] [--splits val test]
                                [--ensemble runs/teacher-seed1 runs/teacher-seed2] [--seeds RUN ...]
                                [--plain-teachers RUN ...] [--labels-only RUN] [--scratch RUN] [--variant RUN]
                                [--variants RUN ...] [--teacher-variants RUN ...] [--teacher RUN] [--tta]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common import SHARED


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None, help="weights folder (default: the shipped one)")
    ap.add_argument("--data", default=str(SHARED / "chest_xray"))
    ap.add_argument("--splits", nargs="+", default=["val", "test"])
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--ensemble", nargs="*", default=[], help="run folders of more teachers (other seeds)")
    ap.add_argument("--seeds", nargs="*", default=[], help="run folders of the same recipe with other seeds: "
                    "distilled - labels-only per seed and pooled")
    ap.add_argument("--plain-teachers", nargs="*", default=[], help="runs of this recipe's teacher fine-tuned without "
                    "SSL pretraining (`kd finetune`), one per seed in the order of --weights then --seeds: pretrained "
                    "teacher - plain teacher per seed and pooled")
    ap.add_argument("--labels-only", help="a run of the same recipe, seed and init trained with --alpha 1 (the labels "
                    "alone): its student is the labels-only student (for a run trained with --no-baseline)")
    ap.add_argument("--scratch", help="a run of the same recipe and seed whose students started from scratch "
                    "(--student-init scratch): each against its teacher-stem twin, and the teacher and the distilled "
                    "student against the labels-only student from scratch")
    ap.add_argument("--variant", help="a run of the same recipe and seed with one distillation lever changed: its "
                    "distilled student against this one's and against the labels-only student")
    ap.add_argument("--variants", nargs="*", default=[], help="--variant for every seed: one run per seed in the order "
                    "of --weights then --seeds, each with the same lever changed: variant - distilled and variant - "
                    "labels-only per seed and pooled")
    ap.add_argument("--teacher-variants", nargs="*", default=[], help="one run per seed in the order of --weights then "
                    "--seeds, each with one pretraining or fine-tuning lever changed: its teacher - that seed's "
                    "teacher and - its labels-only student, per seed and pooled")
    ap.add_argument("--teacher", help="a run whose teacher (same input size, contrast and validation split) replaces "
                    "the weights' teacher in every comparison")
    ap.add_argument("--tta", action="store_true", help="also score each model as the mean over kd.augment.TTA_VIEWS")
    args = ap.parse_args(argv)

    import torch

    from kd import metrics
    from kd.augment import TTA_VIEWS
    from kd.cache import ImageSet, build_cache
    from kd.checkpoint import load_weights
    from kd.data import samples_for, split_settings
    from kd.scoring import predict_logits
    from kd.paths import default_weights
    from kd.model_card import read_card
    from kd.models import build

    weights = Path(args.weights) if args.weights else default_weights()
    card = read_card(weights).document
    size, contrast, cfg = card["input"]["size"], card["input"].get("contrast", "none"), card.get("config", {})
    roles = [r for r in ("teacher", "student", "student_baseline") if r in card["models"]]
    device = torch.device("cpu")
    def load(folder: Path, entry: dict) -> torch.nn.Module:
        return load_weights(build(entry["architecture"]), folder / entry["file"]).eval() \
            .to(memory_format=torch.channels_last)

    models, temperatures = {}, {}

    def add(name: str, folder: Path, entry: dict) -> None:
        """A model of some run under `name`, with its calibration temperature."""
        models[name] = load(folder, entry)
        temperatures[name] = entry.get("calibration_temperature", 1.0)

    for r in roles:
        add(r, weights, card["models"][r])
    def same_recipe(member: dict, run: str, needs: set) -> bool:
        """Same input size, contrast and validation split as the weights, and the models `needs` there."""
        if (member["input"]["size"], member["input"].get("contrast", "none")) != (size, contrast) \
                or split_settings(member.get("config", {})) != split_settings(cfg) or not needs <= set(member["models"]):
            print(f"{run}: another input size, contrast or validation split than {weights}, or without "
                  f"{' and '.join(sorted(needs))}: not one recipe")
            return False
        return True

    if args.teacher:
        member = read_card(args.teacher).document
        if not same_recipe(member, args.teacher, {"teacher"}):
            return 1
        add("teacher", Path(args.teacher), member["models"]["teacher"])
        roles = roles if "teacher" in roles else ["teacher"] + roles
    if args.labels_only:
        member = read_card(args.labels_only).document
        member_cfg = member.get("config", {})
        if member_cfg.get("alpha") != 1.0 or member_cfg.get("student_init") != cfg.get("student_init") \
                or not same_recipe(member, args.labels_only, {"student"}):
            print(f"{args.labels_only}: not a student of this recipe and init trained on the labels alone (alpha 1)")
            return 1
        add("student_baseline", Path(args.labels_only), member["models"]["student"])
    if "student_baseline" not in models and not args.scratch:
        print(f"{weights} has no student_baseline (and no --labels-only or --scratch run): nothing to compare")
        return 1
    for i, run in enumerate(args.ensemble, start=1):
        member = read_card(run).document
        if not same_recipe(member, run, {"teacher"}):
            return 1
        role = f"teacher_seed{member.get('config', {}).get('seed', i)}"
        add(role, Path(run), member["models"]["teacher"])
        roles.append(role)
    seeds = [str(card.get("config", {}).get("seed", 0))]  # one label per run: its seed, made unique (run_label)
    trained_with = {seeds[0]: seeds[0]}
    for run in args.seeds:
        member = read_card(run).document
        if not same_recipe(member, run, {"student"}):  # a labels-only student too, for the comparisons with one
            return 1
        seed = str(member.get("config", {}).get("seed", "?"))
        label = run_label(seed, run, seeds)
        seeds.append(label)
        trained_with[label] = seed
        for r in ("student", "student_baseline", "teacher"):
            if r in member["models"]:  # the teacher too where the seed trained its own (issue 18's teacher target)
                add(f"{r}@seed{label}", Path(run), member["models"][r])
    def join_per_seed(flag: str, runs: list[str], model: str, name: str) -> bool:
        """One run per seed, in the order of `seeds`, each of this recipe and trained with that seed: its `model`
        joins as `name` of that seed (the weights' own seed keeps the bare name, which the single-pair lines read)."""
        if runs and len(runs) != len(seeds):
            print(f"{flag} needs one run per seed ({', '.join(seeds)}), in that order")
            return False
        for label, run in zip(seeds, runs):
            member = read_card(run).document
            if not same_recipe(member, run, {model}):
                return False
            if str(member.get("config", {}).get("seed", "?")) != trained_with[label]:
                print(f"{run}: not a run of this recipe trained with seed {trained_with[label]}: not its pair")
                return False
            add(name if label == seeds[0] else f"{name}@seed{label}", Path(run), member["models"][model])
        return True

    if args.variants and args.variant:
        print("--variants and --variant both name the weights' seed's variant: give one of them")
        return 1
    if not (join_per_seed("--plain-teachers", args.plain_teachers, "teacher", "plain_teacher")
            and join_per_seed("--variants", args.variants, "student", "student_variant")
            and join_per_seed("--teacher-variants", args.teacher_variants, "teacher", "teacher_variant")):
        return 1
    if args.scratch:
        member = read_card(args.scratch).document
        scratch_cfg = member.get("config", {})
        if scratch_cfg.get("student_init") != "scratch" or not same_recipe(member, args.scratch, set()):
            print(f"{args.scratch}: not a run of this recipe with --student-init scratch")
            return 1
        # alpha 1 trains the run's "distilled" student on the labels alone: that one is a labels-only student
        as_role = {"student_baseline": "student_baseline",
                   "student": "student_baseline" if scratch_cfg.get("alpha") == 1.0 else "student"}
        for r in (r for r in ("student_baseline", "student") if r in member["models"]):
            add(f"{as_role[r]}_scratch", Path(args.scratch), member["models"][r])
    if args.variant:
        member = read_card(args.variant).document
        if member.get("config", {}).get("seed") != cfg.get("seed") or not same_recipe(member, args.variant, {"student"}):
            print(f"{args.variant}: not a run of this recipe and seed")
            return 1
        add("student_variant", Path(args.variant), member["models"]["student"])
    print(f"weights {weights} ({size} px, contrast {contrast}); CIs: patient-level bootstrap, {args.n_boot} resamples")
    for split in args.splits:
        samples = samples_for(args.data, split, *split_settings(cfg))
        cache = build_cache([s.path for s in samples], size, None, progress=False, contrast=contrast)
        images = ImageSet.from_cache(cache, [s.label for s in samples])
        patients = [samples[r].patient for r in images.rows]
        p = {r: metrics.softmax_pneumonia(predict_logits(m, images, size, device), temperatures[r])
             for r, m in models.items()}
        if args.tta:
            p.update({f"{r}_tta": metrics.softmax_pneumonia(predict_logits(models[r], images, size, device,
                                                                           views=TTA_VIEWS), temperatures[r])
                      for r in ("teacher", "student", "student_baseline") if r in models})
        members = [r for r in roles if r.startswith("teacher")]  # the weights' teacher and --ensemble's
        if len(members) > 1:
            p["teacher_ensemble"] = sum(p[r] for r in members) / len(members)
        y = images.labels
        aucs = "  ".join(f"{r} {metrics.rank_auc(y, p[r]):.4f}" for r in p)
        print(f"\n{split} ({len(y)} images, {len(set(patients))} patients): AUC {aucs}")
        for a, b in (("student_baseline", "student"), ("student_baseline", "teacher"),
                     ("student_baseline", "teacher_ensemble"), ("teacher", "teacher_ensemble"),
                     ("student_baseline_scratch", "student_baseline"), ("student_scratch", "student"),
                     ("student_baseline_scratch", "teacher"), ("student_baseline_scratch", "student"),
                     ("teacher", "teacher_tta"), ("student_baseline", "teacher_tta"),
                     ("student_baseline_tta", "teacher_tta"), ("student", "student_tta"),
                     ("student", "student_variant"), ("student_baseline", "student_variant"),
                     ("student_baseline_scratch", "student_variant"), ("teacher", "teacher_variant"),
                     ("student_baseline", "teacher_variant")):
            if a in p and b in p:
                d, lo, hi = metrics.paired_auc_difference(y, p[a], p[b], n_boot=args.n_boot, groups=patients)
                print(f"  {b} - {a}: {d:+.4f} (95% CI {lo:+.4f} to {hi:+.4f})")
        lacking = [s for s in seeds if of(p, seeds, "student_baseline", s) is None]
        if lacking and len(seeds) > 1:
            print(f"  run(s) {', '.join(lacking)} have no labels-only student: left out of the comparisons with one")
        pooled = [("student_baseline", "labels-only", "student", "distilled"),
                  ("student_baseline", "labels-only", "teacher", "teacher"),
                  ("plain_teacher", "plain teacher", "teacher", "pretrained teacher"),
                  ("student", "distilled", "student_variant", "variant"),
                  ("student_baseline", "labels-only", "student_variant", "variant"),
                  ("teacher", "teacher", "teacher_variant", "teacher variant"),
                  ("student_baseline", "labels-only", "teacher_variant", "teacher variant")]
        for base, base_what, role, what in pooled:
            having = [s for s in seeds if all(of(p, seeds, r, s) is not None for r in (base, role))]
            if having and (len(having) > 1 or base == "plain_teacher"):
                print_over_seeds(y, p, patients, having, (base, base_what), (role, what), args.n_boot)
    return 0


def run_label(seed: str, run: str, taken: list[str]) -> str:
    """The run's seed, or, where another run of the list has that seed already (e.g. a second pretraining seed
    fine-tuned with the same training seed), the seed and the run folder's name: every run keeps its own models."""
    return seed if seed not in taken else f"{seed} ({Path(run).name})"


def of(p: dict, seeds: list[str], role: str, seed: str):
    """The probabilities of `role` in the run of `seed`: the models of --seeds' runs and of the per-seed flags' runs
    (join_per_seed) carry their seed in the name, the weights' own seed's not; None where there is none."""
    return p.get(f"{role}@seed{seed}", p.get(role) if seed == seeds[0] else None)


def print_over_seeds(y, p: dict, patients: list, seeds: list[str], base: tuple[str, str], role: tuple[str, str],
                     n_boot: int) -> None:
    """`role` (the distilled student, the teacher) - `base` (the labels-only student, the plain teacher), each a
    (role, what it is called) pair, for each seed, then their mean with the pooled CI (every seed scored on the same
    patient resamples)."""
    from kd import metrics

    pairs = [(of(p, seeds, base[0], s), of(p, seeds, role[0], s)) for s in seeds]
    for s, (a, b) in zip(seeds, pairs):
        d, lo, hi = metrics.paired_auc_difference(y, a, b, n_boot=n_boot, groups=patients)
        print(f"  seed {s}: {role[0]} {metrics.rank_auc(y, b):.4f}, {base[1]} {metrics.rank_auc(y, a):.4f}, "
              f"{role[1]} - {base[1]} {d:+.4f} (95% CI {lo:+.4f} to {hi:+.4f})")
    d, lo, hi = metrics.pooled_auc_difference(y, pairs, n_boot=n_boot, groups=patients)
    print(f"  over seeds {', '.join(seeds)}: {role[1]} - {base[1]} {d:+.4f} (pooled 95% CI {lo:+.4f} to {hi:+.4f})")

if __name__ == "__main__":
    raise SystemExit(main())
