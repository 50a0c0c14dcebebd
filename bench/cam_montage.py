"""The 24 full-resolution samples as Diagnose draws them, with the lung fields outlined: where the maps fall.

    python bench/cam_montage.py [--method "layer2 GradCAM"] [--role teacher] [--out bench/figures/fullres_maps.jpg]

Each tile is one sample through the app's path (kd.serving.diagnose: the refusal check, then both models), its
map drawn faded by the model's probability (the Diagnose default), the kd.lungs mask outlined in white, and
under it the class, the probability and the map's in-lung share (a uniform map scores the mask's area, shown
after the slash). Prints one line per sample and the means per class. The samples are training images
(fullres_samples/ holds 24 original-resolution train files), so the probabilities are optimistic; the point
is where the maps lie.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import common
from kd import cam, preprocess, serving
from kd.serving import NotChestXray, load_pair
from kd.lungs import core_mask, in_lung_share, lung_mask, outline

TILE = 224


def tile(d: serving.Diagnosis, role: str, mask: np.ndarray) -> np.ndarray:
    view = d.views[role]
    square = np.asarray(Image.fromarray(d.square).resize((TILE, TILE)))
    heat = np.asarray(Image.fromarray(view.cam.astype(np.float32)).resize((TILE, TILE), Image.Resampling.BILINEAR))
    rgb = cam.overlay(square, heat, 0.5, cam.fade_strength(view.probability))
    rgb = rgb.copy()
    rgb[outline(mask, (TILE, TILE), width=1)] = 255
    return rgb


def lung_mask_grid(data: str, n: int, out: str, seed: int = 11) -> None:
    """`n` seeded training images with their kd.lungs masks in red, the conservative core (kd.lungs.core_mask)
    deeper than what growing added: how the estimate looks on real X-rays."""
    import random

    files = sorted(str(f) for f in Path(data, "train").glob("*/*.jpeg"))
    random.Random(seed).shuffle(files)
    tiles = []
    for f in files[:n]:
        px = preprocess.load_xray_file(f, target_size=256).pixels
        mask, core = lung_mask(px), core_mask(px)
        square = np.asarray(Image.fromarray(px).resize(mask.shape[::-1]))
        rgb = np.repeat(square[..., None], 3, axis=2).astype(np.float32)
        for region, share in ((mask & ~core, 0.35), (core, 0.6)):
            rgb[region] = (1 - share) * rgb[region] + share * np.array([255.0, 0.0, 0.0])
        tiles.append(rgb.astype(np.uint8))
    cols = 8
    grid = np.concatenate([np.concatenate(tiles[i:i + cols], 1) for i in range(0, len(tiles) - cols + 1, cols)], 0)
    Image.fromarray(grid).save(out, quality=88)
    print(f"wrote {out}: {len(tiles)} training X-rays with their lung masks")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default=cam.DEFAULT_CAM, choices=list(cam.CAM_OPTIONS))
    p.add_argument("--role", default="teacher", choices=["teacher", "student"])
    p.add_argument("--weights", default=str(common.REPO / "weights"))
    p.add_argument("--samples", default=str(common.SHARED / "fullres_samples"))
    p.add_argument("--out", default=str(common.REPO / "bench" / "figures" / "fullres_maps.jpg"))
    p.add_argument("--lung-masks", type=int, metavar="N", help="instead: N seeded training X-rays with their lung "
                   "masks, to bench/figures/lung_masks.jpg")
    p.add_argument("--data", default=str(common.SHARED / "chest_xray"))
    args = p.parse_args(argv)
    if args.lung_masks:
        lung_mask_grid(args.data, args.lung_masks, str(common.REPO / "bench" / "figures" / "lung_masks.jpg"))
        return {}
    pair = load_pair(args.weights)
    files = sorted(Path(args.samples).glob("*/*"))
    tiles, shares = [], {"NORMAL": [], "PNEUMONIA": []}
    for f in files:
        try:
            d = serving.diagnose(pair, f.read_bytes(), f.name, args.method)
        except (NotChestXray, preprocess.ImageError) as e:
            print(f"{f.parent.name:9} {f.name:40} refused or unreadable: {e}")
            continue
        mask = lung_mask(d.square)
        share, view = in_lung_share(d.views[args.role].cam, mask), d.views[args.role]
        shares[f.parent.name].append(share)
        label = f"{f.parent.name[:4]} p={view.probability:.2f} lungs {'-' if share is None else f'{share:.2f}'}/{mask.mean():.2f}"
        print(f"{f.parent.name:9} {f.name:40} p={view.probability:.3f} in-lung share "
              f"{'-' if share is None else f'{share:.3f}'} (uniform {mask.mean():.3f})")
        img = Image.fromarray(tile(d, args.role, mask))
        canvas = Image.new("RGB", (TILE, TILE + 16), "black")
        canvas.paste(img, (0, 0))
        ImageDraw.Draw(canvas).text((4, TILE + 2), label, fill="white")
        tiles.append(np.asarray(canvas))
    cols = 6
    while len(tiles) % cols:
        tiles.append(np.zeros_like(tiles[0]))
    grid = np.concatenate([np.concatenate(tiles[i:i + cols], 1) for i in range(0, len(tiles), cols)], 0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(args.out, quality=88)
    means = {k: float(np.mean([s for s in v if s is not None])) if v else None for k, v in shares.items()}
    print(f"{args.role}, {cam.cam_option(args.method).source(pair.input_size)}: mean in-lung share NORMAL "
          f"{means['NORMAL']}, PNEUMONIA {means['PNEUMONIA']}; wrote {args.out}")
    return means


if __name__ == "__main__":
    main()
