"""Dataset layout checks and the patient-level split."""
import shutil

import pytest

from kd.data import DatasetError, list_split, patient_id, patient_split, samples_for
from kd.testing.xray_fixtures import write_kermany_dataset


@pytest.mark.parametrize("name, patient", [
    ("person123_bacteria_4.jpeg", "person123"), ("person123_virus_7.jpeg", "person123"),
    ("IM-0117-0001.jpeg", "IM-0117"), ("NORMAL2-IM-0117-0001.jpeg", "NORMAL2-IM-0117"),
    ("IM-0439-0001-0001.jpeg", "IM-0439"), ("odd_name.png", "odd_name"),
])
def test_patient_id(name, patient):
    assert patient_id(name) == patient


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_kermany_dataset(tmp_path_factory.mktemp("d"), n_per_class=(20, 30), size=40)


def test_split_has_no_patient_on_both_sides_and_is_deterministic(dataset):
    samples = list_split(dataset, "train")
    train, val = patient_split(samples, 0.25, seed=1)
    assert len(train) + len(val) == len(samples)
    assert not {s.patient for s in train} & {s.patient for s in val}
    assert {s.label for s in val} == {0, 1}  # stratified
    assert patient_split(samples, 0.25, seed=1) == (train, val)
    assert patient_split(samples, 0.25, seed=2) != (train, val)
    assert samples_for(dataset, "val", 0.25, 1) == val


def test_byte_identical_duplicates_stay_on_one_side(tmp_path):
    root = write_kermany_dataset(tmp_path, n_per_class=(20, 20), size=40)
    normal = sorted((root / "train" / "NORMAL").iterdir())
    pneu = sorted((root / "train" / "PNEUMONIA").iterdir())
    for i in range(0, 20, 2):  # copy pneumonia images under other patients' names
        shutil.copy(pneu[i], pneu[i].with_name(f"person9{i:03d}_bacteria_1.jpeg"))
    samples = list_split(root, "train")
    for seed in range(5):
        train, val = patient_split(samples, 0.3, seed)
        train_bytes = {open(s.path, "rb").read() for s in train}
        assert not any(open(s.path, "rb").read() in train_bytes for s in val)
    assert normal


def test_class_folders_are_case_insensitive(tmp_path):
    root = write_kermany_dataset(tmp_path, n_per_class=(4, 4), size=40)
    (root / "train" / "NORMAL").rename(root / "train" / "normal")
    assert len(list_split(root, "train")) == 8


@pytest.mark.parametrize("breakage, words", [
    ("missing_class", "no PNEUMONIA/ folder"), ("empty_class", "no JPEG or PNG"),
    ("nested", "nested one level too deep"), ("missing_root", "does not exist"), ("class_dirs_at_root", "class folders"),
])
def test_wrong_layouts_explain_the_expected_layout(tmp_path, breakage, words):
    root = write_kermany_dataset(tmp_path / "d", n_per_class=(4, 4), size=40)
    if breakage == "missing_class":
        shutil.rmtree(root / "train" / "PNEUMONIA")
    elif breakage == "empty_class":
        for f in (root / "train" / "PNEUMONIA").iterdir():
            f.unlink()
    elif breakage == "nested":
        shutil.move(str(root), str(tmp_path / "inner"))
        (tmp_path / "outer").mkdir()
        shutil.move(str(tmp_path / "inner"), str(tmp_path / "outer" / "chest_xray"))
        root = tmp_path / "outer"
    elif breakage == "missing_root":
        root = tmp_path / "nope"
    elif breakage == "class_dirs_at_root":
        root = root / "train"
    with pytest.raises(DatasetError) as err:
        list_split(root, "train")
    assert words in str(err.value)
    assert "Expected layout" in str(err.value)


def test_non_images_are_ignored(tmp_path):
    root = write_kermany_dataset(tmp_path, n_per_class=(4, 4), size=40)
    (root / "train" / "NORMAL" / "notes.txt").write_text("hello")
    (root / "train" / "NORMAL" / ".DS_Store").write_bytes(b"\0")
    assert len(list_split(root, "train")) == 8
