"""kd.serving: an upload decoded once, refused or explained from one teacher pass, the same answers as the
two-step path (check on its own pass, then the maps), and the model card's one schema for reading and writing."""
from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest

from kd import cam, preprocess, serving
from kd.model_card import CARD_FILE, read_card, write_card
from kd.statefile import UnreadableState
from tests.fixtures.non_xrays import non_xrays
from tests.fixtures.xray_fixtures import jpeg_bytes, png_bytes, xray_like_array

XRAY = xray_like_array(256, 256, seed=77)


@pytest.fixture(scope="module")
def pair(tiny_weights):
    loaded = serving.load_pair(tiny_weights)
    assert loaded.ood is not None and loaded.framing is not None  # exported runs carry both checks
    return loaded


@contextlib.contextmanager
def counted(pair):
    """How many times each model's stages ran a forward pass."""
    calls, handles = {}, []
    for role, m in pair.models.items():
        for stage in ("layer1", "layer3", "layer4"):
            key = f"{role}.{stage}"
            calls[key] = 0
            handles.append(getattr(m.model, stage).register_forward_hook(
                lambda *_, key=key: calls.__setitem__(key, calls[key] + 1)))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("data,name", [(jpeg_bytes(XRAY), "small.jpeg"),
                                       (jpeg_bytes(xray_like_array(1500, 1300, seed=5)), "big.jpeg"),
                                       (png_bytes(xray_like_array(2600, 2200, seed=6)), "huge.png")])
def test_diagnose_checks_on_the_teachers_own_pass_and_answers_as_the_two_step_path(pair, data, name):
    with counted(pair) as calls:
        d = serving.diagnose(pair, data, name)
    with counted(pair) as maps_alone:  # what the two heat maps cost without any check
        for role in serving.ROLES:
            cam.explain(pair.models[role], preprocess.to_tensor(d.square), cam.DEFAULT_CAM)
    assert calls == maps_alone  # the check rides on the teacher map's own first pass: not one module call more
    assert calls["teacher.layer3"] == calls["teacher.layer4"] >= 1
    before = serving.diagnose_apart(pair, data, name)  # the check on a teacher pass of its own
    assert np.array_equal(d.square, before.square) and np.array_equal(d.picture, before.picture)
    shown = preprocess.load_xray(data, name=name, target_size=max(pair.input_size, serving.DISPLAY_SIZE)).pixels
    assert np.array_equal(d.picture, serving.display_picture(shown, pair.input_size))  # as drawn before issue 19
    assert d.xray.warnings == before.xray.warnings
    for role in serving.ROLES:
        assert d.views[role].probability == before.views[role].probability
        assert np.array_equal(d.views[role].cam, before.views[role].cam)
    assert list(d.seconds) == ["decoding", "refusal check", "teacher", "student"]


@pytest.mark.parametrize("name", ["rotated_xray.jpeg", "grey_photo.jpeg", "colour_photo.jpeg", "black.png"])
def test_a_refused_picture_stops_the_teacher_at_layer3_and_the_student_never_runs(pair, name):
    data = non_xrays(XRAY)[name]
    square, _ = pair.prepare(data, name)
    [expected], _ = serving.screen_squares(pair, square[None])
    assert expected is not None
    with counted(pair) as calls, pytest.raises(serving.NotChestXray) as refused:
        serving.diagnose(pair, data, name)
    assert str(refused.value) == expected  # the same sentence, the hint to turn it upright included
    assert calls["teacher.layer4"] == 0 and calls["student.layer1"] == 0  # no probability was ever computed


def test_a_change_of_method_starts_from_the_screened_upload(pair):
    d = serving.diagnose(pair, jpeg_bytes(XRAY), "x.jpeg")
    with counted(pair) as calls:
        other = serving.diagnose_screened(pair, d.screened, "layer3 GradCAM")
    assert calls["teacher.layer4"] == 1 and other.picture is d.picture and other.xray is d.xray
    assert other.lungs is d.lungs  # the lung fields are estimated once per upload, not per method
    assert set(other.seconds) == {"decoding", "refusal check", "teacher", "student"}


