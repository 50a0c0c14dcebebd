"""Where a heat map comes from (kd.cam.CAM_OPTIONS): its native grid, the default chosen by
bench/cam_grid.py, and the border-mass share that bench reports."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kd import cam, preprocess
from kd.serving import load_pair
from kd.model_card import read_card
from kd.models import build
from kd.paths import SHIPPED_WEIGHTS


def test_border_share_of_plain_maps():
    assert cam.border_share(np.ones((160, 160))) == pytest.approx(1 - 0.8 ** 2)  # uniform: 0.36
    assert cam.border_share(np.ones((100, 50))) == pytest.approx(1 - (80 * 40) / (100 * 50))
    centre = np.zeros((160, 160))
    centre[16:144, 16:144] = 1
    assert cam.border_share(centre) == 0.0
    corner = np.zeros((160, 160))
    corner[0, 0] = 3
    assert cam.border_share(corner) == 1.0
    assert cam.border_share(np.zeros((160, 160))) is None  # an empty map has no mass to share


def test_border_share_is_the_mass_on_the_outer_tenth():
    m = np.random.default_rng(0).random((160, 160))
    outer = np.ones((160, 160), bool)
    outer[16:144, 16:144] = False
    assert cam.border_share(m) == pytest.approx(m[outer].sum() / m.sum())


@pytest.mark.parametrize("size", [160, 128, 224, 100])
def test_native_grid_is_the_feature_map_of_the_stages_used(size):
    model = build("resnet18").eval()
    sides = {"input": size}  # an input-gradient map's grid is the input's
    hooks = [getattr(model, name).register_forward_hook(lambda m, i, o, name=name: sides.__setitem__(name, o.shape[-1]))
             for name in cam.STAGE_HALVINGS if name != "input"]
    with torch.no_grad():
        model(torch.zeros(1, 1, size, size))
    for h in hooks:
        h.remove()
    for option in cam.CAM_OPTIONS.values():
        assert option.grid(size) == max(sides[layer] for layer in option.layers)
    assert cam.CAM_OPTIONS["layer4 GradCAM"].grid(160) == 5 and cam.CAM_OPTIONS["layer2 LayerCAM"].grid(160) == 20


def test_the_default_map_has_a_native_grid_of_at_least_14x14_at_the_shipped_size():
    size = read_card(SHIPPED_WEIGHTS).input.size
    option = cam.CAM_OPTIONS[cam.DEFAULT_CAM]
    assert option.grid(size) >= 14, option.source(size)
    assert f"{option.grid(size)}x{option.grid(size)}" in option.source(size)


def test_smoothgrad_of_a_linear_score_is_its_weights():
    """cam.SmoothGrad against plain math: the gradient of sum(w * x) is w whatever noise is added, so the map is
    |w| / max |w|; the logits it keeps are the clean input's."""
    w = torch.randn(1, 12, 12, generator=torch.Generator().manual_seed(0))

    class Linear(torch.nn.Module):
        def forward(self, x):
            score = (x * w).sum((1, 2, 3))
            return torch.stack([-score, score], 1)

    x = torch.randn(2, 1, 12, 12)
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with cam.SmoothGrad(Linear()) as smooth:
        maps = smooth(x, [ClassifierOutputTarget(1)] * 2)
    expected = (w.abs() / w.abs().max())[0].numpy()
    assert maps.shape == (2, 12, 12) and np.allclose(maps[0], expected, atol=1e-6) and np.allclose(maps[1], expected, atol=1e-6)
    assert torch.allclose(smooth.outputs, Linear()(x))
    assert cam.CAM_OPTIONS["input SmoothGrad"].grid(160) == 160


