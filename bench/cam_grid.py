"""Which heat map to show: each kd.cam.CAM_OPTIONS entry (a method on one or several ResNet stages) measured
on validation X-rays with the shipped weights, for teacher and student.

    python bench/cam_grid.py [--limit 100] [--road-limit 24] [--options "layer4 GradCAM" ...] [--json out.json]

For each option: the native grid at the card's input size; ROAD faithfulness (Rong et al. 2022: the
pneumonia score's drop when the pixels the map calls unimportant are removed, minus its drop when the
important ones are; higher is more faithful; kd.cam.road_scores' metric, pytorch_grad_cam's ROADCombined);
the share of the map's mass inside the lung fields (kd.lungs.lung_mask: estimated from each image's own
intensity profiles and grey levels; a map spread evenly scores the mask's area, printed as "uniform"), and inside
their conservative core (kd.lungs.core_mask, the mask of the measurements before 2026-12-05); the share on the outer 10 % of
the image on every side (kd.cam.border_share; a uniform map has 0.36); how far the teacher's and the
student's maps of one image agree (Pearson correlation, kd.cam.agreement); and the CAM's time per image. Images: a seeded sample of the patient-level validation split
(the card's seed and fraction), PNEUMONIA and NORMAL alternately; border share on --limit of them, ROAD
(the expensive part) on the first --road-limit; every option sees the same images and the same
imputation noise. With --road-from, ROAD is taken from an earlier run's --json on the same images (it does not
depend on the lung mask), so a new mask can be measured at the cost of the maps alone. Per model, also the share of the score's input-gradient energy inside the lung fields (where
the score is sensitive, whatever the map; what Config.lung_gradient_weight trains).

The rule that picks kd.cam.DEFAULT_CAM (printed at the end; fixed before the in-lung shares were measured):
among the options whose native grid is at least 14x14 at the card's input size and whose ROAD is above zero for
both models, the one with the highest in-lung share averaged over teacher and student (within 0.01 of it, the
higher ROAD); if none qualifies, the highest in-lung share overall. A clinician reads a map as "where in the
lungs"; ROAD above zero keeps only maps that still explain the score. (The rule before the lung masks: the
best ROAD among options with less border mass than a uniform map.)

ROAD's noisy linear imputation solves a sparse system per image and percentile (most of the time here).
This script builds that system with vectorised code instead of pytorch_grad_cam's row-by-row one (the same
matrix and right-hand side, checked at start-up against the library's; the same solver and noise).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from scipy.sparse import coo_matrix, diags
from pytorch_grad_cam.metrics import road
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

import common
from kd import cam, preprocess
from kd.cache import build_cache
from kd.data import samples_for
from kd.serving import load_pair
from kd.losses import outside_lung_gradient_share
from kd.objectives import pneumonia_margin
from kd.lungs import core_mask, in_lung_share, lung_mask

UNIFORM_BORDER = 1 - (1 - 2 * 0.1) ** 2
GRID_GOAL = 14


def vectorised_system(mask, img, neighbors_weights):
    """pytorch_grad_cam.metrics.road.NoisyLinearImputer.setup_sparse_system, built with arrays."""
    h, w = mask.shape
    m = mask.ravel()
    flat = img.reshape((img.shape[0], -1))
    unknown = np.flatnonzero(m == 0)
    n = len(unknown)
    index = np.full(h * w, -1)
    index[unknown] = np.arange(n)
    r, c = unknown // w, unknown % w
    rows, cols, vals = [], [], []
    b = np.zeros((n, img.shape[0]))
    diagonal = np.zeros(n)
    for (dr, dc), weight in neighbors_weights:
        rr, cc = r + dr, c + dc
        inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        ids, nb = np.flatnonzero(inside), rr[inside] * w + cc[inside]
        diagonal[ids] -= weight
        known = m[nb] > 0.5
        b[ids[known], :] -= weight * flat[:, nb[known]].T
        rows.append(ids[~known])
        cols.append(index[nb[~known]])
        vals.append(np.full(int((~known).sum()), weight))
    a = coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    return (a.tocsr() + diags(diagonal)).tocsc(), b


def use_vectorised_system() -> None:
    rng = np.random.default_rng(0)
    mask, img = (rng.random((24, 20)) > 0.5).astype(np.float32), rng.normal(size=(1, 24, 20))
    a0, b0 = road.NoisyLinearImputer.setup_sparse_system(mask, img, road.neighbors_weights)
    a1, b1 = vectorised_system(mask, img, road.neighbors_weights)
    assert abs(a0.tocsc() - a1).max() < 1e-12 and np.abs(b0 - b1).max() < 1e-12, "not the library's system"
    road.NoisyLinearImputer.setup_sparse_system = staticmethod(vectorised_system)


def sample(data: str, card: dict, limit: int, seed: int = 0):
    samples = samples_for(data, "val", *card.config.split)
    rng = np.random.default_rng(seed)
    by_class = []
    for label, k in ((1, (limit + 1) // 2), (0, limit // 2)):
        pool = [s for s in samples if s.label == label]
        by_class.append([pool[i] for i in rng.choice(len(pool), min(k, len(pool)), replace=False)])
    pneumonia, normal = by_class
    return [s for pair in zip(pneumonia, normal) for s in pair] + pneumonia[len(normal):] + normal[len(pneumonia):]


def measure(loaded, squares: np.ndarray, option: str, road_limit: int, percentiles, masks: list[np.ndarray],
            cores: list[np.ndarray], batch: int = 8) -> dict:
    """In-lung share (inside `masks`, each square's kd.lungs.lung_mask, and inside `cores`, its core_mask) and
    border share of each image's map (None for an empty map) and CAM ms per image on all the squares; ROAD score on
    the first road_limit of them."""
    maps, borders, lungs, in_core, seconds = [], [], [], [], 0.0
    for square, mask, core in zip(squares, masks, cores):
        t0 = time.perf_counter()
        _, m = cam.explain(loaded, preprocess.to_tensor(square), option)
        seconds += time.perf_counter() - t0
        maps.append(m)
        borders.append(cam.border_share(m))
        lungs.append(in_lung_share(m, mask))
        in_core.append(in_lung_share(m, core))
    metric = road.ROADCombined(percentiles=list(percentiles))
    scores = []
    for start in range(0, min(road_limit, len(squares)), batch):
        stop = min(start + batch, road_limit, len(squares))
        x = torch.cat([preprocess.to_tensor(s) for s in squares[start:stop]])
        torch.manual_seed(start)  # the same imputation noise for every option
        with loaded.lock, torch.no_grad():
            s = metric(x, np.stack(maps[start:stop]), [ClassifierOutputSoftmaxTarget(cam.PNEUMONIA)] * len(x),
                       loaded.model)
        scores += np.asarray(s, dtype=np.float64).ravel().tolist()
    defined = [b for b in borders if b is not None]
    in_lungs, in_cores = [v for v in lungs if v is not None], [v for v in in_core if v is not None]
    return {"road": scores, "border": borders, "lung": lungs, "lung_core": in_core, "maps": maps,
            "road_mean": float(np.mean(scores)) if scores else None,
            "lung_mean": float(np.mean(in_lungs)) if in_lungs else None,
            "lung_core_mean": float(np.mean(in_cores)) if in_cores else None,
            "road_sem": float(np.std(scores, ddof=1) / np.sqrt(len(scores))) if len(scores) > 1 else 0.0,
            "border_mean": float(np.mean(defined)) if defined else None,
            "empty_maps": sum(b is None for b in borders), "cam_ms": 1000 * seconds / len(squares)}


def gradient_in_lungs(loaded, squares: np.ndarray, masks: list[np.ndarray], batch: int = 16) -> float:
    """Mean share of the served score's input-gradient energy inside the lung fields (1 - kd.losses.lung_gradient's
    share outside, of the PNEUMONIA logit margin): where the score is sensitive, whatever map a method draws, and
    what Config.lung_gradient_weight trains. Sensitivity spread evenly scores the masks' mean area."""
    total = 0.0
    for start in range(0, len(squares), batch):
        x = torch.cat([preprocess.to_tensor(s) for s in squares[start:start + batch]]).requires_grad_(True)
        lungs = torch.from_numpy(np.stack(masks[start:start + batch]).astype(np.float32))[:, None]
        lungs = torch.nn.functional.interpolate(lungs, size=x.shape[-2:], mode="nearest")  # kd.lungs' grid -> input
        with loaded.lock, torch.enable_grad():
            logits = loaded.model(x)
            outside = outside_lung_gradient_share(pneumonia_margin(logits), x, lungs,
                                                  create_graph=False)  # a measurement: no second-order graph
        total += (1.0 - outside.item()) * len(x)
    return total / len(squares)