def test_the_display_picture_reuses_the_models_decoding_unless_a_jpeg_was_drafted(pair):
    size = max(pair.input_size, serving.DISPLAY_SIZE)
    near = 2 * pair.input_size - 2  # libjpeg cannot halve it and stay at the model's size: no draft (Kermany's 224 px
    # files at 128 or 160 px), so the one decoding serves both
    for data, name, reused in ((png_bytes(xray_like_array(2600, 2200, seed=6)), "huge.png", True),
                               (jpeg_bytes(xray_like_array(near, near - 6, seed=4)), "small.jpeg", True),
                               (jpeg_bytes(xray_like_array(1500, 1300, seed=5)), "big.jpeg", False)):
        _, xray = pair.prepare(data, name)
        pixels = serving.display_pixels(pair, data, name, xray)
        assert (pixels is xray.pixels) == reused, name
        assert np.array_equal(pixels, preprocess.load_xray(data, name=name, target_size=size).pixels), name


def test_the_model_card_is_one_schema_for_writing_and_reading(tmp_path, tiny_weights):
    document = json.loads((tiny_weights / CARD_FILE).read_text())
    card = write_card(tmp_path, document)
    assert card.document == document == json.loads((tmp_path / CARD_FILE).read_text())  # written as given
    assert read_card(tmp_path).models["teacher"].threshold == document["models"]["teacher"]["threshold"]
    assert card.input.size == document["input"]["size"] and card.config.split[0] == document["config"]["val_fraction"]
    bad = json.loads(json.dumps(document))
    bad["models"]["student"]["calibration_temperature"] = -1
    with pytest.raises(UnreadableState, match="'models.student.calibration_temperature' must be in"):
        write_card(tmp_path, bad)
    assert json.loads((tmp_path / CARD_FILE).read_text()) == document  # a card read_card refuses is never written
    del bad["models"]["student"]["calibration_temperature"]
    del bad["input"]["size"]
    with pytest.raises(UnreadableState, match="'input' has no 'size'"):
        write_card(tmp_path, bad)
    bad = json.loads(json.dumps(document))
    bad["models"]["teacher"]["file"] = None
    with pytest.raises(UnreadableState, match="a served model needs its weights file"):
        write_card(tmp_path, bad)


def test_predict_checks_on_the_teachers_own_pass_and_answers_as_before(pair):
    """kd predict's batches (serving.checked): one teacher pass gives the checks their layer3 map and the teacher
    its probabilities; the student runs on the kept squares; the answers are the two-step path's."""
    good = [pair.prepare(jpeg_bytes(xray_like_array(300, 260, seed=s)), "x.jpeg")[0] for s in (1, 2, 3)]
    with counted(pair) as calls:
        refusals, warnings, found = serving.checked(pair, np.stack(good))
    assert refusals == [None] * 3 and all(f is not None for f in found)
    assert calls == {"teacher.layer1": 1, "teacher.layer3": 1, "teacher.layer4": 1,
                     "student.layer1": 1, "student.layer3": 1, "student.layer4": 1}
    junk = non_xrays(XRAY)
    squares = np.stack([good[0], pair.prepare(junk["rotated_xray.jpeg"], "r.jpeg")[0], good[1],
                        pair.prepare(junk["black.png"], "b.png")[0]])
    refusals, warnings, found = serving.checked(pair, squares)
    before_refusals, before_warnings, before_found = serving.checked_apart(pair, squares)
    assert refusals == before_refusals and warnings == before_warnings
    assert [f is None for f in found] == [False, True, False, True] and "turn it upright" in refusals[1]
    for got, expected in zip([found[0], found[2]], [before_found[0], before_found[2]]):
        for role in serving.ROLES:
            assert got[role]["probability"] == expected[role]["probability"]
            assert got[role]["decision"] == expected[role]["decision"]