def test_hirescam_maps_are_scaled_by_their_99th_percentile(kd_tiny, monkeypatch):
    """A map of a few sharp peaks is drawn scaled by its 99th percentile, not its one highest value, so the rest
    of it shows on the overlay; the same map otherwise (a monotone change: ROAD reads the same ranking)."""
    import dataclasses

    from tests.fixtures.xray_fixtures import jpeg_bytes, xray_like_array

    pair = load_pair(kd_tiny.weights)
    square, _ = pair.prepare(jpeg_bytes(xray_like_array(128, 128, seed=4)))
    loaded = pair.models["teacher"]
    _, robust = cam.explain(loaded, preprocess.to_tensor(square), "layer1 HiResCAM")
    plain_option = dataclasses.replace(cam.CAM_OPTIONS["layer1 HiResCAM"], robust_scale=False)
    monkeypatch.setitem(cam.CAM_OPTIONS, "layer1 HiResCAM", plain_option)
    _, plain = cam.explain(loaded, preprocess.to_tensor(square), "layer1 HiResCAM")
    assert np.allclose(robust, np.clip(plain / np.percentile(plain, 99), 0, 1), atol=1e-5)
    assert (robust >= 1 - 1e-6).mean() >= 0.01 and robust.mean() > plain.mean()


def test_plain_method_names_still_mean_layer4():
    assert cam.cam_option("GradCAM") == cam.CamOption("GradCAM", ("layer4",))
    assert cam.cam_option("GradCAM++").layers == ("layer4",)
    with pytest.raises(ValueError, match="Unknown CAM method"):
        cam.cam_option("layer9 GradCAM")


@pytest.mark.parametrize("option", list(cam.CAM_OPTIONS))
def test_every_option_gives_a_map_of_the_input_size(kd_tiny, option):
    from tests.fixtures.xray_fixtures import jpeg_bytes, xray_like_array

    pair = load_pair(kd_tiny.weights)
    square, _ = pair.prepare(jpeg_bytes(xray_like_array(128, 128, seed=4)))
    for loaded in pair.models.values():
        p, m = cam.explain(loaded, preprocess.to_tensor(square), option)
        assert 0.0 <= p <= 1.0 and m.shape == square.shape
        assert m.min() >= 0.0 and m.max() <= 1.0 + 1e-6


def test_cam_grid_bench_measures_every_option(kd_tiny, capsys):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import cam_grid

    out = cam_grid.main(["--weights", str(kd_tiny.weights), "--data", str(kd_tiny.data), "--limit", "2",
                         "--road-limit", "2", "--percentiles", "50", "--threads", "1"])
    assert set(out["results"]) == set(cam.CAM_OPTIONS) and out["chosen"] in cam.CAM_OPTIONS
    assert "| layer2 GradCAM |" in capsys.readouterr().out


def test_cam_grid_reports_the_in_lung_share_and_merges_an_earlier_run(kd_tiny, tmp_path, capsys):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import cam_grid

    common = ["--weights", str(kd_tiny.weights), "--data", str(kd_tiny.data), "--limit", "2", "--road-limit", "1",
              "--percentiles", "50", "--threads", "1"]
    first = cam_grid.main(common + ["--options", "layer2 GradCAM", "--json", str(tmp_path / "a.json")])
    r = first["results"]["layer2 GradCAM"]
    assert 0 < first["uniform_in_lung_share"] < 1 and len(r["teacher"]["lung"]) == 2
    assert r["teacher"]["lung_mean"] is None or 0 <= r["teacher"]["lung_mean"] <= 1
    assert r["correlation"] is None or -1 <= r["correlation"] <= 1
    assert 0 < first["uniform_in_core_share"] <= first["uniform_in_lung_share"]  # the core lies inside the mask
    for role in ("teacher", "student"):
        for grown, core in zip(r[role]["lung"], r[role]["lung_core"]):
            assert (grown is None) == (core is None) and (core is None or core <= grown + 1e-9)
    merged = cam_grid.main(common + ["--options", "layer2 LayerCAM", "--merge", str(tmp_path / "a.json")])
    assert set(merged["results"]) == {"layer2 GradCAM", "layer2 LayerCAM"}
    assert "in-lung share" in capsys.readouterr().out


