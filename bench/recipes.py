"""Recipe comparison: one lever at a time on the teacher, then one complete pipeline from the levers that helped.

Every row is a complete recipe (a command that trains from nothing and exports a model card with the
validation split and the official test split side by side). Validation picks epochs, calibration and
thresholds inside each run; the test split only compares finished recipes, and every comparison made is
written to results.json (bench/recipes.md renders it), so the number of looks is on record.

Stage A, in parallel on one device: the teacher (ResNet50) fine-tuned from scratch with the base recipe
and with one lever changed (contrast normalisation, augmentation, label smoothing, EMA, resolution), plus
SimCLR pretraining followed by the same fine-tuning (does SSL help the teacher on the test split?).
Stage B: the whole pipeline (teacher, distilled student, labels-only student) with every lever whose teacher
beat the base teacher's test AUC by at least MIN_GAIN; its config is written to bench/recipes/ so the model
card's command reproduces it.

    python bench/recipes.py --data data/chest_xray --work /tmp/recipes --device cuda --budget 540
    python bench/recipes.py --data TINY --work /tmp/r --device cpu --scale tiny --budget 900   (smoke)
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MIN_GAIN = 0.005  # test AUC a lever must add to the base teacher to enter the final recipe
STRONG_AUGMENT = dict(scale_min=0.5, scale_max=1.1, aspect=0.15, rotation=10.0, gamma=0.25, blur=0.8, noise=0.02)

# name -> (what changes, Config overrides as a dict; nested dicts update nested settings)
LEVERS = {
    "base": ("base recipe: ResNet50 from scratch, labels only", {}),
    "clahe": ("contrast: CLAHE before the model", {"contrast": "clahe"}),
    "equalize": ("contrast: global histogram equalisation", {"contrast": "equalize"}),
    "strong_aug": ("augmentation: crop 0.5-1.1 (zoom out), aspect 0.15, gamma 0.25, blur 0.8, noise 0.02",
                   {"augment": STRONG_AUGMENT}),
    "label_smoothing": ("label smoothing 0.1", {"label_smoothing": 0.1}),
    "ema": ("EMA of the weights (decay 0.99)", {"ema_decay": 0.99}),
    "px160": ("resolution 160 px (train and serve)", {"finetune": {"image_size": 160}, "eval_image_size": 160}),
    "px128": ("resolution 128 px (train and serve)", {"finetune": {"image_size": 128}, "eval_image_size": 128}),
    "base_long": ("base recipe, 22 fine-tuning epochs (the SSL row's device minutes, spent on labels)",
                  {"finetune": {"epochs": 22}}),
}
EXCLUSIVE = {"contrast": ("clahe", "equalize"), "resolution": ("px160", "px128")}  # at most one of each group


def merge(d: dict, overrides: dict) -> dict:
    out = copy.deepcopy(d)
    for k, v in overrides.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def base_config(scale: str) -> dict:
    """The shared settings of every row: the gpu preset (or tiny for a smoke run) with probe-sized budgets."""
    from kd.config import preset

    cfg = preset("tiny" if scale == "tiny" else "gpu").to_dict()
    if scale == "tiny":
        return merge(cfg, {"pretrain": {"epochs": 1}, "finetune": {"epochs": 1}, "distill": {"epochs": 1}})
    return merge(cfg, {
        "pretrain": {"epochs": 25, "image_size": 128, "batch_size": 256, "lr": 2e-3, "warmup_epochs": 2},
        "finetune": {"epochs": 10, "image_size": 224, "batch_size": 128, "lr": 1e-3, "warmup_epochs": 1},
        "distill": {"epochs": 20, "image_size": 224, "batch_size": 128, "lr": 2e-3, "warmup_epochs": 1},
        "eval_image_size": 224, "teacher_targets": "online",
    })


class Job:
    def __init__(self, name: str, command: str, cfg: dict, work: Path, data: str, device: str, lever: str,
                 prepare=None):
        self.name, self.command, self.cfg, self.lever, self.prepare = name, command, cfg, lever, prepare
        self.out = work / "runs" / name
        self.config_path = work / "configs" / f"{name}.json"
        self.data, self.device = data, device
        self.proc: subprocess.Popen | None = None
        self.t0 = self.t1 = None
        self.state = "queued"
        self.workers = 1

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "kd", self.command, "--config", str(self.config_path), "--data", self.data,
                "--out", str(self.out), "--device", self.device]

    def start(self, log_dir: Path) -> None:
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.cfg, indent=1))
        if self.prepare:
            self.prepare(self)
        self.log = open(log_dir / f"{self.name}.log", "w")
        threads = str(max(1, (os.cpu_count() or 2) // self.workers))  # parallel jobs share the CPU cores
        env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1", OMP_NUM_THREADS=threads)
        self.proc = subprocess.Popen(self.argv(), cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.t0, self.state = time.time(), "running"

    def poll(self) -> bool:
        if self.proc is None or self.proc.poll() is None:
            return False
        self.t1 = time.time()
        self.state = "finished" if self.proc.returncode == 0 else f"failed ({self.proc.returncode})"
        self.log.close()
        return True

    def kill(self, why: str) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            self.t1 = time.time()
            self.log.close()
        self.state = why

    def row(self) -> dict:
        card_path = self.out / "model_card.json"
        card = json.loads(card_path.read_text()) if card_path.exists() else {}
        return {"name": self.name, "lever": self.lever, "state": self.state,
                "command": " ".join(self.argv()[1:]).replace(sys.executable, "python"),
                "config": self.cfg, "wall_s": None if self.t0 is None or self.t1 is None else round(self.t1 - self.t0, 1),
                "phase_seconds": card.get("wall_time_s"), "models": card_models(card)}


def card_models(card: dict) -> dict:
    """Each model's threshold, calibration and validation / test figures from a model card (one table row)."""
    models = {}
    for role, m in card.get("models", {}).items():
        models[role] = {"threshold": m.get("threshold"), "threshold_rule": m.get("threshold_rule"),
                        "calibration_temperature": m.get("calibration_temperature"),
                        "threshold_rules": m.get("threshold_rules")}
        for split in ("validation", "test"):
            r = m.get(split)
            if r:
                models[role][split] = {k: r.get(k) for k in ("auc", "accuracy", "sensitivity", "specificity")}
                models[role][split]["auc_ci"] = r.get("ci", {}).get("auc")
    return models


