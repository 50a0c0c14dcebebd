"""What the out-of-distribution check (kd/ood.py) refuses, with the shipped weights and their fitted check.

    python bench/ood.py [--limit 400] [--extra FILE ...]

- X-rays: how many of the patient-level validation split's (where the threshold was set) and of the
  test split's X-rays are refused (at most --limit of each, a seeded sample; the test split is the
  external check: counted, nothing is set on it).
- Not X-rays: tests.fixtures.non_xrays (blank pictures, a checkerboard, noise, a text page, photographs, and
  a full-resolution X-ray from fullres_samples inverted and turned), matplotlib's sample pictures when
  installed (a photograph, a logo, an MRI slice, a terrain map), and any --extra files; plus that X-ray
  as is, mirrored, tilted by 15 degrees and cropped to its centre, to show where the line falls.
Each picture gets its verdict, which check refused it and its distance as a multiple of the threshold.

--compare asks which features the check should use, with the same weights: for each teacher stage (layer3,
layer4) and number of exact covariance directions, the check is fitted on (a seeded sample of) the training
split, its threshold set on validation as `kd fit-ood` does; the rule that picks kd.ood.FEATURE_STAGE /
COMPONENTS is the widest gap between the threshold and the nearest of the non-X-ray pictures, among the
options that refuse them all (validation and those pictures only). Test refusals are printed as the
external check, not used to choose.
"""
from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import common
from kd.data import samples_for
from kd.serving import load_pair
from kd import ood
from kd.ood import image_reason
from kd.preprocess import ImageError
from tests.fixtures.non_xrays import non_xrays
from tests.fixtures.xray_fixtures import jpeg_bytes, png_bytes


def matplotlib_pictures() -> dict[str, bytes]:
    try:
        import matplotlib
    except ImportError:
        return {}
    d = Path(matplotlib.__file__).parent / "mpl-data" / "sample_data"
    out = {}
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png"):
        if (d / name).exists():
            out[f"matplotlib {name}"] = (d / name).read_bytes()
    if (d / "s1045.ima.gz").exists():
        mri = np.frombuffer(gzip.open(d / "s1045.ima.gz").read(), np.uint16).reshape(256, 256)
        out["matplotlib s1045.ima (MRI slice)"] = png_bytes((mri / mri.max() * 255).astype(np.uint8))
    if (d / "jacksboro_fault_dem.npz").exists():
        dem = np.load(d / "jacksboro_fault_dem.npz")["elevation"]
        out["matplotlib jacksboro_fault_dem (terrain)"] = png_bytes(((dem - dem.min()) / np.ptp(dem) * 255)
                                                                    .astype(np.uint8))
    return out