def test_cam_grid_takes_road_from_an_earlier_run_to_measure_the_masks_alone(kd_tiny, tmp_path, monkeypatch):
    """--road-from: the maps and their in-lung shares are measured again, ROAD is the earlier run's (the metric is
    never called); an option the earlier run lacks is refused by name."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import cam_grid

    common = ["--weights", str(kd_tiny.weights), "--data", str(kd_tiny.data), "--limit", "2", "--road-limit", "2",
              "--percentiles", "50", "--threads", "1", "--options", "layer2 GradCAM"]
    first = cam_grid.main(common + ["--json", str(tmp_path / "a.json")])

    def no_road(*args, **kwargs):
        raise AssertionError("ROAD was measured again")

    monkeypatch.setattr(cam_grid.road.ROADCombined, "__call__", no_road)
    again = cam_grid.main(common + ["--road-from", str(tmp_path / "a.json")])
    for role in ("teacher", "student"):
        before, after = first["results"]["layer2 GradCAM"][role], again["results"]["layer2 GradCAM"][role]
        assert after["road"] == before["road"] and after["road_mean"] == before["road_mean"]
        assert after["lung"] == before["lung"]
    with pytest.raises(SystemExit, match="no ROAD for layer2 LayerCAM"):
        cam_grid.main(common[:-1] + ["layer2 LayerCAM", "--road-from", str(tmp_path / "a.json")])


def test_gradient_in_lungs_is_the_share_of_the_score_sensitivity_on_the_lungs(kd_tiny):
    """cam_grid.gradient_in_lungs against plain math: a score linear in the pixels, sum(w * x), has input gradient
    w, so its energy inside the mask is sum(w^2 * mask) / sum(w^2) (after the input normalisation's scale, the
    same on every pixel); and the bench reports it per model."""
    import sys
    import threading
    from types import SimpleNamespace

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import cam_grid

    rng = np.random.default_rng(0)
    w = torch.from_numpy(rng.normal(size=(16, 16)).astype(np.float32))

    class Linear(torch.nn.Module):
        def forward(self, x):
            score = (x[:, 0] * w).sum((1, 2))
            return torch.stack([torch.zeros_like(score), score], 1)  # PNEUMONIA margin = score

    squares = rng.integers(0, 255, size=(5, 16, 16), dtype=np.uint8)
    masks = [(rng.random((16, 16)) > 0.6).astype(np.float32) for _ in range(5)]
    loaded = SimpleNamespace(model=Linear(), lock=threading.Lock())
    expected = np.mean([float(((w ** 2) * torch.from_numpy(m)).sum() / (w ** 2).sum()) for m in masks])
    assert cam_grid.gradient_in_lungs(loaded, squares, masks, batch=2) == pytest.approx(expected, rel=1e-5)
    out = cam_grid.main(["--weights", str(kd_tiny.weights), "--data", str(kd_tiny.data), "--limit", "2",
                         "--road-limit", "1", "--percentiles", "50", "--threads", "1", "--options", "layer2 GradCAM"])
    assert set(out["gradient_in_lungs"]) == {"teacher", "student"}
    assert all(0 <= v <= 1 for v in out["gradient_in_lungs"].values())


def test_the_choice_is_the_most_in_lung_map_that_still_explains_the_score():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import cam_grid

    def option(grid, road, lung):
        return {"grid": grid, **{role: {"road_mean": road[i], "lung_mean": lung[i]}
                                 for i, role in enumerate(("teacher", "student"))}}

    results = {"coarse": option(5, (0.3, 0.3), (0.5, 0.5)),  # most on the lungs, but a 5x5 grid
               "unfaithful": option(20, (0.2, -0.01), (0.4, 0.4)),  # on the lungs, but ROAD <= 0 for the student
               "plain": option(20, (0.3, 0.1), (0.10, 0.10)),
               "near": option(20, (0.4, 0.2), (0.095, 0.095))}  # within 0.01 of the best share: higher ROAD wins
    best, why = cam_grid.choose(results, 160)
    assert best == "near" and "in-lung share" in why


def test_cam_montage_draws_the_samples_with_their_lung_masks(kd_tiny, tmp_path, capsys):
    import sys

    from tests.fixtures.xray_fixtures import add_opacities, jpeg_bytes, xray_like_array

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import cam_montage

    for label, arr in (("NORMAL", xray_like_array(300, 280, seed=1)), ("PNEUMONIA", add_opacities(xray_like_array(300, 280, seed=2)))):
        (tmp_path / "samples" / label).mkdir(parents=True)
        (tmp_path / "samples" / label / f"{label}.jpeg").write_bytes(jpeg_bytes(arr))
    means = cam_montage.main(["--weights", str(kd_tiny.weights), "--samples", str(tmp_path / "samples"),
                              "--out", str(tmp_path / "m.jpg")])
    assert (tmp_path / "m.jpg").stat().st_size > 0 and set(means) == {"NORMAL", "PNEUMONIA"}
    assert "in-lung share" in capsys.readouterr().out


def test_cam_montage_draws_training_xrays_with_their_lung_masks(tmp_path):
    """--lung-masks: a row of training X-rays, the core tinted deeper than what growing added, the rest grey."""
    import random
    import sys

    from PIL import Image

    from kd import preprocess
    from kd.lungs import SIZE, core_mask, lung_mask
    from tests.fixtures.xray_fixtures import jpeg_bytes, xray_like_array

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import cam_montage

    arrays = [xray_like_array(256, 256, seed=i, rim=0.0) for i in range(8)]
    for i, arr in enumerate(arrays):
        folder = tmp_path / "train" / ("NORMAL", "PNEUMONIA")[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"x{i}.jpeg").write_bytes(jpeg_bytes(arr))
    cam_montage.lung_mask_grid(str(tmp_path), 8, str(tmp_path / "masks.png"))
    grid = np.asarray(Image.open(tmp_path / "masks.png")).astype(int)
    assert grid.shape == (SIZE, 8 * SIZE, 3)
    redness = grid[..., 0] - grid[..., 1]
    assert (np.abs(redness) <= 2).mean() > 0.6  # most of it grey
    files = sorted(str(f) for f in (tmp_path / "train").glob("*/*.jpeg"))
    random.Random(11).shuffle(files)  # the grid's own order (its default seed)
    for i, f in enumerate(files):
        px = preprocess.load_xray_file(f, target_size=256).pixels
        core, grown = core_mask(px), lung_mask(px)
        tile = redness[:, i * SIZE:(i + 1) * SIZE]
        assert core.any() and (grown & ~core).any()
        assert tile[core].mean() > tile[grown & ~core].mean() + 20 > tile[~grown].mean() + 40


def test_integrated_gradients_add_up_to_the_scores_rise_from_the_blurred_image():
    """cam.IntegratedGradients against plain math: for a score quadratic in the pixels, sum(w * x^2), the path's
    midpoints integrate the gradient exactly, so each pixel's share is w * (x^2 - b^2) for the blurred image b, and
    the shares add up to score(x) - score(b) (completeness)."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    w = torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(1)).double()

    class Quadratic(torch.nn.Module):
        def forward(self, x):
            score = (w * x * x).sum((1, 2, 3))
            return torch.stack([-score, score], 1)

    x = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(2)).double()
    ig = cam.IntegratedGradients(Quadratic())
    b = ig.blur(x)
    shares = ig.attributions(x, ClassifierOutputTarget(1))
    assert torch.allclose(shares, (w * (x * x - b * b))[0, 0], atol=1e-10)
    assert torch.isclose(shares.sum(), Quadratic()(x)[0, 1] - Quadratic()(b)[0, 1], atol=1e-9)
    assert not torch.allclose(b, x)