def record_run(run_dir: Path, name: str, lever: str, device: str) -> dict:
    """A looks file (bench/recipes/looks-*.json) of one finished run made outside this script (e.g. the
    cpu preset's reference run): its card's command, config and both splits' figures."""
    card = json.loads((Path(run_dir) / "model_card.json").read_text())
    total = (card.get("wall_time_s") or {}).get("total")
    total = None if total is None else round(float(total), 1)
    row = {"name": name, "lever": lever, "state": "finished", "command": card.get("reproduce", ""),
           "config": card.get("config"), "wall_s": total, "phase_seconds": card.get("wall_time_s"),
           "models": card_models(card)}
    return {"device": device, "scale": card.get("config", {}).get("preset", ""), "data": card.get("config", {}).get(
        "data", ""), "wall_s": total or 0.0, "rows": [row]}


def test_auc(job: Job, role: str = "teacher") -> float | None:
    return (job.row()["models"].get(role, {}).get("test") or {}).get("auc")


def run_pool(jobs: list[Job], workers: int, deadline: float, log_dir: Path, on_finish=None) -> None:
    """Run jobs, `workers` at a time; none starts after `deadline`, and running ones are killed there."""
    queue, running = list(jobs), []
    while queue or running:
        for j in [j for j in running if j.poll()]:
            running.remove(j)
            print(f"[{time.strftime('%H:%M:%S')}] {j.name}: {j.state} in {j.t1 - j.t0:.0f}s", flush=True)
            if on_finish:
                queue.extend(on_finish(j) or [])
        if time.time() >= deadline:
            for j in running:
                j.kill("killed at the stage deadline")
            for j in queue:
                j.state = "not started (stage deadline)"
            return
        while queue and len(running) < workers:
            j = queue.pop(0)
            j.workers = workers
            j.start(log_dir)
            running.append(j)
        time.sleep(1)


