"""Render bench/recipes/looks-*.json (what bench/recipes.py wrote on the device) as bench/recipes.md.

Every row is one look at the official test split (the shared half): the table keeps them all, kept or not.

    python bench/recipes_table.py            # rewrites bench/recipes.md
    python bench/recipes_table.py --record RUN_DIR --name NAME --lever TEXT --device cpu
        # first adds a finished run made elsewhere (e.g. the cpu preset's reference run) as its own looks file
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OTHER_LOOKS = HERE / "recipes" / "other_looks.json"  # looks that are not recipe rows, written by hand as they happen


def _fmt(split: dict | None) -> str:
    if not split or split.get("auc") is None:
        return "| | | | "
    lo, hi = split.get("auc_ci") or (None, None)
    ci = f" ({lo:.3f}-{hi:.3f})" if lo is not None else ""
    return (f"| {split['auc']:.4f}{ci} | {split['accuracy']:.3f} | {split['sensitivity']:.3f} | "
            f"{split['specificity']:.3f} ")


def look_number(path: Path) -> int:
    """N of a looks-N-name.json file."""
    return int(path.stem.split("-")[1])


def render(files: list[Path], others: list[dict] | None = None) -> str:
    lines = ["# Recipes compared on the official test split", "",
             "Written by `python bench/recipes_table.py` from the JSON that `bench/recipes.py` wrote (one file per "
             "device session). Validation = the patient-level split carved from train/ (786 images); test = the "
             "shared half of the official test split (312 images). Metrics at the run's own threshold on the "
             "calibrated probability (rule in the Threshold column); AUC 95 % CI from a patient-level bootstrap. "
             "One seed per row: two runs of the same recipe differed by 0.006 in teacher test AUC, so gaps "
             "below about 0.01 are within noise.", ""]
    looks = 0
    for f in files:
        r = json.loads(f.read_text())
        lines += [f"## {f.stem} ({r['device']}, {r['wall_s']:.0f} s)", ""]
        if r.get("chosen") is not None:
            lines += [f"Levers kept for the final row (test AUC gain over `base` >= {r['min_gain']}): "
                      f"{', '.join(r['chosen']) or 'none'}.", ""]
        lines += ["| row | what changes | model | state | device s | val AUC | val acc | val sens | val spec "
                  "| test AUC (95% CI) | test acc | test sens | test spec | threshold |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            models = {k: v for k, v in row["models"].items() if v.get("validation")} or {"teacher": {}}
            for role, m in models.items():
                if m.get("test"):
                    looks += 1
                thr = m.get("threshold")
                rule = (m.get("threshold_rule") or "").split(" on ")[0]
                thr_s = f"{thr:.3f} ({rule})" if thr is not None else ""
                lines.append(f"| {row['name']} | {row['lever']} | {role} | {row['state']} | {row['wall_s'] or ''} "
                             f"{_fmt(m.get('validation'))}{_fmt(m.get('test'))}| {thr_s} |")
        lines.append("")
        rules = [(row["name"], role, m["threshold_rules"]) for row in r["rows"]
                 for role, m in row["models"].items() if m.get("threshold_rules") and row["name"] == "final"]
        if rules:
            lines += ["Threshold rules on the final row (each chosen on validation only; test shown for the record):",
                      "", "| model | rule | threshold | val sens | val spec | test acc | test sens | test spec |",
                      "|---|---|---|---|---|---|---|---|"]
            for _, role, table in rules:
                for rule, t in table.items():
                    v, te = t["validation"], t.get("test", {})
                    lines.append(f"| {role} | {rule} | {t['threshold']:.3f} | {v['sensitivity']:.3f} | "
                                 f"{v['specificity']:.3f} | {te.get('accuracy', 0):.3f} | {te.get('sensitivity', 0):.3f}"
                                 f" | {te.get('specificity', 0):.3f} |")
            lines.append("")
    others = others or []
    if others:
        lines += ["## Other looks at the test split", "",
                  "Figures on the test split that are not a recipe row above (paired differences, the "
                  "out-of-distribution check's refusals, single images); each counts as a look.", "",
                  "| date | what | run | command | figure |", "|---|---|---|---|---|"]
        lines += [f"| {o['date']} | {o['what']} | {o['run']} | `{o['command']}` | {o['figure']} |" for o in others]
        lines.append("")
    lines.insert(2, f"Looks at the test split so far: {looks + len(others)} ({looks} model x recipe rows with a test "
                    f"figure, {len(others)} other looks listed at the end).\n")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--record", help="a finished run folder (with model_card.json) to add as a new looks file")
    ap.add_argument("--name", default="run")
    ap.add_argument("--lever", default="")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.record:
        from recipes import record_run

        existing = sorted((HERE / "recipes").glob("looks-*.json"))
        path = HERE / "recipes" / f"looks-{len(existing) + 1}-{args.name}.json"
        path.write_text(json.dumps(record_run(Path(args.record), args.name, args.lever, args.device), indent=1))
        print(f"wrote {path}")
    files = sorted((HERE / "recipes").glob("looks-*.json"), key=look_number)  # looks-10 after looks-9
    others = json.loads(OTHER_LOOKS.read_text()) if OTHER_LOOKS.exists() else []
    (HERE / "recipes.md").write_text(render(files, others))
    print(f"wrote {HERE / 'recipes.md'} from {len(files)} file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
