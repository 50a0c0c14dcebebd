"""Pictures that are not chest radiographs, as file bytes: what the out-of-distribution check (kd.ood)
must refuse. Shared by tests/test_ood.py and bench/ood.py; deterministic, generated in memory."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from kd.testing.xray_fixtures import jpeg_bytes, png_bytes


def text_page(h: int = 700, w: int = 500, step: int = 18) -> np.ndarray:
    """A typed page: dark lines of words every `step` px on light paper."""
    page = Image.new("L", (w, h), 245)
    draw = ImageDraw.Draw(page)
    rng = np.random.default_rng(0)
    words = ["chest", "fever", "cough", "admitted", "report", "findings", "radiograph", "the", "with"]
    for y in range(40, h - 40, step):
        draw.text((30, y), " ".join(rng.choice(words, 12)), fill=20)
    return np.asarray(page)


def photo(size: int = 256, seed: int = 5) -> np.ndarray:
    """A grey 'photograph': shaded discs on a lit, textured background; no anatomy."""
    rng = np.random.default_rng(seed)
    v, u = np.mgrid[0:size, 0:size] / size
    img = 90 + 60 * u + 20 * np.sin(v * 20)
    for _ in range(6):
        cu, cv, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.2)
        img = np.where((u - cu) ** 2 + (v - cv) ** 2 < r * r, rng.uniform(0, 255) - 40 * v, img)
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


def non_xrays(xray: np.ndarray, size: int = 256) -> dict[str, bytes]:
    """File name -> bytes: blank pictures, patterns, noise, a text page, photographs, and `xray` (a 2-D
    uint8 chest X-ray) inverted and turned."""
    rng = np.random.default_rng(1)
    grid = np.indices((size, size))
    return {
        "black.png": png_bytes(np.zeros((size, size), np.uint8)),
        "white.png": png_bytes(np.full((size, size), 255, np.uint8)),
        "grey.jpeg": jpeg_bytes(np.full((size, size), 128, np.uint8)),
        "checkerboard.png": png_bytes((grid // (size // 8)).sum(0).astype(np.uint8) % 2 * 255),
        "text_page.jpeg": jpeg_bytes(text_page()),
        "uniform_noise.png": png_bytes(rng.integers(0, 256, (size, size)).astype(np.uint8)),
        "grey_noise.jpeg": jpeg_bytes(np.clip(rng.normal(128, 30, (size, size)), 0, 255).astype(np.uint8)),
        "grey_photo.jpeg": jpeg_bytes(photo(size)),
        "colour_photo.jpeg": jpeg_bytes(np.stack([photo(size), photo(size)[::-1], photo(size)[:, ::-1]], axis=-1)),
        "inverted_xray.jpeg": jpeg_bytes(255 - xray),
        "rotated_xray.jpeg": jpeg_bytes(np.rot90(xray).copy()),
        "upside_down_xray.jpeg": jpeg_bytes(np.rot90(xray, 2).copy()),
    }