ROLE_KEYS = ("teacher", "student")


def choose(results: dict, size: int) -> tuple[str, str]:
    """The rule in the module docstring: (option, why)."""
    def road_both(name):
        return float(np.mean([results[name][r]["road_mean"] for r in ROLE_KEYS if r in results[name]]))

    def lung_both(name):
        values = [results[name][r]["lung_mean"] for r in ROLE_KEYS if r in results[name]]
        return float(np.mean([v for v in values if v is not None])) if any(v is not None for v in values) else 0.0

    fine = [n for n in results if results[n]["grid"] >= GRID_GOAL
            and all(results[n][r]["road_mean"] > 0 for r in ROLE_KEYS if r in results[n])]
    pool = fine or list(results)
    top = max(lung_both(n) for n in pool)
    best = max((n for n in pool if lung_both(n) >= top - 0.01), key=road_both)
    if fine:
        return best, (f"highest mean in-lung share ({lung_both(best):.3f}; ROAD {road_both(best):+.4f}) among the "
                      f"options with a native grid >= {GRID_GOAL}x{GRID_GOAL} at {size} px and ROAD above zero "
                      "for both models")
    return best, "no option has a fine grid and a positive ROAD for both models: highest in-lung share overall"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=100, help="validation images for the border share (half PNEUMONIA, "
                   "half NORMAL)")
    p.add_argument("--road-limit", type=int, default=24, help="of which the first N (alternately PNEUMONIA and "
                   "NORMAL) also get ROAD: about 4 s of CPU per image, option and model")
    p.add_argument("--options", nargs="+", default=list(cam.CAM_OPTIONS), choices=list(cam.CAM_OPTIONS))
    p.add_argument("--roles", nargs="+", default=["teacher", "student"], choices=["teacher", "student"])
    p.add_argument("--percentiles", type=int, nargs="+", default=[20, 40, 60, 80])
    p.add_argument("--data", default=str(common.SHARED / "chest_xray"))
    p.add_argument("--weights", default=str(common.REPO / "weights"))
    p.add_argument("--json", help="write every score here")
    p.add_argument("--merge", help="a --json of an earlier run on the same images (same --limit, --road-limit, "
                   "percentiles and weights): its options not measured now join the table and the choice")
    p.add_argument("--road-from", help="a --json of an earlier run on the same images and weights: ROAD is taken "
                   "from it, not measured (to measure another lung mask at the cost of the maps alone)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="torch threads (1 on a busy machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    use_vectorised_system()
    pair = load_pair(args.weights, ood=False)
    size = pair.input_size
    picked = sample(args.data, pair.card, args.limit)
    cache = build_cache([s.path for s in picked], size, None, progress=False, contrast=pair.contrast)
    squares = np.asarray(cache.images[cache.valid])
    labels = np.array([s.label for s, ok in zip(picked, cache.valid) if ok])
    masks, cores = [lung_mask(square) for square in squares], [core_mask(square) for square in squares]
    uniform_lung, uniform_core = float(np.mean([m.mean() for m in masks])), float(np.mean([m.mean() for m in cores]))
    print(f"{len(squares)} validation images ({int(labels.sum())} PNEUMONIA) at {size} px, ROAD percentiles "
          f"{args.percentiles}; border = share of map mass on the outer 10% (uniform map: {UNIFORM_BORDER:.2f}); "
          f"lungs = share inside the lung fields (kd.lungs; uniform map: {uniform_lung:.3f}; inside their core: "
          f"{uniform_core:.3f})")
    evidence = {role: gradient_in_lungs(pair.models[role], squares, masks) for role in args.roles}
    print("  input-gradient energy of the score inside the lungs: "
          + ", ".join(f"{role} {v:.3f}" for role, v in evidence.items()), flush=True)
    earlier = {name: json.loads(Path(name).read_text()) for name in (args.merge, args.road_from) if name}
    for name, run in earlier.items():
        if (run["n"], run["input_size"], run["percentiles"]) != (len(squares), size, args.percentiles):
            raise SystemExit(f"{name} measured other images or settings: cannot be merged")
    road_from = earlier[args.road_from]["results"] if args.road_from else None
    if road_from and (missing := [o for o in args.options if o not in road_from]):
        raise SystemExit(f"--road-from {args.road_from} has no ROAD for {', '.join(missing)}")
    results = {}
    for option in args.options:
        grid = cam.CAM_OPTIONS[option].grid(size)
        results[option] = {"grid": grid}
        for role in args.roles:
            r = measure(pair.models[role], squares, option, 0 if road_from else args.road_limit, args.percentiles,
                        masks, cores)
            if road_from:
                r.update({k: road_from[option][role][k] for k in ("road", "road_mean", "road_sem")})
            pneumonia = labels[:len(r["road"])] == 1
            r["road_pneumonia"] = float(np.mean(np.asarray(r["road"])[pneumonia])) if pneumonia.any() else None
            results[option][role] = r
            print(f"  {option:22} {role:8} ROAD {r['road_mean']:+.4f} (±{r['road_sem']:.4f}) lungs "
                  f"{r['lung_mean'] if r['lung_mean'] is None else round(r['lung_mean'], 3)} core "
                  f"{r['lung_core_mean'] if r['lung_core_mean'] is None else round(r['lung_core_mean'], 3)} border "
                  f"{r['border_mean'] if r['border_mean'] is None else round(r['border_mean'], 3)} "
                  f"empty {r['empty_maps']} CAM {r['cam_ms']:.0f} ms/image", flush=True)
        if all(role in results[option] for role in ROLE_KEYS):
            pairs = [cam.agreement(t, s)["correlation"] for t, s in
                     zip(results[option]["teacher"]["maps"], results[option]["student"]["maps"])]
            results[option]["correlation"] = float(np.mean([c for c in pairs if c is not None])) \
                if any(c is not None for c in pairs) else None
        for role in args.roles:
            results[option][role].pop("maps")
    if args.merge:
        earlier = earlier[args.merge]
        results = {**{k: v for k, v in earlier["results"].items() if k not in results}, **results}
    n_road = min(args.road_limit, len(squares))
    roles = "/".join(args.roles)
    print(f"\n| option | native grid at {size} px | in-lung share ({roles}, {len(squares)} images; uniform "
          f"{uniform_lung:.3f}) | in the core (uniform {uniform_core:.3f}) | ROAD ({roles}, {n_road} images) | ROAD on PNEUMONIA | border share | teacher-student "
          "correlation | empty maps | CAM ms/image |\n|---|---|---|---|---|---|---|---|---|---|")
    for option, res in results.items():
        rs = [res[r] for r in args.roles]
        border = " / ".join("-" if r["border_mean"] is None else f"{r['border_mean']:.3f}" for r in rs)
        lungs = " / ".join("-" if r["lung_mean"] is None else f"{r['lung_mean']:.3f}" for r in rs)
        core = " / ".join("-" if r.get("lung_core_mean") is None else f"{r['lung_core_mean']:.3f}" for r in rs)
        corr = "-" if res.get("correlation") is None else f"{res['correlation']:.2f}"
        print(f"| {option} | {res['grid']}x{res['grid']} | {lungs} | {core} | "
              + " / ".join(f"{r['road_mean']:+.3f} ± {r['road_sem']:.3f}" for r in rs) + " | "
              + " / ".join("-" if r["road_pneumonia"] is None else f"{r['road_pneumonia']:+.3f}" for r in rs)
              + f" | {border} | {corr} | " + " / ".join(str(r["empty_maps"]) for r in rs) + " | "
              + " / ".join(f"{r['cam_ms']:.0f}" for r in rs) + " |")
    best, why = choose(results, size)
    print(f"\nchosen: {best} ({cam.CAM_OPTIONS[best].source(size)}): {why}; kd.cam.DEFAULT_CAM is "
          f"{cam.DEFAULT_CAM!r}")
    out = {"n": len(squares), "input_size": size, "percentiles": args.percentiles, "results": results,
           "uniform_in_lung_share": uniform_lung, "uniform_in_core_share": uniform_core, "gradient_in_lungs": evidence, "chosen": best, "rule": why}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