@pytest.mark.parametrize("method, option, quiet_from", [
    (cam.IntegratedGradients, "input IntegratedGradients", 36),  # its pooling blur reaches 4 px past the half
    (cam.Occlusion, "input Occlusion", 40),  # patches of 8 px reaching into the left half start before column 32
])
def test_an_input_map_draws_the_pixels_that_raise_the_score(method, option, quiet_from):
    """Integrated gradients' map is the positive part of the shares pooled by the blur; occlusion's, the positive
    drops of the patches; both scaled to [0, 1]. A score that rises with the brightness of the left half only
    lights the left half's patch, never the right half's."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    class LeftHalf(torch.nn.Module):
        def forward(self, x):
            score = x[..., :, :32].pow(2).sum((1, 2, 3))
            return torch.stack([-score, score], 1)

    x = torch.zeros(1, 1, 64, 64)
    x[..., 20:44, 8:24] = 1.0  # a bright patch on the left
    x[..., 20:44, 40:56] = 1.0  # and one on the right
    with method(LeftHalf()) as m:
        maps = m(x, [ClassifierOutputTarget(1)])
    assert maps.shape == (1, 64, 64) and maps.max() == pytest.approx(1.0) and maps.min() >= 0
    assert maps[0, :, :32].sum() > 0 and maps[0, :, quiet_from:].sum() == 0
    assert torch.allclose(m.outputs, LeftHalf()(x))
    assert cam.CAM_OPTIONS[option].grid(160) == 160


def test_occlusion_is_the_mean_score_drop_of_the_patches_over_each_pixel():
    """cam.Occlusion against plain math: for a linear score sum(w * x), replacing patch P by the blurred copy f
    drops the score by sum over P of w * (x - f); each pixel's value is the mean of the positive drops of the
    patches that cover it, patches half a patch apart with the last one at the edge."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    w = torch.randn(1, 1, 20, 20, generator=torch.Generator().manual_seed(3)).double()

    class Linear(torch.nn.Module):
        def forward(self, x):
            score = (w * x).sum((1, 2, 3))
            return torch.stack([-score, score], 1)

    x = torch.randn(1, 1, 20, 20, generator=torch.Generator().manual_seed(4)).double()
    occlusion = cam.Occlusion(Linear())
    occlusion.patch_fraction = 0.25  # patches of 5 px, 2 px apart: starts 0, 2, ..., 14 and 15 at the edge
    patch, corners = occlusion.patches(20)
    assert patch == 5 and sorted({r for r, _ in corners}) == [0, 2, 4, 6, 8, 10, 12, 14, 15]
    f = occlusion.fill(x, patch)
    expected, count = np.zeros((20, 20)), np.zeros((20, 20))
    for r, c in corners:
        drop = float((w * (x - f))[0, 0, r:r + patch, c:c + patch].sum())
        expected[r:r + patch, c:c + patch] += max(drop, 0.0)
        count[r:r + patch, c:c + patch] += 1
    got = occlusion.image_map(x, ClassifierOutputTarget(1))
    assert np.allclose(got.numpy(), expected / count, atol=1e-9) and got.max() > 0


def test_corner_bench_blurs_only_the_corners_and_reports_each_model(kd_tiny, capsys):
    """bench/corners.py: the top (or bottom) two corners, a fifth of the side each, become Occlusion's fill and
    nothing else changes; on the tiny weights it reports AUC and margin changes for teacher and student."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import corners

    x = torch.randn(2, 1, 40, 40, generator=torch.Generator().manual_seed(5))
    top = corners.blurred_corners(x, "top")
    fill = cam.Occlusion.fill(x, 5)  # 40 / 8
    changed = (top != x).any(0)[0]
    assert changed[:8, :8].all() and changed[:8, 32:].all() and not changed[8:].any() and not changed[:, 8:32].any()
    assert torch.equal(top[..., :8, :8], fill[..., :8, :8])
    assert not (corners.blurred_corners(x, "bottom") != x).any(0)[0][:32].any()
    out = corners.main(["--weights", str(kd_tiny.weights), "--data", str(kd_tiny.data)])
    assert set(out) == {"teacher", "student"}
    for role in out.values():
        assert set(role) == {"plain", *corners.REGIONS} and all(0 <= r["auc"] <= 1 for r in role.values())
    assert "bottom corners blurred (control)" in capsys.readouterr().out
