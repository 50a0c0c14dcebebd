"""Heat maps drawn on a display-size picture, whatever size the models run at."""
from __future__ import annotations

import numpy as np
from PIL import Image

from kd import cam, serving
from kd.serving import load_pair
from tests.fixtures.xray_fixtures import jpeg_bytes, xray_like_array


def test_overlay_stretches_a_coarse_map_over_the_picture_in_place():
    coarse = np.zeros((4, 4), np.float32)
    coarse[0, 3] = 1.0  # top-right cell hot
    picture = np.full((448, 448), 128, np.uint8)
    rgb = cam.overlay(picture, coarse, opacity=1.0)
    assert rgb.shape == (448, 448, 3) and rgb.dtype == np.uint8
    red = rgb[..., 0].astype(int) - rgb[..., 2].astype(int)  # jet: hot is red
    assert red[20:60, 390:430].mean() > 100
    assert (rgb[390:430, 20:60] == 128).all()  # where the map is 0 the plain X-ray shows, untinted


def test_diagnosis_keeps_model_input_and_display_picture_apart(tiny_weights):
    pair = load_pair(tiny_weights)
    data = jpeg_bytes(xray_like_array(1200, 1000, seed=3))
    d = serving.diagnose(pair, data, "big.jpeg")
    size = pair.input_size
    shown = (cam.DISPLAY_SIZE, round(cam.DISPLAY_SIZE * 1000 / 1200))  # its own aspect, longest side DISPLAY_SIZE
    assert d.square.shape == (size, size) and d.picture.shape == shown
    for view in d.views.values():
        assert view.cam.shape == (size, size)
        assert cam.overlay(d.picture, view.cam).shape == (*shown, 3)
    # the picture is the same X-ray: shrunk to the model size it matches what the model saw
    small = np.asarray(Image.fromarray(d.picture).resize((size, size)))
    assert np.abs(small.astype(int) - d.square.astype(int)).mean() < 6


def test_an_all_zero_map_is_called_empty():
    assert cam.is_empty(np.zeros((4, 4), np.float32))
    assert not cam.is_empty(np.eye(4, dtype=np.float32))


def test_agreement_with_an_empty_map_is_undefined_not_zero():
    assert cam.agreement(np.zeros((4, 4), np.float32), np.eye(4, dtype=np.float32)) == \
        {"correlation": None, "top20_iou": None}
    same = cam.agreement(np.eye(4, dtype=np.float32), np.eye(4, dtype=np.float32))
    assert same["correlation"] > 0.99 and same["top20_iou"] == 1.0