def turned_xrays(xray: np.ndarray) -> dict[str, bytes]:
    h, w = xray.shape
    return {"X-ray as is": jpeg_bytes(xray), "X-ray mirrored left-right": jpeg_bytes(xray[:, ::-1].copy()),
            "X-ray tilted 15 degrees, black corners": jpeg_bytes(np.asarray(Image.fromarray(xray).rotate(15))),
            "X-ray tilted 15 degrees, corners in its median grey": jpeg_bytes(np.asarray(
                Image.fromarray(xray).rotate(15, fillcolor=int(np.median(xray))))),
            "X-ray centre crop (half the width and height)": jpeg_bytes(xray[h // 4:3 * h // 4, w // 4:3 * w // 4]
                                                                        .copy())}


def load_xray_array(path: str) -> np.ndarray:
    if path:
        return np.asarray(Image.open(path).convert("L"))
    from tests.fixtures.xray_fixtures import xray_like_array

    return xray_like_array(1024, 1024)


def all_pictures(xray: np.ndarray, extra=()) -> dict[str, bytes]:
    return {**non_xrays(xray), **matplotlib_pictures(), **{Path(f).name: Path(f).read_bytes() for f in extra},
            **turned_xrays(xray)}


# X-rays among the pictures: accepted by a good check (a mirrored X-ray, a tilt with the corners filled)
STILL_XRAYS = ("X-ray as is", "X-ray mirrored left-right", "X-ray tilted 15 degrees, corners in its median grey")


def compare(args) -> None:
    from kd.data import load_splits

    pair = load_pair(args.weights, ood=False)
    teacher, size, contrast = pair.models["teacher"].model, pair.input_size, pair.contrast
    splits = load_splits(args.data, *pair.card.config.split)
    train = splits["train"]
    if len(train) > args.train_limit:
        train = [train[i] for i in sorted(np.random.default_rng(0).choice(len(train), args.train_limit, replace=False))]

    def squares(samples):
        return ood.prepared_squares(samples, size, contrast, progress=False)

    pictures = all_pictures(load_xray_array(args.xray), args.extra)
    junk_names = [n for n in pictures if n not in STILL_XRAYS]
    sets = {"train": squares(train), "val": squares(splits["val"]), "test": squares(splits.get("test", [])),
            "pictures": np.stack([pair.prepare(pictures[n], n)[0] for n in junk_names])}
    print(f"fitted on {len(sets['train'])} training X-rays; threshold {ood.threshold_words()}; "
          f"{len(junk_names)} non-X-ray pictures\n")
    print("| stage | directions | nearest non-X-ray / threshold | non-X-rays accepted | validation refused | "
          "test refused (external) |\n|---|---|---|---|---|---|")
    for stage in ("layer3", "layer4"):
        feats = {k: ood.embeddings(teacher, v, stage).numpy() for k, v in sets.items()}
        for components in (64, 512):
            distance, _ = ood.EmbeddingDistance.fit(feats["train"], components)
            d = {k: distance(torch.from_numpy(v)).numpy() for k, v in feats.items() if len(v)}
            threshold = ood.validation_threshold(d["val"])
            nearest = int(np.argmin(d["pictures"]))
            test = f"{int((d['test'] > threshold).sum())} of {len(d['test'])}" if "test" in d else "-"
            print(f"| {stage} | {components} | {d['pictures'][nearest] / threshold:.2f} ({junk_names[nearest]}) | "
                  f"{int((d['pictures'] <= threshold).sum())} | {int((d['val'] > threshold).sum())} of {len(d['val'])} | "
                  f"{test} |", flush=True)


def split_refusals(pair, data: str, split: str, limit: int) -> str:
    samples = samples_for(data, split, *pair.card.config.split)
    if len(samples) > limit:
        samples = [samples[i] for i in sorted(np.random.default_rng(0).choice(len(samples), limit, replace=False))]
    squares = ood.prepared_squares(samples, pair.input_size, pair.contrast, progress=False)
    distances = pair.ood.distances(pair.models["teacher"].model, squares)
    r = ood.refusal_counts(squares, distances, pair.ood.threshold)
    return (f"{split:5}: {r['refused']} of {r['n']} X-rays refused ({r['fraction']:.2%}; {r['by_image_statistics']} "
            f"by image statistics); largest distance {distances.max() / pair.ood.threshold:.2f}x the threshold")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(common.SHARED / "chest_xray"))
    p.add_argument("--xray", default=str(next(iter(sorted((common.SHARED / "fullres_samples" / "NORMAL").glob("*"))),
                                              "")), help="a full-resolution X-ray to invert and turn")
    p.add_argument("--weights", default=str(common.REPO / "weights"))
    p.add_argument("--limit", type=int, default=400, help="X-rays per split at most")
    p.add_argument("--extra", nargs="*", default=[], help="more pictures to judge")
    p.add_argument("--compare", action="store_true", help="compare feature stages and covariance sizes (above)")
    p.add_argument("--train-limit", type=int, default=1500, help="--compare: training X-rays the options are fitted on")
    args = p.parse_args(argv)
    if args.compare:
        return compare(args)
    pair = load_pair(args.weights)
    if pair.ood is None:
        raise SystemExit(f"{args.weights} has no out-of-distribution check: run `python -m kd fit-ood` first")
    print(f"threshold {pair.ood.threshold:.1f} ({pair.ood.info.get('threshold_rule', '')})")
    if Path(args.data).exists():
        for split in ("val", "test"):
            print(split_refusals(pair, args.data, split, args.limit), flush=True)
    pictures = all_pictures(load_xray_array(args.xray), args.extra)
    print("\n| picture | verdict | refused by | distance / threshold |\n|---|---|---|---|")
    for name, data in pictures.items():
        try:
            square, _ = pair.prepare(data, name)
        except ImageError as e:
            print(f"| {name} | unreadable | {e} | - |")
            continue
        ratio = float(pair.ood.distances(pair.models["teacher"].model, square[None])[0] / pair.ood.threshold)
        by = "image statistics" if image_reason(square) else "embedding distance" if ratio > 1 else "-"
        print(f"| {name} | {'refused' if by != '-' else 'accepted'} | {by} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