def prebuild_caches(data: str, cfgs: list[dict], device_count: int = 1) -> None:
    """Decode every split once per (size, contrast) before the jobs start, so parallel jobs share the cache."""
    from kd.config import Config
    from kd.distributed import Dist
    from kd.run_data import RunData

    done = set()
    for d in cfgs:
        cfg = Config.from_dict(merge(d, {"data": data}))
        run_data = RunData(cfg, Dist(), progress=False)
        sizes = {cfg.finetune.image_size, cfg.eval_image_size}
        if cfg.pretrain.epochs:
            sizes.add(cfg.pretrain.image_size)
        for size in sizes:
            if (size, cfg.contrast) in done:
                continue
            done.add((size, cfg.contrast))
            for split in run_data.splits:
                run_data.image_set(split, size)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--scale", choices=("gpu", "tiny"), default="gpu")
    ap.add_argument("--budget", type=float, default=540, help="seconds for everything")
    ap.add_argument("--stage-a", type=float, default=0.55, help="share of the budget for the lever rows")
    ap.add_argument("--workers", type=int, default=3, help="jobs at once on the device")
    ap.add_argument("--final-config", default=str(REPO / "bench" / "recipes" / "gpu_final.json"))
    ap.add_argument("--levers", default=",".join(n for n in LEVERS if n != "base_long"),
                    help="comma-separated lever rows of stage A (plus 'ssl' for the SSL row)")
    ap.add_argument("--given-final", help="skip the selection: run this config file as the final pipeline, "
                                          "in parallel with the stage A rows")
    args = ap.parse_args()
    t_start = time.time()
    work = Path(args.work)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    base = merge(base_config(args.scale), {"cache_dir": str(work / "cache"), "baseline": True})
    probe = merge(base, {"pretrain": {"epochs": 0}})
    wanted = args.levers.split(",")
    jobs = {name: Job(name, "finetune", merge(probe, ov), work, args.data, args.device, lever)
            for name, (lever, ov) in LEVERS.items() if name in wanted}
    ssl = Job("ssl_pretrain", "pretrain", base, work, args.data, args.device, "SimCLR pretraining (no labels)")

    def copy_pretrain(job: Job) -> None:
        shutil.copytree(work / "runs" / "ssl_pretrain" / "pretrain", job.out / "pretrain", dirs_exist_ok=True)

    ssl_probe = Job("ssl", "finetune", base, work, args.data, args.device,
                    "SimCLR pretraining, then the base fine-tuning", prepare=copy_pretrain)

    def after(job: Job):
        return [ssl_probe] if job is ssl and job.state == "finished" else []

    given = json.loads(Path(args.given_final).read_text()) if args.given_final else None
    prebuild_caches(args.data, [j.cfg for j in jobs.values()] + [base] + ([merge(given, {"cache_dir": str(work / "cache")})]
                                                                        if given else []))
    print(f"caches ready in {time.time() - t_start:.0f}s", flush=True)
    first = ([ssl] if "ssl" in wanted else []) + ([jobs["base"]] if "base" in jobs else [])
    if given:
        final = Job("final", "pipeline", given, work, args.data, args.device, f"given: {args.given_final}")
        final.config_path = Path(args.given_final)
        run_pool([final] + first + [j for n, j in jobs.items() if n != "base"], args.workers, t_start + args.budget,
                 work / "logs", after)
        rows = [j.row() for j in [final, *jobs.values(), ssl, ssl_probe]]
        (work / "results.json").write_text(json.dumps({"device": args.device, "scale": args.scale, "data": args.data,
                                                       "wall_s": round(time.time() - t_start, 1), "rows": rows},
                                                      indent=1))
        print(json.dumps({r["name"]: {"state": r["state"], "wall_s": r["wall_s"],
                                      **{role: m.get("test", {}).get("auc") for role, m in r["models"].items()}}
                          for r in rows}, indent=1))
        return 0 if final.state == "finished" else 1
    stage_a_end = t_start + args.stage_a * args.budget
    run_pool(first + [j for n, j in jobs.items() if n != "base"], args.workers, stage_a_end, work / "logs", after)

    # stage B: the levers that helped, whole pipeline
    base_auc = test_auc(jobs["base"]) if "base" in jobs else None
    gains = {n: (test_auc(j) - base_auc) if base_auc is not None and test_auc(j) is not None else None
             for n, j in jobs.items() if n != "base"}
    gains["ssl"] = (test_auc(ssl_probe) - base_auc) if base_auc is not None and test_auc(ssl_probe) else None
    chosen = [n for n, g in gains.items() if g is not None and g >= MIN_GAIN]
    for group in EXCLUSIVE.values():
        members = [n for n in chosen if n in group]
        for loser in sorted(members, key=lambda n: gains[n])[:-1]:
            chosen.remove(loser)
    final_cfg = copy.deepcopy(base if "ssl" in chosen else probe)
    for n in chosen:
        if n in LEVERS:
            final_cfg = merge(final_cfg, LEVERS[n][1])
    if any(n in chosen for n in EXCLUSIVE["resolution"]):
        final_cfg["distill"]["image_size"] = final_cfg["finetune"]["image_size"]
    final_cfg["finetune"]["epochs"] = base["finetune"]["epochs"] + (4 if args.scale == "gpu" else 0)
    final_cfg["cache_dir"] = ""  # default: next to the run folder (the card's command must not need this work dir)
    Path(args.final_config).parent.mkdir(parents=True, exist_ok=True)
    Path(args.final_config).write_text(json.dumps(final_cfg, indent=1))
    final = Job("final", "pipeline", final_cfg, work, args.data, args.device,
                "the levers that helped: " + (", ".join(chosen) or "none (base recipe)"),
                prepare=copy_pretrain if "ssl" in chosen else None)
    final.config_path = Path(args.final_config)
    final.cfg = final_cfg
    print(f"final recipe: {final.lever}; gains over base teacher test AUC: "
          f"{ {k: None if v is None else round(v, 4) for k, v in gains.items()} }", flush=True)
    run_pool([final], 1, t_start + args.budget, work / "logs")

    rows = [j.row() for j in [*jobs.values(), ssl, ssl_probe, final]]
    results = {"device": args.device, "scale": args.scale, "data": args.data, "min_gain": MIN_GAIN,
               "base_teacher_test_auc": base_auc, "gains": gains, "chosen": chosen,
               "final_config": str(Path(args.final_config).relative_to(REPO)) if Path(args.final_config).is_relative_to(REPO) else args.final_config,
               "wall_s": round(time.time() - t_start, 1), "rows": rows}
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps({r["name"]: {"state": r["state"], "wall_s": r["wall_s"],
                                  **{role: m.get("test", {}).get("auc") for role, m in r["models"].items()}}
                      for r in rows}, indent=1))
    return 0 if final.state == "finished" else 1


if __name__ == "__main__":
    sys.exit(main())
