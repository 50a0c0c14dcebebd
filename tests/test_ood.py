"""The out-of-distribution check (kd.ood): fitted by a command on a weights folder, it lets X-rays through
and refuses blank pictures, patterns, text, noise, photographs and turned X-rays with a reason, before
any probability; `kd predict` refuses such a file like an unreadable one (exit status 2)."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from kd import ood, preprocess
from kd.checkpoint import CheckpointError
from kd.cli import main
from kd.serving import load_pair, predict_bytes, screen_squares
from kd.model_card import read_card
from kd.preprocess import ImageError
from tests.fixtures.non_xrays import non_xrays, text_page
from tests.fixtures.xray_fixtures import jpeg_bytes, write_kermany_dataset, xray_like_array

XRAY = xray_like_array(256, 256, seed=77)
JUNK = non_xrays(XRAY)


def refusal(pair, square):
    """Why the refusal check refuses this prepared square, or None (kd.serving.screen_squares for one)."""
    return screen_squares(pair, square[None])[0][0]


@pytest.fixture(scope="module")
def fitted(served_tiny):
    """The tiny weights with the check fitted on a generated dataset of X-ray-like pictures (more images than
    the training set, so the validation split has some): conftest's `served_tiny`, built once per test run."""
    return served_tiny


def test_fit_writes_the_check_and_a_readable_card_section(fitted):
    weights, _ = fitted
    assert (weights / ood.OOD_FILE).exists()
    card = read_card(weights).document
    info = card[ood.CARD_KEY]
    assert info["command"].startswith("python -m kd fit-ood --weights")
    assert info["train_images"] > 0 and info["threshold"] > 0
    val = info["refused"]["validation"]
    assert val["refused"] <= ood.REFUSED_VALIDATION_SHARE * val["n"]  # the rule the threshold is set by
    assert load_pair(weights).ood.threshold == pytest.approx(info["threshold"])


def test_x_ray_like_pictures_are_accepted(fitted):
    """The threshold refuses about 1 in (validation images + 1) new X-rays (here ~30 validation images):
    of 20 new X-ray-like pictures at most 2, and of the dataset's own test split at most 5 %."""
    weights, _ = fitted
    pair = load_pair(weights)
    refused = [seed for seed in range(500, 520)
               if refusal(pair, pair.prepare(jpeg_bytes(xray_like_array(300, 260, seed=seed)))[0])]
    assert len(refused) <= 2, refused
    test = read_card(weights).document[ood.CARD_KEY]["refused"]["test"]
    assert test["n"] == 200 and test["fraction"] <= 0.05


@pytest.mark.parametrize("name", sorted(JUNK))
def test_what_is_not_a_chest_radiograph_is_refused_with_a_reason(fitted, name):
    pair = load_pair(fitted[0])
    with pytest.raises(ImageError) as refused:
        predict_bytes(pair, JUNK[name], name)
    assert "chest radiograph" in str(refused.value) and "no probability" in str(refused.value)


def test_predict_refuses_junk_with_exit_status_2_and_no_probability(fitted, tmp_path, capsys):
    weights, _ = fitted
    good, bad = tmp_path / "IM-0001-0001.jpeg", tmp_path / "black.png"
    good.write_bytes(jpeg_bytes(xray_like_array(256, 256, seed=501)))
    bad.write_bytes(JUNK["black.png"])
    assert main(["predict", "--weights", str(weights), str(good)]) == 0
    assert "p(pneumonia)" in capsys.readouterr().out
    assert main(["predict", "--weights", str(weights), "--json", str(good), str(bad)]) == 2
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert "teacher" in lines[0] and set(lines[1]) == {"file", "error"} and "chest radiograph" in lines[1]["error"]


