"""Re-encode a folder tree of X-rays as small grey JPEGs, so that it fits the 64 MiB a lent GPU call may carry.

The outside corpus (13,743 pictures, 160 MB at 256 px) is pretrained on at 64-96 px and Kermany's train split
(42 MB at 224 px) is trained on at the gpu preset's 160 px: stored at the longer side the training reads,
both travel (bench/gpu_prepare.sh with CORPUS set). Relative paths and file names are kept (a Kermany file's
name carries its patient), the aspect ratio is kept (the image cache makes each square as it does for the
originals), pictures already at or under the size are re-encoded only; a manifest.csv is copied with the
columns kd.data.unlabeled_provenance reads (file, source_repo, licence), so a model card still names every
source's licence.

    python bench/pack_images.py SRC DST [--side 96] [--quality 85]
"""
from __future__ import annotations

import argparse
import csv
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

PICTURES = (".jpeg", ".jpg", ".png")
MANIFEST_COLUMNS = ("file", "source_repo", "licence")


def pack_one(src: Path, dst: Path, side: int, quality: int) -> int:
    """Writes `dst` (grey JPEG, longer side at most `side`); returns its size in bytes."""
    with Image.open(src) as im:
        grey = im.convert("L")
    grey.thumbnail((side, side), Image.Resampling.LANCZOS)
    dst.parent.mkdir(parents=True, exist_ok=True)
    grey.save(dst, "JPEG", quality=quality)
    return dst.stat().st_size


def copy_manifest(src: Path, dst: Path, renamed: dict[str, str]) -> int:
    """manifest.csv with the columns kd reads, files renamed as packed (a PNG became a JPEG); returns its rows."""
    with open(src, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["file"] = renamed.get(r.get("file", ""), r.get("file", ""))
    with open(dst, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in MANIFEST_COLUMNS} for r in rows)
    return len(rows)


def pack(src: Path, dst: Path, side: int = 96, quality: int = 85, workers: int = 4) -> dict:
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in PICTURES)
    if not files:
        raise SystemExit(f"{src} holds no pictures ({', '.join(PICTURES)})")
    targets = [(dst / p.relative_to(src)).with_suffix(".jpeg") if p.suffix.lower() == ".png"
               else dst / p.relative_to(src) for p in files]
    with ThreadPoolExecutor(workers) as pool:
        sizes = list(pool.map(lambda pair: pack_one(*pair, side, quality), zip(files, targets)))
    renamed = {p.relative_to(src).as_posix(): t.relative_to(dst).as_posix() for p, t in zip(files, targets)}
    manifest = src / "manifest.csv"
    rows = copy_manifest(manifest, dst / "manifest.csv", renamed) if manifest.is_file() else 0
    return {"pictures": len(files), "bytes": sum(sizes), "manifest_rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--side", type=int, default=96, help="longer side in pixels")
    ap.add_argument("--quality", type=int, default=85, help="JPEG quality")
    args = ap.parse_args(argv)
    if args.dst.resolve().is_relative_to(args.src.resolve()):
        print(f"{args.dst} lies inside {args.src}: choose a folder outside it", file=sys.stderr)
        return 2
    done = pack(args.src, args.dst, args.side, args.quality)
    print(f"{done['pictures']} pictures -> {args.dst} at {args.side} px: {done['bytes'] / 1e6:.1f} MB"
          + (f", manifest.csv with {done['manifest_rows']} rows" if done["manifest_rows"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
