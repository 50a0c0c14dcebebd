"""Tests for kd.preprocess: every bad upload is refused in words, every odd-but-valid one is handled right."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image, ImageFile

from kd import preprocess
from kd.preprocess import (
    MAX_BYTES,
    MAX_PIXELS,
    MEAN,
    MIN_SIDE,
    STD,
    ImageError,
    XRay,
    load_xray,
    load_xray_file,
    normalize,
    prepare,
    to_square,
    to_tensor,
)
from tests.fixtures import xray_fixtures as fx


def load_case(table: dict, case: str, **kwargs) -> XRay:
    generator, filename = table[case]
    return load_xray(generator(), name=filename, **kwargs)


def assert_human_message(message: str) -> None:
    assert message.endswith("."), message
    assert "\n" not in message, message
    for leak in ("Traceback", "Error", "Exception", "errno", "PIL", "pydicom"):
        assert leak not in message, message


# ----------------------------------------------------------------------------- refusals


def test_bad_upload_table_is_complete():
    assert set(fx.BAD_UPLOADS) == set(fx.BAD_UPLOAD_KEYWORDS)


@pytest.mark.parametrize("case", sorted(fx.BAD_UPLOADS))
def test_bad_upload_is_refused_with_a_human_message(case):
    with pytest.raises(ImageError) as caught:
        load_case(fx.BAD_UPLOADS, case)
    message = str(caught.value)
    assert fx.BAD_UPLOAD_KEYWORDS[case] in message.lower()
    assert_human_message(message)
    # a refusal leaves nothing behind: the next good upload still works
    assert load_xray(fx.xray_jpeg(), "chest.jpeg").pixels.shape == (256, 256)


def test_non_image_message_names_supported_formats():
    with pytest.raises(ImageError, match="JPEG, PNG, DICOM, TIFF, BMP and WebP"):
        load_case(fx.BAD_UPLOADS, "text_as_jpg")


@pytest.mark.parametrize("case", ["png_bomb", "huge_image"])
def test_oversized_images_are_refused_before_decoding(case, monkeypatch):
    def refuse_to_decode(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse_to_decode)
    with pytest.raises(ImageError) as caught:
        load_case(fx.BAD_UPLOADS, case)
    message = str(caught.value)
    assert "limit" in message and f"{MAX_PIXELS:,}" in message


def test_huge_image_message_gives_size_and_limit():
    with pytest.raises(ImageError) as caught:
        load_case(fx.BAD_UPLOADS, "huge_image")
    assert "10000 x 10000" in str(caught.value)
    assert "60 megapixels" in str(caught.value)


def test_pillow_pixel_limit_is_ours():
    assert Image.MAX_IMAGE_PIXELS == MAX_PIXELS


def test_tiny_image_message_gives_minimum():
    with pytest.raises(ImageError, match=f"minimum is {MIN_SIDE} pixels"):
        load_case(fx.BAD_UPLOADS, "tiny_image")


def test_5000_square_image_still_loads():
    xray = load_xray(fx.blank_png(5000, 5000), "big.png")
    assert xray.pixels.shape == (5000, 5000)
    assert xray.original_size == (5000, 5000)


def test_too_many_bytes_is_refused():
    with pytest.raises(ImageError, match="50 MB limit"):
        load_xray(bytes(MAX_BYTES + 1), "big.jpg")


def test_truncated_jpeg_is_not_loaded_silently():
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    with pytest.raises(ImageError, match="truncated or incomplete"):
        load_case(fx.BAD_UPLOADS, "truncated_jpeg")


def test_unexpected_decoder_failure_becomes_generic_message(monkeypatch):
    def explode(self):
        raise RuntimeError("internal decoder state 0x3f")

    monkeypatch.setattr(ImageFile.ImageFile, "load", explode)
    with pytest.raises(ImageError) as caught:
        load_xray(fx.xray_png(), "chest.png")
    assert "could not be decoded" in str(caught.value)
    assert "0x3f" not in str(caught.value)
    assert isinstance(caught.value.__cause__, RuntimeError)


# ----------------------------------------------------------------------------- files on disk


def test_load_xray_file_reads_from_disk(tmp_path):
    path = tmp_path / "chest.png"
    path.write_bytes(fx.xray_png())
    xray = load_xray_file(path)
    assert xray.source == "PNG"
    np.testing.assert_array_equal(xray.pixels, fx.xray_like_array(256, 256))


def test_load_xray_file_missing_names_the_file(tmp_path):
    path = tmp_path / "nowhere.jpeg"
    with pytest.raises(ImageError) as caught:
        load_xray_file(path)
    assert "nowhere.jpeg" in str(caught.value)
    assert_human_message(str(caught.value))


def test_load_xray_file_refuses_oversized_without_reading(tmp_path):
    path = tmp_path / "sparse.dcm"
    with open(path, "wb") as f:
        f.truncate(MAX_BYTES + 1)
    with pytest.raises(ImageError, match="sparse.dcm.*50 MB limit"):
        load_xray_file(path)


# ----------------------------------------------------------------------------- handled uploads


@pytest.mark.parametrize("case", sorted(fx.HANDLED_UPLOADS))
def test_handled_upload_gives_grayscale_uint8(case):
    xray = load_case(fx.HANDLED_UPLOADS, case)
    assert xray.pixels.ndim == 2 and xray.pixels.dtype == np.uint8
    height, width = xray.pixels.shape
    assert xray.original_size == (width, height)
    assert min(height, width) >= MIN_SIDE


def test_plain_grayscale_png_is_untouched():
    xray = load_case(fx.HANDLED_UPLOADS, "xray_png")
    np.testing.assert_array_equal(xray.pixels, fx.xray_like_array(256, 256))
    assert xray.source == "PNG" and xray.warnings == ()


def test_16bit_png_is_scaled_by_its_range_not_clipped():
    xray = load_case(fx.HANDLED_UPLOADS, "png16")
    row = xray.pixels[0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row) >= 0)
    source = fx.gradient16_array()[0].astype(float)
    expected = np.rint((source - 1000) * 255 / 2000)
    np.testing.assert_array_equal(row, expected)
    assert any("rescaled" in note for note in xray.warnings)


@pytest.mark.parametrize("case", ["rgba_png", "la_png"])
def test_alpha_is_composited_over_black(case):
    xray = load_case(fx.HANDLED_UPLOADS, case)
    gray = fx.xray_like_array(128, 128).astype(int)
    out = xray.pixels.astype(int)
    np.testing.assert_array_equal(out[32:, :64], gray[32:, :64])  # opaque
    assert np.all(out[:, 64:] == 0)  # fully transparent
    half = np.rint(gray[:32, :64] * 128 / 255)
    assert np.abs(out[:32, :64] - half).max() <= 1
    assert any("alpha" in note for note in xray.warnings)


def test_cmyk_jpeg_has_the_right_brightness():
    xray = load_case(fx.HANDLED_UPLOADS, "cmyk_jpeg")
    gray = fx.xray_like_array(128, 128).astype(float)
    assert abs(xray.pixels.mean() - gray.mean()) < 2
    assert np.abs(xray.pixels.astype(float) - gray).mean() < 4


def test_exif_rotation_is_applied():
    xray = load_case(fx.HANDLED_UPLOADS, "exif_rotated_jpeg")
    stored_h, stored_w = fx.EXIF_STORED_SHAPE
    assert xray.pixels.shape == (stored_w, stored_h)  # transposed
    assert xray.original_size == (stored_h, stored_w)  # (width, height) as displayed
    m = fx.EXIF_MARKER
    margin = 4
    top_right = xray.pixels[margin:m - margin, -m + margin:-margin]
    top_left = xray.pixels[margin:m - margin, margin:m - margin]
    bottom_left = xray.pixels[-m + margin:-margin, margin:m - margin]
    assert top_right.mean() > 230
    assert top_left.mean() < 60 and bottom_left.mean() < 60


def test_palette_png_uses_the_palette():
    xray = load_case(fx.HANDLED_UPLOADS, "palette_png")
    _, expected = fx.palette_levels()
    np.testing.assert_array_equal(xray.pixels, expected)


def test_bilevel_png_becomes_black_and_white():
    xray = load_case(fx.HANDLED_UPLOADS, "bilevel_png")
    assert np.all(xray.pixels[:, :32] == 0) and np.all(xray.pixels[:, 32:] == 255)


def test_colour_photo_is_loaded_with_a_warning():
    xray = load_case(fx.HANDLED_UPLOADS, "colour_photo")
    assert xray.pixels.shape == (192, 256)
    assert preprocess.COLOUR_PHOTO_WARNING in xray.warnings


@pytest.mark.parametrize("case", ["xray_jpeg", "gray_rgb_jpeg", "cmyk_jpeg", "dicom_rgb"])
def test_grayscale_pictures_are_not_called_photos(case):
    assert preprocess.COLOUR_PHOTO_WARNING not in load_case(fx.HANDLED_UPLOADS, case).warnings


# ----------------------------------------------------------------------------- DICOM


def scaled(values: np.ndarray) -> np.ndarray:
    values = values.astype(float)
    return np.rint((values - values.min()) * 255 / (values.max() - values.min())).astype(np.uint8)


def test_dicom_monochrome2_is_min_max_scaled():
    xray = load_xray(fx.dicom_monochrome2(), "chest.dcm")
    assert xray.source == "DICOM"
    np.testing.assert_array_equal(xray.pixels, scaled(fx.xray16_array()))


def test_dicom_monochrome1_is_inverted():
    mono1 = load_case(fx.HANDLED_UPLOADS, "dicom_monochrome1").pixels
    mono2 = load_xray(fx.dicom_monochrome2(), "chest.dcm").pixels
    np.testing.assert_array_equal(mono1.astype(int), 255 - mono2.astype(int))


def test_dicom_voi_window_is_applied():
    xray = load_case(fx.HANDLED_UPLOADS, "dicom_windowed")
    center, width = fx.WINDOW
    x = fx.window_ramp_array()[0].astype(float)
    # DICOM PS3.3 C.11.2.1.2 linear window, then our min..max scale of a saturated result
    expected = np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0) * 255
    row = xray.pixels[0].astype(float)
    assert np.abs(row - expected).max() <= 1
    low, high = center - width / 2, center + width / 2
    assert np.all(row[x < low - 1] == 0) and np.all(row[x > high + 1] == 255)
    inside = (x > low + 20) & (x < high - 20)
    slope = np.polyfit(x[inside], row[inside], 1)[0]
    assert slope == pytest.approx(255 / (width - 1), rel=0.02)


def test_dicom_8bit_and_rgb():
    gray = fx.xray_like_array(128, 128)
    np.testing.assert_array_equal(load_case(fx.HANDLED_UPLOADS, "dicom_8bit").pixels, scaled(gray))
    np.testing.assert_array_equal(load_case(fx.HANDLED_UPLOADS, "dicom_rgb").pixels, gray)


@pytest.mark.parametrize("case", ["dicom_raw_dataset", "dicom_named_jpg"])
def test_dicom_found_by_content_or_name(case):
    xray = load_case(fx.HANDLED_UPLOADS, case)
    assert xray.source == "DICOM"
    np.testing.assert_array_equal(xray.pixels, scaled(fx.xray16_array()))


def test_dicom_refusals_are_specific():
    with pytest.raises(ImageError, match="single-frame"):
        load_case(fx.BAD_UPLOADS, "dicom_multiframe")
    with pytest.raises(ImageError, match="JPEG-LS.*not supported"):
        load_case(fx.BAD_UPLOADS, "dicom_compressed")


# ----------------------------------------------------------------------------- resize, prepare, tensors


def test_to_square_stretches_the_whole_image():
    arr = np.zeros((100, 200), dtype=np.uint8)
    arr[:, 100:] = 255
    square = to_square(arr, 64)
    assert square.shape == (64, 64) and square.dtype == np.uint8
    assert np.all(square[:, :30] == 0) and np.all(square[:, 34:] == 255)  # nothing cropped
    expected = Image.fromarray(arr).resize((64, 64), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(square, np.asarray(expected))


def test_to_square_upscales_and_rejects_wrong_input():
    assert to_square(fx.xray_like_array(40, 50), 96).shape == (96, 96)
    with pytest.raises(TypeError):
        to_square(np.zeros((10, 10), dtype=np.float32), 8)


def test_prepare_uses_jpeg_draft_for_large_images():
    square, xray = prepare(fx.large_jpeg(), 224, name="large.jpg")
    assert square.shape == (224, 224) and square.dtype == np.uint8
    assert xray.original_size == (2000, 1600)
    height, width = xray.pixels.shape
    assert 224 <= height < 1600 and 224 <= width < 2000
    assert load_xray(fx.large_jpeg()).pixels.shape == (1600, 2000)  # no target: full size


def test_prepare_matches_load_then_square_for_png():
    square, xray = prepare(fx.xray_png(), 64)
    np.testing.assert_array_equal(square, to_square(fx.xray_like_array(256, 256), 64))
    assert xray.source == "PNG"


def test_normalize_maths():
    torch = pytest.importorskip("torch")
    batch = torch.tensor([[0, 255, 51, 128]], dtype=torch.uint8)
    out = normalize(batch)
    assert out.dtype == torch.float32 and out.shape == batch.shape
    expected = torch.tensor([[-2.0, 2.0, -1.2, (128 / 255 - MEAN) / STD]])
    assert torch.allclose(out, expected, atol=1e-6)
    assert batch.dtype == torch.uint8 and int(batch[0, 1]) == 255  # input untouched
    with pytest.raises(TypeError):
        normalize(out)


def test_to_tensor_shape_and_values():
    torch = pytest.importorskip("torch")
    square = np.full((32, 48), 255, dtype=np.uint8)
    tensor = to_tensor(square)
    assert tuple(tensor.shape) == (1, 1, 32, 48) and tensor.dtype == torch.float32
    assert torch.allclose(tensor, torch.full_like(tensor, (1 - MEAN) / STD))


# ----------------------------------------------------------------------------- fixtures


def test_fixtures_are_deterministic():
    assert fx.xray_jpeg() == fx.xray_jpeg()
    assert fx.dicom_windowed() == fx.dicom_windowed()
    assert len(fx.png_bomb()) < 500_000 and len(fx.huge_image()) < 500_000


def test_write_kermany_dataset_layout(tmp_path):
    root = fx.write_kermany_dataset(tmp_path / "chest_xray", splits=("train", "test"))
    for split in ("train", "test"):
        normal = sorted(p.name for p in (root / split / "NORMAL").iterdir())
        pneumonia = sorted(p.name for p in (root / split / "PNEUMONIA").iterdir())
        assert len(normal) == 6 and len(pneumonia) == 6
        assert all(re.fullmatch(r"IM-\d{4}-000\d\.jpeg", n) for n in normal)
        assert all(re.fullmatch(r"person\d+_(bacteria|virus)_\d+\.jpeg", n) for n in pneumonia)
        assert len({n.split("-")[1] for n in normal}) == 3  # two images per patient
    train_ids = {p.name.split("_")[0] for p in (root / "train" / "PNEUMONIA").iterdir()}
    test_ids = {p.name.split("_")[0] for p in (root / "test" / "PNEUMONIA").iterdir()}
    assert not train_ids & test_ids
    names = [p.name for p in (root / "train" / "PNEUMONIA").iterdir()]
    assert any("_virus_" in n for n in names) and any("_bacteria_" in n for n in names)
    lungs = (slice(16, 42), slice(10, 54))
    normal_mean = np.mean([load_xray_file(p).pixels[lungs].mean() for p in (root / "train" / "NORMAL").iterdir()])
    sick_mean = np.mean([load_xray_file(p).pixels[lungs].mean() for p in (root / "train" / "PNEUMONIA").iterdir()])
    assert sick_mean > normal_mean + 10


def test_one_list_of_formats_reads_each_and_names_each(tmp_path):
    """Every format the refusal sentence names is read, by the uploader, `kd predict` and dataset folders alike
    (issue 21, item 9): one list, kd.preprocess.FORMATS."""
    import io

    from PIL import Image

    from kd import preprocess
    from kd.cli import build_parser
    from kd.data import is_image_file
    from kd.ui.diagnose import UPLOAD_HELP, UPLOAD_LABEL

    pixels = fx.xray_like_array(64, 64)
    for name, suffixes in preprocess.FORMATS.items():
        if name == "DICOM":
            data = fx.dicom_bytes(pixels.astype(np.uint16) * 256)
        else:
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, {"WebP": "WEBP"}.get(name, name))
            data = buf.getvalue()
        assert load_xray(data, f"x{suffixes[0]}").pixels.shape == (64, 64), name
        assert name in preprocess.SUPPORTED and name in UPLOAD_LABEL and name in UPLOAD_HELP
        assert all(s in preprocess.FILE_SUFFIXES for s in suffixes)
    predict = next(a for a in build_parser()._subparsers._group_actions[0].choices["predict"]._actions
                   if a.dest == "files")
    assert all(name in predict.help for name in preprocess.FORMATS)
    for suffix in preprocess.FILE_SUFFIXES:  # dataset and unlabeled folders list the same files
        (tmp_path / f"a{suffix}").write_bytes(b"x")
        assert is_image_file(tmp_path / f"a{suffix}")
    assert not is_image_file(tmp_path / "notes.txt")


def test_a_large_picture_is_reduced_before_conversion_never_below_the_model_size():
    from kd.preprocess import REDUCE_ABOVE

    big = np.kron(fx.xray_like_array(300, 300), np.ones((14, 14), np.uint8))  # 4200 x 4200
    rgba = np.dstack([big, big, big, np.full_like(big, 255)])
    xray = load_xray(fx.png_bytes(rgba), "big.png", target_size=160)
    assert xray.original_size == (4200, 4200)
    assert REDUCE_ABOVE // 2 <= xray.pixels.shape[0] < 4200 and xray.pixels.shape[0] == xray.pixels.shape[1]
    assert load_xray(fx.png_bytes(rgba), "big.png").pixels.shape == (4200, 4200)  # no model size: kept whole