def test_a_turned_x_ray_is_told_to_turn_it_upright(fitted):
    """A radiograph on its side or upside down is refused, and when the turn back passes, the refusal says so
    in words a person can act on (not a distance ratio alone)."""
    pair = load_pair(fitted[0])
    assert refusal(pair, pair.prepare(jpeg_bytes(XRAY), "x.jpeg")[0]) is None  # upright: passes
    for name, turn in (("rotated_xray.jpeg", "90° clockwise"), ("upside_down_xray.jpeg", "180°")):
        why = refusal(pair, pair.prepare(JUNK[name], name)[0])
        assert why is not None and "less like the training X-rays than any X-ray of the validation split" in why
        assert f"It would pass turned {turn}: if it is an X-ray on its side or upside down, turn it upright" in why
    assert "turn it upright" not in refusal(pair, pair.prepare(JUNK["grey_photo.jpeg"], "p.jpeg")[0])


def test_image_statistics_name_blank_and_flat_pictures():
    assert "only 1 grey level (blank)" in ood.image_reason(np.zeros((160, 160), np.uint8))
    checker = ((np.indices((160, 160)) // 20).sum(0) % 2 * 255).astype(np.uint8)
    assert "2 grey levels" in ood.image_reason(checker)
    page = np.asarray(Image.fromarray(text_page(step=50)).resize((160, 160)))  # a letter: mostly paper
    assert ood.image_reason(page) is not None
    assert ood.image_reason(np.asarray(Image.fromarray(XRAY).resize((160, 160)))) is None


def test_a_check_fitted_on_another_teacher_is_not_used(fitted, tmp_path):
    weights = tmp_path / "weights"
    shutil.copytree(fitted[0], weights)
    teacher = str(weights / "teacher.safetensors")
    tensors = load_file(teacher)
    tensors["fc.bias"] = tensors["fc.bias"] + 1  # a retrained teacher, as far as the check can tell
    save_file(tensors, teacher)
    with pytest.raises(CheckpointError, match="fit-ood"):
        load_pair(weights)
    assert load_pair(weights, ood=False).ood is None


def test_weights_without_a_check_give_no_probability(fitted, tmp_path, capsys):
    """Weights exported before runs fitted their own check: every picture, X-ray or not, is refused with the
    command that fits it, in the library and in `kd predict` (one message, exit 1), never a bare probability."""
    weights = tmp_path / "weights"
    shutil.copytree(fitted[0], weights)
    (weights / ood.OOD_FILE).unlink()
    pair = load_pair(weights)
    assert pair.ood is None
    for name, data in (("xray.jpeg", jpeg_bytes(XRAY)), ("black.png", JUNK["black.png"])):
        with pytest.raises(ImageError, match="no fitted out-of-distribution check.*kd fit-ood --weights"):
            predict_bytes(pair, data, name)
    (tmp_path / "x.jpeg").write_bytes(jpeg_bytes(XRAY))
    assert main(["predict", "--weights", str(weights), str(tmp_path / "x.jpeg")]) == 1
    out, err = capsys.readouterr()
    assert "p(pneumonia)" not in out and "no fitted out-of-distribution check" in err


def test_every_exported_run_carries_its_fitted_check(tiny_run):
    """The pipeline fits the refusal check (and the framing warnings) on the weights it exports: a run's folder
    served as it is refuses a non-X-ray."""
    run = tiny_run[1]
    assert (run / ood.OOD_FILE).exists()
    card = read_card(run).document
    assert card[ood.CARD_KEY]["train_images"] > 0 and "framing" in card
    pair = load_pair(run)
    assert pair.ood is not None
    with pytest.raises(ImageError, match="does not look like a chest radiograph"):
        predict_bytes(pair, JUNK["black.png"], "black.png")


def test_distance_is_the_mahalanobis_distance_of_the_shrunk_covariance():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    full, _ = ood.EmbeddingDistance.fit(x, components=6)
    from sklearn.covariance import LedoitWolf

    lw = LedoitWolf().fit(x)
    q = rng.normal(size=(5, 6))
    expected = np.einsum("ij,jk,ik->i", q - lw.location_, np.linalg.inv(lw.covariance_), q - lw.location_)
    assert full(torch.from_numpy(q)).numpy() == pytest.approx(expected, rel=1e-4)
    # fewer components: the dropped directions share the mean of their variances
    part, _ = ood.EmbeddingDistance.fit(x, components=3)
    values, vectors = np.linalg.eigh(lw.covariance_)
    kept = vectors[:, 3:] @ np.diag(1 / values[3:]) @ vectors[:, 3:].T
    dropped = vectors[:, :3] @ vectors[:, :3].T / values[:3].mean()
    expected = np.einsum("ij,jk,ik->i", q - lw.location_, kept + dropped, q - lw.location_)
    assert part(torch.from_numpy(q)).numpy() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("components", [5, 29, 30, 48, 64])
def test_fewer_images_than_dimensions_give_the_same_distances(components):
    """30 images of 64-d features: the SVD route (kd.ood.EmbeddingDistance._low_rank_spectrum) against the
    Mahalanobis distance under the shrunk covariance's own eigendecomposition, dropped directions sharing the
    mean of their variances."""
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 64)) @ rng.normal(size=(64, 64))
    fitted, _ = ood.EmbeddingDistance.fit(x, components=components)
    assert fitted.components.shape[0] == min(components, 30)
    lw = LedoitWolf().fit(x)
    values, vectors = np.linalg.eigh(lw.covariance_)
    values, vectors = values[::-1], vectors[:, ::-1]
    k = min(components, 64)
    kept = vectors[:, :k] @ np.diag(1 / values[:k]) @ vectors[:, :k].T
    dropped = vectors[:, k:] @ vectors[:, k:].T / values[k:].mean() if k < 64 else 0
    q = rng.normal(size=(5, 64)) @ rng.normal(size=(64, 64))
    expected = np.einsum("ij,jk,ik->i", q - lw.location_, kept + dropped, q - lw.location_)
    assert fitted(torch.from_numpy(q)).numpy() == pytest.approx(expected, rel=1e-4)


