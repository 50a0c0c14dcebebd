"""Dataset layout checks and the patient-level split."""
import json
import shutil

import numpy as np

import pytest

from kd.data import DatasetError, list_split, patient_id, patient_split, samples_for, split_settings
from tests.fixtures.xray_fixtures import write_kermany_dataset


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


def test_the_training_seed_does_not_move_the_validation_split(dataset):
    """Seeds of a recipe (a seed ensemble, a noise estimate) must share one validation split."""
    from kd.config import preset
    from kd.distributed import Dist
    from kd.run_data import RunData

    runs = [preset("tiny", seed=seed, split_seed=3) for seed in (0, 1)]
    for cfg in runs:
        cfg.data = str(dataset)
    first, second = (RunData(cfg, Dist()).splits["val"] for cfg in runs)
    assert first == second == patient_split(list_split(dataset, "train"), 0.15, 3)[1]
    assert split_settings(runs[1].to_dict()) == (0.15, 3)
    # a config written before split_seed existed carved its split with the training seed
    assert split_settings({"val_fraction": 0.2, "seed": 5}) == (0.2, 5)


def test_byte_identical_duplicates_stay_on_one_side(tmp_path):
    root = write_kermany_dataset(tmp_path, n_per_class=(20, 20), size=40)
    pneu = sorted((root / "train" / "PNEUMONIA").iterdir())
    for i in range(0, 20, 2):  # copy pneumonia images under other patients' names
        shutil.copy(pneu[i], pneu[i].with_name(f"person9{i:03d}_bacteria_1.jpeg"))
    samples = list_split(root, "train")
    for seed in range(5):
        train, val = patient_split(samples, 0.3, seed)
        train_bytes = {open(s.path, "rb").read() for s in train}
        assert not any(open(s.path, "rb").read() in train_bytes for s in val)
    assert len(samples) == 40 + 10  # the ten copies were listed: there were duplicates to keep together


def test_class_folders_are_case_insensitive(tmp_path):
    root = write_kermany_dataset(tmp_path, n_per_class=(4, 4), size=40)
    (root / "train" / "NORMAL").rename(root / "train" / "normal")
    assert len(list_split(root, "train")) == 8


