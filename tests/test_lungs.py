"""The lung-field estimate (kd.lungs) against generated X-rays whose lungs are known ellipses, and the in-lung
share of a heat map against plain arithmetic."""
from __future__ import annotations

import numpy as np
import pytest

from kd import lungs
from kd.lungs import SIZE, in_lung_share, lung_mask
from tests.fixtures.xray_fixtures import LUNG_RADII, LUNGS, _unit_grid, xray_like_array


def true_lungs(size: int = SIZE) -> np.ndarray:
    v, u = _unit_grid(size, size)
    inside = np.zeros((size, size), bool)
    for cu, cv in LUNGS:
        inside |= ((u - cu) / LUNG_RADII[0]) ** 2 + ((v - cv) / LUNG_RADII[1]) ** 2 < 1
    return inside


@pytest.mark.parametrize("shape, seed", [((256, 256), 0), ((300, 240), 1), ((64, 64), 2), ((180, 260), 3)])
def test_the_mask_lies_in_the_lungs_and_covers_most_of_them(shape, seed):
    mask, lungs = lung_mask(xray_like_array(*shape, seed=seed)), true_lungs()
    assert mask.shape == (SIZE, SIZE)
    assert (mask & lungs).sum() / mask.sum() >= 0.95  # precision: the mask is lung
    assert (mask & lungs).sum() / lungs.sum() >= 0.5  # coverage
    left, right = mask[:, :SIZE // 2].sum(), mask[:, SIZE // 2:].sum()
    assert min(left, right) / max(left, right) > 0.6  # both lungs, not one
    assert not mask[:, SIZE // 2 - 4:SIZE // 2 + 4].any()  # never the spine


def test_a_flat_picture_gets_a_mask_without_failing():
    mask = lung_mask(np.full((100, 100), 128, np.uint8))
    assert mask.shape == (SIZE, SIZE) and mask.dtype == bool


def test_in_lung_share_is_the_maps_mass_inside_the_mask():
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True
    cam = np.arange(16, dtype=np.float32).reshape(4, 4)
    assert in_lung_share(cam, mask) == pytest.approx((5 + 6 + 9 + 10) / cam.sum())
    assert in_lung_share(np.ones((4, 4)), mask) == pytest.approx(mask.mean())  # a uniform map: the area share
    assert in_lung_share(np.zeros((4, 4)), mask) is None  # an empty map has no share
    spine = np.zeros((SIZE, SIZE), np.float32)
    spine[:, SIZE // 2 - 3:SIZE // 2 + 3] = 1
    real = lung_mask(xray_like_array(256, 256, seed=4))
    assert in_lung_share(spine, real) == 0.0
    assert in_lung_share(real.astype(np.float32)[::4, ::4], real) > 0.8  # another grid: resized onto the mask


def test_the_outline_is_the_masks_edge_stretched_to_the_picture():
    mask = np.zeros((8, 8), bool)
    mask[2:6, 1:4] = True
    edge = lungs.outline(mask, (80, 160), width=2)
    assert edge.shape == (80, 160)
    inside = np.zeros((80, 160), bool)
    inside[20:60, 20:80] = True  # the mask stretched: 10 px a row, 20 px a column
    ring = inside.copy()
    ring[22:58, 22:78] = False
    assert (edge == ring).all()
    assert not lungs.outline(np.zeros((8, 8), bool), (16, 16)).any()