def test_threshold_refuses_at_most_the_share_of_validation():
    d = np.arange(1000, dtype=float)
    t = ood.validation_threshold(d, 0.005)
    assert (d > t).sum() == 5 and t == 994
    assert ood.validation_threshold(np.array([3.0, 1.0, 2.0]), 0.005) == 3.0  # few images: none refused


def test_fit_ood_help_imports_no_torch():
    from tests.test_cli import probe

    done = probe("fit-ood", "--help")
    assert done.stdout.strip().endswith("HEAVY - EXIT 0"), done.stderr[-2000:]


def test_decoding_and_colour_are_not_the_check(fitted):
    """A readable greyscale X-ray saved as RGB is still an X-ray."""
    pair = load_pair(fitted[0])
    rgb = np.repeat(xray_like_array(256, 256, seed=502)[..., None], 3, axis=2)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    assert "teacher" in predict_bytes(pair, buf.getvalue(), "rgb.png")


@pytest.mark.slow(6)  # seconds on an idle machine, alone
def test_ood_bench_judges_each_picture(fitted, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import ood as ood_bench

    weights, data = fitted
    ood_bench.main(["--weights", str(weights), "--data", str(data), "--limit", "10", "--xray", ""])
    out = capsys.readouterr().out
    assert "test : " in out and "| black.png | refused | image statistics |" in out
    ood_bench.main(["--weights", str(weights), "--data", str(data), "--xray", "", "--compare", "--train-limit", "60"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| layer")]
    assert [r.split(" | ")[:2] for r in rows] == [["| layer3", "64"], ["| layer3", "512"], ["| layer4", "64"],
                                                  ["| layer4", "512"]]


def test_the_app_shows_the_reason_in_place_of_a_probability(fitted, app_env, monkeypatch):
    """Diagnose: a refused upload gets the reason and no probability; an X-ray beside it is diagnosed."""
    from streamlit.testing.v1 import AppTest

    from tests.test_app import APP, all_text, metric_values

    monkeypatch.setenv("KD_WEIGHTS", str(fitted[0]))
    xray = jpeg_bytes(xray_like_array(256, 256, seed=502))  # accepted (test_decoding_and_colour_are_not_the_check)
    at = AppTest.from_file(str(APP), default_timeout=90).run()
    at.file_uploader(key="uploads").set_value([("text_page.jpeg", JUNK["text_page.jpeg"], "image/jpeg"),
                                               ("chest.jpeg", xray, "image/jpeg")]).run()
    assert not at.exception and not at.error
    [refusal] = [w.value for w in at.warning if "Refused" in w.value]
    assert refusal.startswith("**Refused: no probability is shown.**") and "chest radiograph" in refusal
    assert refusal.count("no probability") == 1
    assert len(metric_values(at, "Probability of pneumonia")) == 2  # teacher and student, for the X-ray only
    assert "the uploaded picture" in [c for i in at.image for c in i.captions]
    assert "Before any probability" in all_text(at)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_bulk_predict_gives_each_file_what_predict_bytes_gives_in_order(fitted, tmp_path, batch_size):
    """kd.serving.predict_files (kd predict's batched, threaded path; issue 21 item 10) against the one-file
    path: the same probabilities (to float rounding of a batched forward), decisions, refusals and warnings,
    in the order given, with unreadable files, junk refused by the check and a repeated file among them."""
    from kd.serving import predict_files

    weights, _ = fitted
    pair = load_pair(weights)
    paths = []
    for i in range(7):
        paths.append(tmp_path / f"x{i}.jpeg")
        paths[-1].write_bytes(jpeg_bytes(xray_like_array(200 + 8 * i, 240, seed=600 + i)))
    (tmp_path / "black.png").write_bytes(JUNK["black.png"])
    (tmp_path / "broken.jpeg").write_bytes(b"not a picture")
    order = [paths[0], tmp_path / "black.png", *paths[1:4], tmp_path / "broken.jpeg", tmp_path / "gone.png",
             *paths[4:], paths[0]]
    got = list(predict_files(pair, [str(p) for p in order], batch_size=batch_size))
    assert [g[0] for g in got] == [str(p) for p in order]
    for path, result, error in got:
        try:
            expected = predict_bytes(pair, open(path, "rb").read(), path.rsplit("/", 1)[-1])
        except (OSError, ImageError) as e:
            assert result is None and error == (e.strerror if isinstance(e, OSError) else str(e))
            continue
        assert error is None and result["warnings"] == expected["warnings"]
        for role in ("teacher", "student"):
            assert result[role]["probability"] == pytest.approx(expected[role]["probability"], abs=1e-5)
            assert result[role]["decision"] == expected[role]["decision"]
    assert sum(error is not None for _, _, error in got) == 3


# ----------------------------------------------------------------------------- kd.framing (issue 21, item 8)

def test_fit_ood_also_fits_the_framing_warnings_with_no_validation_xray_warned(fitted):
    from kd import framing

    weights, _ = fitted
    info = read_card(weights).document[framing.CARD_KEY]
    assert (weights / framing.FRAMING_FILE).exists() and info["command"].startswith("python -m kd fit-ood")
    assert info["warned"]["validation whole X-rays"]["warned"] == 0  # the threshold rule
    assert {"validation, upper half", "validation, zoom 60%", "validation, mirrored"} <= set(info["warned"])
    assert info["warned"]["test whole X-rays (counted only)"]["n"] == 200
    assert load_pair(weights).framing.thresholds == pytest.approx(info["thresholds"])


def test_variants_are_crops_zooms_and_the_mirror_image():
    from kd.framing import variants

    pixels = np.arange(40 * 60, dtype=np.uint16).reshape(40, 60).astype(np.uint8)
    made = variants(pixels)
    assert made["upper half"][1].shape == (20, 60) and made["left half"][1].shape == (40, 30)
    assert made["zoom 60%"][1].shape == (24, 36) and np.array_equal(made["mirrored"][1], pixels[:, ::-1])
    # turned: the top row becomes the right column (clockwise), the left column (anticlockwise), the bottom row
    assert np.array_equal(made["turned 90° clockwise"][1][:, -1], pixels[0])
    assert np.array_equal(made["turned 90° anticlockwise"][1][:, 0], pixels[0, ::-1])
    assert np.array_equal(made["upside down"][1][-1], pixels[0, ::-1])
    assert {probe for probe, _ in made.values()} == {"partial", "mirrored", "turned"}


def test_the_turned_probe_warns_about_xrays_on_their_side_and_upside_down(fitted):
    """Fitted by fit-ood beside the other two: its rates on validation's turned X-rays are in the card, and a
    turned X-ray scored above its threshold gets the "turn it upright" warning where the upright one does not."""
    from kd import framing

    weights, _ = fitted
    info = read_card(weights).document[framing.CARD_KEY]
    assert {"validation, turned 90° clockwise", "validation, upside down"} <= set(info["warned"])
    assert "turned" in info["thresholds"] and "'turned'" in info["method"]
    pair = load_pair(weights)
    upright = xray_like_array(256, 256, seed=502)
    squares = np.stack([preprocess.apply_contrast(preprocess.to_square(a, pair.input_size), pair.contrast)
                        for a in (upright, np.ascontiguousarray(np.rot90(upright, 2)))])
    teacher = pair.models["teacher"].model
    scores = pair.framing.scores(framing.features(teacher, squares))["turned"]
    assert scores[0] != scores[1]
    pair.framing.thresholds = {"partial": 2.0, "mirrored": 2.0, "turned": float(scores.mean())}
    warned = [framing.WARNINGS["turned"] in w for w in pair.framing.warnings(teacher, squares)]
    assert warned == [bool(x > scores.mean()) for x in scores] and sum(warned) == 1


def test_a_framing_check_fitted_before_the_turned_probe_still_loads_and_warns(fitted, tmp_path):
    """Weights whose framing file holds only "partial" and "mirrored" (fitted before "turned" existed) keep those
    two warnings instead of losing the whole check."""
    from safetensors import safe_open
    from kd import framing

    weights = tmp_path / "weights"
    shutil.copytree(fitted[0], weights)
    path = weights / framing.FRAMING_FILE
    with safe_open(str(path), "pt") as f:
        info = json.loads(f.metadata()["info"])
    del info["thresholds"]["turned"]
    tensors = {k: v for k, v in load_file(str(path)).items() if not k.startswith("probes.turned.")}
    save_file(tensors, str(path), metadata={"info": json.dumps(info)})
    pair = load_pair(weights)
    assert set(pair.framing.thresholds) == set(pair.framing.probes.probes) == {"partial", "mirrored"}
    pair.framing.thresholds = {"partial": 2.0, "mirrored": -1.0}
    square = preprocess.to_square(xray_like_array(256, 256, seed=503), pair.input_size)
    assert pair.framing.warnings(pair.models["teacher"].model, square[None]) == [(framing.WARNINGS["mirrored"],)]


def test_framing_warnings_reach_predict_bulk_predict_and_diagnose(fitted):
    """A score above a threshold becomes the warning beside the probabilities everywhere a file is diagnosed."""
    from kd import framing, serving
    from kd.serving import predict_files

    weights, _ = fitted
    pair = load_pair(weights)
    data = jpeg_bytes(xray_like_array(256, 256, seed=501))
    pair.framing.thresholds = {"partial": -1.0, "mirrored": 2.0, "turned": 2.0}  # every score is above -1, none above 2
    assert predict_bytes(pair, data, "x.jpeg")["warnings"] == [framing.WARNINGS["partial"]]
    assert serving.diagnose(pair, data, "x.jpeg").xray.warnings == (framing.WARNINGS["partial"],)
    path = weights.parent / "x.jpeg"
    path.write_bytes(data)
    [(_, result, _)] = list(predict_files(pair, [str(path)]))
    assert result["warnings"] == [framing.WARNINGS["partial"]]
    pair.framing.thresholds = {"partial": 2.0, "mirrored": 2.0, "turned": 2.0}
    assert predict_bytes(pair, data, "x.jpeg")["warnings"] == []


def test_a_framing_check_fitted_on_another_teacher_is_not_used(fitted, tmp_path):
    from kd import framing

    weights = tmp_path / "weights"
    shutil.copytree(fitted[0], weights)
    (weights / ood.OOD_FILE).unlink()
    teacher = str(weights / "teacher.safetensors")
    tensors = load_file(teacher)
    tensors["fc.bias"] = tensors["fc.bias"] + 1
    save_file(tensors, teacher)
    with pytest.raises(CheckpointError, match=f"{framing.FRAMING_FILE} was fitted on another teacher"):
        load_pair(weights)
