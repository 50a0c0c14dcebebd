"""Where the lung fields of a frontal chest X-ray are, from the picture's own intensity profiles.

A heat map that explains a pneumonia score should put its mass on the lungs, not on the mediastinum, the
diaphragm, the chest wall or the film's "R" marker. To measure that (bench/cam_grid.py's in-lung share) the
lung fields are needed, and Kermany's images come without masks, so they are estimated from two profiles of
the stretched square the models see (SIZE px, histogram-equalised, blurred):

1. Columns (mean over the middle half of the rows): the mediastinum and spine are the bright peak near the
   middle; each lung is the darkest valley within 30 % of the width on either side of it. A lung's inner edge
   is where the profile climbs half-way from its valley to the peak; its outer edge where it climbs half-way
   to the brightest column beyond it (the chest wall), or the image edge.
2. Rows (mean over those lung columns): the darkest row between 20 % and 70 % of the height is inside the
   lungs; the apex and the diaphragm are where the profile climbs half-way to the brightest row above and
   below it. A box shorter than 35 % of the height (a hazy film) falls back to rows 12-78 %.
3. Inside the two boxes, the darker three quarters of the pixels, closed over gaps of a rib's width: the
   ribs and vessels inside a lung stay in, the bright soft tissue that a box overlaps drops out. This is the
   conservative core (`core_mask`): half-way edges leave out the lateral lung, the costophrenic angles and the
   lung beside the heart, about a third of each lung on real X-rays.
4. Grown from the core (`lung_mask`, what the app outlines and the benchmarks measure on): around each lung's box
   (a tenth of the side down and outward, less up and towards the midline, never past the chest wall's brightest
   column), the pixels no brighter than the core's brighter tenth (its ribs) and no darker than four fifths of its
   darkest hundredth (the air outside the body is darker than any lung), connected to the core. A lung whose
   growth would be more than GROWN_AT_MOST times its core (a leak into the neck or past the body) keeps its core.

It is a rough estimate (drawn from the image's own profiles and grey levels, no model, no ground-truth masks):
on the generated X-rays of tests.fixtures, whose lungs are known ellipses, at least 95 % of the mask lies inside the lungs
(tests/test_lungs.py); 32 real training X-rays with their masks, core and grown: bench/figures/lung_masks.jpg.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

SIZE = 128  # px of the square the profiles are read on
VALLEY_REACH = 0.30  # a lung's darkest column lies within this share of the width from the midline peak
MEDIASTINUM_GAP = 0.06  # share of the width next to the peak that is never a lung's valley
MIN_HEIGHT = 0.35  # a lung box shorter than this share of the height falls back to FALLBACK_ROWS
FALLBACK_ROWS = (0.12, 0.78)
DARK_SHARE = 0.75  # the darker share of a box's pixels kept in the core
GROW_OUT, GROW_DOWN, GROW_UP, GROW_IN = 0.12, 0.10, 0.04, 0.03  # how far past its box a lung may grow (share of side)
BRIGHTEST, DARKEST, AIR = 90, 1, 0.8  # grown pixels lie between AIR x the core's DARKEST and its BRIGHTEST percentile
GROWN_AT_MOST = 2.5  # a lung grown to more than this many times its core is a leak: the core is kept


def _smooth(values: np.ndarray, width: float) -> np.ndarray:
    k = max(1, int(width)) | 1
    return np.convolve(np.pad(values, k // 2, mode="edge"), np.ones(k) / k, mode="valid")


def _climb(profile: np.ndarray, start: int, stop: int, step: int, level: float) -> int:
    """From `start` towards `stop`, the first index where the profile reaches `level` (or `stop`)."""
    i = start
    while i != stop and profile[i] < level:
        i += step
    return i


def _square(pixels: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).resize(
        (size, size), Image.Resampling.BILINEAR))


def prepared(pixels: np.ndarray, size: int = SIZE, equalise: bool = True) -> np.ndarray:
    """The X-ray stretched to size x size (as the models see it), equalised and blurred, as float32. Unequalised,
    grey levels keep their ratios: air outside the body stays far darker than any lung. An already stretched
    uint8 square is used as it is."""
    import cv2

    square = pixels if pixels.shape == (size, size) and pixels.dtype == np.uint8 else _square(pixels, size)
    return cv2.GaussianBlur(cv2.equalizeHist(square) if equalise else square, (0, 0), size / 64).astype(np.float32)


def _column_profile(img: np.ndarray) -> np.ndarray:
    """Mean grey level of each column over the middle half of the rows, smoothed: the mediastinum's peak, the lungs'
    valleys and the chest walls' peaks."""
    n = img.shape[0]
    return _smooth(img[n // 4:3 * n // 4].mean(0), n / 16)


def lung_boxes(img: np.ndarray) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(top, bottom) rows and the (left, right) column spans of the two lung boxes of a `prepared` square."""
    n = img.shape[0]
    cols = _column_profile(img)
    peak = n * 35 // 100 + int(np.argmax(cols[n * 35 // 100:n * 65 // 100]))
    gap, reach = int(MEDIASTINUM_GAP * n), int(VALLEY_REACH * n)
    lo = max(0, peak - reach)
    left_valley = lo + int(np.argmin(cols[lo:max(lo + 1, peak - gap)]))
    right_valley = peak + gap + int(np.argmin(cols[peak + gap:max(peak + gap + 1, min(n, peak + reach))]))
    left = (_climb(cols, left_valley, 0, -1, (cols[left_valley] + cols[:left_valley + 1].max()) / 2),
            _climb(cols, left_valley, peak, 1, (cols[peak] + cols[left_valley]) / 2))
    right = (_climb(cols, right_valley, peak, -1, (cols[peak] + cols[right_valley]) / 2),
             _climb(cols, right_valley, n - 1, 1, (cols[right_valley] + cols[right_valley:].max()) / 2) + 1)
    inside = np.zeros(n, bool)
    inside[left[0]:left[1]] = inside[right[0]:right[1]] = True
    rows = _smooth(img[:, inside].mean(1) if inside.any() else img.mean(1), n / 16)
    middle = n // 5 + int(np.argmin(rows[n // 5:n * 7 // 10]))
    top = _climb(rows, middle, 0, -1, (rows[middle] + rows[:middle + 1].max()) / 2)
    bottom = _climb(rows, middle, n - 1, 1, (rows[middle] + rows[middle:].max()) / 2)
    if bottom - top < MIN_HEIGHT * n:
        top, bottom = int(FALLBACK_ROWS[0] * n), int(FALLBACK_ROWS[1] * n)
    return (top, bottom), left, right


def _core(img: np.ndarray, boxes) -> np.ndarray:
    import cv2

    (top, bottom), left, right = boxes
    box = np.zeros(img.shape, bool)
    box[top:bottom, left[0]:left[1]] = True
    box[top:bottom, right[0]:right[1]] = True
    if not box.any():
        return box
    dark = box & (img <= np.percentile(img[box], 100 * DARK_SHARE))
    rib = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (max(3, img.shape[0] // 18) | 1,) * 2)
    return cv2.morphologyEx(dark.astype(np.uint8), cv2.MORPH_CLOSE, rib).astype(bool) & box


def core_mask(pixels: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Boolean [size, size] conservative core of the lung fields (steps 1-3 of the module docstring): inside the
    lungs, about two thirds of them."""
    img = prepared(pixels, size)
    return _core(img, lung_boxes(img))


def lung_mask(pixels: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Boolean [size, size] mask of the lung fields of a grey X-ray (any shape, stretched to the square): the core
    grown to the lung's lateral edge, base and medial border (step 4 of the module docstring)."""
    import cv2

    square = _square(pixels, size)  # stretched once, read twice
    img, raw = prepared(square, size), prepared(square, size, equalise=False)
    boxes = lung_boxes(img)
    core = _core(img, boxes)
    (top, bottom), left, right = boxes
    n = size
    cols = _column_profile(img)
    walls = (int(np.argmax(cols[:left[0]])) if left[0] > 0 else 0,  # the chest walls' brightest columns
             right[1] + int(np.argmax(cols[right[1]:])) if right[1] < n else n)
    out, inward = int(GROW_OUT * n), int(GROW_IN * n)
    grown = np.zeros_like(core)
    for (c0, c1), (to_left, to_right) in ((left, (out, inward)), (right, (inward, out))):
        lung = core.copy()
        lung[:, :c0] = lung[:, c1:] = False
        if not lung.any():
            continue
        region = np.zeros_like(core)
        region[max(0, top - int(GROW_UP * n)):min(n, bottom + int(GROW_DOWN * n)),
               max(walls[0], c0 - to_left):min(walls[1], c1 + to_right)] = True
        grey = raw[lung]
        near = region & (raw <= np.percentile(grey, BRIGHTEST)) & (raw >= AIR * np.percentile(grey, DARKEST))
        near = cv2.morphologyEx(near.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
        _, labels = cv2.connectedComponents(near, connectivity=4)
        touching = np.unique(labels[lung & (near > 0)])
        reached = np.isin(labels, touching[touching > 0]) | lung
        grown |= reached if reached.sum() <= GROWN_AT_MOST * lung.sum() else lung
    smooth = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (max(3, n // 18) | 1,) * 2)
    return cv2.morphologyEx(grown.astype(np.uint8), cv2.MORPH_CLOSE, smooth).astype(bool)


def in_lung_share(cam: np.ndarray, mask: np.ndarray) -> float | None:
    """Share of a heat map's mass inside the mask (the map resized to the mask's grid); None for an empty map.
    A map spread evenly over the image scores the mask's area share (`mask.mean()`)."""
    cam = np.nan_to_num(np.asarray(cam, dtype=np.float32)).clip(0, None)
    if cam.shape != mask.shape:
        cam = np.asarray(Image.fromarray(cam).resize(mask.shape[::-1], Image.Resampling.BILINEAR)).clip(0, None)
    total = float(cam.sum())
    return None if total <= 1e-9 else float(cam[mask].sum() / total)


def outline(mask: np.ndarray, shape: tuple[int, int], width: int = 2) -> np.ndarray:
    """Boolean [h, w] border of the mask drawn on a picture of `shape` (the mask stretched to it, as the maps are):
    the pixels inside the mask within `width` px of its edge. What the app and the montage outline the lung fields
    with."""
    from PIL import ImageFilter

    h, w = shape
    inside = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)) > 127
    eroded = np.asarray(Image.fromarray(inside.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(2 * width + 1)))
    return inside & (eroded < 128)
