"""Does a model's score rest on the film's corners? The laterality marker ("R") and the hospital's text sit in the
top corners of these X-rays, and occlusion maps (kd.cam.Occlusion) light them on some pneumonia cases: a shortcut
a clinician should know about. This blurs both top corners (each a fifth of the side, the fill kd.cam.Occlusion
uses), or, as a control of the same area, both bottom corners, and prints each model's AUC and the mean change of
its PNEUMONIA logit margin per class.

    python bench/corners.py [--weights weights] [--split val]

A shortcut would show as a fall in the margin of PNEUMONIA images (the marker's evidence removed) larger than the
control's, and in the AUC. Validation by default; the test half only as a recorded look (bench/recipes.md).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

import common
from kd import cam, preprocess
from kd.cache import build_cache
from kd.data import samples_for
from kd.objectives import pneumonia_margin
from kd.serving import load_pair

CORNER_FRACTION = 1 / 5
REGIONS = {"top corners blurred": ("top",), "bottom corners blurred (control)": ("bottom",)}


def blurred_corners(x: torch.Tensor, rows: str) -> torch.Tensor:
    """x [N, 1, S, S] with the two corners of the top or bottom rows replaced by kd.cam.Occlusion's fill."""
    side = x.shape[-1]
    c = max(1, round(CORNER_FRACTION * side))
    filled = cam.Occlusion.fill(x, cam.Occlusion.patch_side(side, cam.Occlusion.patch_fraction))
    out = x.clone()
    r = slice(0, c) if rows == "top" else slice(side - c, side)
    for cols in (slice(0, c), slice(side - c, side)):
        out[..., r, cols] = filled[..., r, cols]
    return out


@torch.inference_mode()
def margins(model: torch.nn.Module, x: torch.Tensor, batch: int = 64) -> np.ndarray:
    logits = torch.cat([model(x[i:i + batch].contiguous(memory_format=torch.channels_last)).float()
                        for i in range(0, len(x), batch)])
    return pneumonia_margin(logits).numpy()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=str(common.REPO / "weights"))
    p.add_argument("--data", default=str(common.SHARED / "chest_xray"))
    p.add_argument("--split", default="val", choices=["val", "test"])
    args = p.parse_args(argv)
    pair = load_pair(args.weights, ood=False)
    samples = samples_for(args.data, args.split, *pair.card.config.split)
    cache = build_cache([s.path for s in samples], pair.input_size, None, progress=False, contrast=pair.contrast)
    labels = np.array([s.label for s, ok in zip(samples, cache.valid) if ok])
    x = torch.cat([preprocess.to_tensor(square) for square in np.asarray(cache.images[cache.valid])])
    print(f"{len(labels)} {args.split} images ({int(labels.sum())} PNEUMONIA) at {pair.input_size} px; corners of "
          f"{CORNER_FRACTION:.0%} of the side blurred")
    variants = {name: blurred_corners(x, rows) for name, (rows,) in REGIONS.items()}
    out = {}
    for role, loaded in pair.models.items():
        plain = margins(loaded.model, x)
        out[role] = {"plain": {"auc": float(roc_auc_score(labels, plain)), "NORMAL": float(plain[labels == 0].mean()),
                               "PNEUMONIA": float(plain[labels == 1].mean())}}
        print(f"  {role:16} plain AUC {out[role]['plain']['auc']:.4f}; mean PNEUMONIA logit margin: NORMAL images "
              f"{out[role]['plain']['NORMAL']:+.2f}, PNEUMONIA images {out[role]['plain']['PNEUMONIA']:+.2f}")
        for name, v in variants.items():
            change = margins(loaded.model, v) - plain
            r = {"auc": float(roc_auc_score(labels, plain + change))}
            for label, cls in ((0, "NORMAL"), (1, "PNEUMONIA")):
                d = change[labels == label]
                r[cls] = float(d.mean())
                r[cls + "_sem"] = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
            out[role][name] = r
            print(f"  {role:16} {name:33} AUC {r['auc']:.4f}; PNEUMONIA logit margin change: NORMAL images "
                  f"{r['NORMAL']:+.3f} (±{r['NORMAL_sem']:.3f}), PNEUMONIA images {r['PNEUMONIA']:+.3f} "
                  f"(±{r['PNEUMONIA_sem']:.3f})")
    return out


if __name__ == "__main__":
    main()