@pytest.mark.parametrize("breakage, words", [
    ("missing_class", "no PNEUMONIA/ folder"), ("empty_class", "has no images"),
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


def _unreadable(monkeypatch, folder):
    """`folder` cannot be listed, as without read permission (chmod does not stop root, who runs CI)."""
    import os

    def denied(real):
        def listing(path=".", *args):
            if os.path.abspath(os.fspath(path)) == str(folder):
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real(path, *args)
        return listing

    monkeypatch.setattr(os, "listdir", denied(os.listdir))
    monkeypatch.setattr(os, "scandir", denied(os.scandir))


@pytest.mark.parametrize("where", ["", "train", "train/NORMAL", "test"])
def test_an_unreadable_folder_is_a_dataset_error_naming_it(tmp_path, monkeypatch, where):
    from kd.data import check_root, load_splits

    root = write_kermany_dataset(tmp_path / "d", n_per_class=(4, 4), size=40, splits=("train", "test"))
    folder = root / where if where else root
    _unreadable(monkeypatch, folder)
    calls = [lambda: load_splits(root, 0.15, 0)] + ([lambda: check_root(root)] if folder == root else [])
    for call in calls:
        with pytest.raises(DatasetError, match=f"{folder} cannot be read \\(Permission denied\\)"):
            call()


def test_proc_as_a_dataset_is_a_dataset_error(tmp_path):
    """KD_DATA=/proc: entries even root may not look at (/proc/1/cwd in a container) are not the dataset."""
    from kd.data import check_root, load_splits

    for call in (lambda: check_root("/proc"), lambda: load_splits("/proc", 0.15, 0)):
        with pytest.raises(DatasetError, match="/proc has no train/ folder"):
            call()


def test_an_unlabeled_folder_that_cannot_be_listed_is_a_dataset_error(tmp_path, monkeypatch):
    from kd.data import list_unlabeled

    (tmp_path / "nih").mkdir()
    _unreadable(monkeypatch, tmp_path / "nih")
    with pytest.raises(DatasetError, match="nih cannot be read"):
        list_unlabeled([tmp_path / "nih"])


def test_a_class_of_files_that_are_not_images_names_them(tmp_path, capsys):
    """Files named .jpeg that decode to nothing: the run says which, instead of failing on an empty batch."""
    from kd.cli import main

    root = write_kermany_dataset(tmp_path / "d", n_per_class=(4, 4), size=40)
    for f in (root / "train" / "NORMAL").iterdir():
        f.write_bytes(b"<html>not an X-ray</html>")
    code = main(["finetune", "--data", str(root), "--out", str(tmp_path / "run"), "--preset", "tiny", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "none of the" in err and "NORMAL images could be read" in err
    assert str(root / "train" / "NORMAL") in err  # an example file, with why it was refused


def test_a_split_mostly_unreadable_is_refused_naming_files(tmp_path):
    import numpy as np

    from kd.cache import ImageSet, build_cache

    root = write_kermany_dataset(tmp_path / "d", n_per_class=(4, 4), size=40)
    paths = sorted(str(p) for p in (root / "train").rglob("*.jpeg"))
    for p in paths[1:4] + paths[5:8]:
        open(p, "wb").write(b"garbage")
    labels = [0 if "NORMAL" in p else 1 for p in paths]
    cache = build_cache(paths, 16, None, progress=False)
    with pytest.raises(DatasetError, match=f"only 2 of 8 labelled images could be read.*{paths[1]}"):
        ImageSet.from_cache(cache, labels)
    fine = build_cache(paths[:1] + paths[4:5], 16, None, progress=False)
    assert len(ImageSet.from_cache(fine, [labels[0], labels[4]])) == 2 and np.all(fine.valid)


DAMAGES = {  # what a damaged image cache looks like (issue 21, item 7): each is rebuilt, not a stopped run
    "garbage metadata": lambda data, meta: meta.write_text("{garbage"),
    "metadata nested too deeply": lambda data, meta: meta.write_text("[" * 100_000 + "]" * 100_000),
    "truncated array": lambda data, meta: data.write_bytes(data.read_bytes()[:200]),
    "metadata for fewer images": lambda data, meta: meta.write_text(json.dumps(
        {**json.loads(meta.read_text()), "n": 2, "valid": [True, True]})),
    "an array of another shape": lambda data, meta: np.save(data, np.zeros((3, 8, 8), np.uint8)),
    "metadata without errors": lambda data, meta: meta.write_text(json.dumps({"n": 4, "valid": [True] * 4})),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_image_cache_is_rebuilt(tmp_path, damage):
    from kd.cache import build_cache

    root = write_kermany_dataset(tmp_path / "d", n_per_class=(2, 2), size=40)
    paths = sorted(str(p) for p in (root / "train").rglob("*.jpeg"))
    good = np.array(build_cache(paths, 16, tmp_path / "c", progress=False).images)
    [data] = (tmp_path / "c").glob("*.npy")
    DAMAGES[damage](data, data.with_suffix(".json"))
    again = build_cache(paths, 16, tmp_path / "c", progress=False)
    assert np.array_equal(np.asarray(again.images), good) and again.valid.all() and again.errors == {}
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == sorted([data.name, data.with_suffix(".json").name])


class _Killed(Exception):
    """A second builder stopped mid-decode (killed, or still decoding when the first one reads)."""


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_second_builder_on_the_same_cache_never_takes_the_first_ones_images_away(tmp_path, monkeypatch, when):
    """Two runs sharing a cache_dir (bench/gpu_ssl.sh's control beside its pretraining) once lost a run: the second
    builder found the first one's array before its metadata, deleted it as damaged, and the first failed to open
    it. Here the second builder starts just before / after the first writes its metadata, and stops mid-decode."""
    import kd.cache
    from kd.cache import build_cache

    root = write_kermany_dataset(tmp_path / "d", n_per_class=(2, 2), size=40)
    paths = sorted(str(p) for p in (root / "train").rglob("*.jpeg"))
    good = np.array(build_cache(paths, 16, None, progress=False).images)
    write_meta, decode_into = kd.cache.write_json_atomic, kd.cache._decode_into

    def killed_mid_decode(out, *args, **kwargs):
        raise _Killed

    def second_builder():
        monkeypatch.setattr(kd.cache, "_decode_into", killed_mid_decode)
        try:  # it opens a finished cache, or starts decoding its own and is stopped
            build_cache(paths, 16, tmp_path / "c", progress=False)
        except _Killed:
            pass
        monkeypatch.setattr(kd.cache, "_decode_into", decode_into)

    def write_meta_beside_a_second_builder(path, obj):
        monkeypatch.setattr(kd.cache, "write_json_atomic", write_meta)
        if when == "before":
            second_builder()
        write_meta(path, obj)
        if when == "after":
            second_builder()

    monkeypatch.setattr(kd.cache, "write_json_atomic", write_meta_beside_a_second_builder)
    first = build_cache(paths, 16, tmp_path / "c", progress=False)
    assert np.array_equal(np.asarray(first.images), good) and first.valid.all()
    monkeypatch.setattr(kd.cache, "_decode_into", killed_mid_decode)  # what is on disk now opens without decoding
    assert np.array_equal(np.asarray(build_cache(paths, 16, tmp_path / "c", progress=False).images), good)
    assert sorted(p.suffix for p in (tmp_path / "c").iterdir()) == [".json", ".npy"]  # no temporaries left


def test_a_symlink_loop_or_dangling_link_is_named_as_such(tmp_path):
    from kd.data import check_root

    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(DatasetError, match="is a symbolic link that loops back on itself"):
        check_root(tmp_path / "loop")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(DatasetError, match=f"points to {tmp_path / 'gone'}, which does not exist"):
        check_root(tmp_path / "dangling")


def test_a_dataset_of_empty_files_is_not_found(tmp_path):
    root = write_kermany_dataset(tmp_path / "d", n_per_class=(3, 3), size=40)
    for p in (root / "train" / "NORMAL").iterdir():
        p.write_bytes(b"")
    with pytest.raises(DatasetError, match=r"All 3 files in .*NORMAL are empty \(0 bytes\)"):
        list_split(root, "train")


# ----------------------------------------------------------------------------- issue 20: the whole layout, up front

@pytest.mark.parametrize("damage, words", [
    ("no class folders", "has no NORMAL/ folder"),
    ("one class", "has no PNEUMONIA/ folder"),
    ("one image of a class", "training needs at least 2 of each class"),
    ("test without a class", "test has no PNEUMONIA/ folder"),
])
def test_check_layout_refuses_what_a_run_would_fail_on(tmp_path, damage, words):
    import shutil

    from kd.data import DatasetError, check_layout
    from tests.fixtures.xray_fixtures import write_kermany_dataset

    root = write_kermany_dataset(tmp_path / "data", n_per_class=(4, 4), size=32, splits=("train", "test"))
    assert check_layout(root) == {"train": {"NORMAL": 4, "PNEUMONIA": 4}, "test": {"NORMAL": 4, "PNEUMONIA": 4}}
    if damage == "no class folders":
        for d in ("NORMAL", "PNEUMONIA"):
            for f in (root / "train" / d).iterdir():
                f.rename(root / "train" / f.name)
            (root / "train" / d).rmdir()
    elif damage == "one class":
        shutil.rmtree(root / "train" / "PNEUMONIA")
    elif damage == "one image of a class":
        for f in sorted((root / "train" / "NORMAL").iterdir())[1:]:
            f.unlink()
    else:
        shutil.rmtree(root / "test" / "PNEUMONIA")
    with pytest.raises(DatasetError, match=words.replace("/", "/")):
        check_layout(root)
