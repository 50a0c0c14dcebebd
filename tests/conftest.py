"""Shared fixtures: a tiny trained run for the pipeline/CLI tests, which is also the app's tiny environment.

The `tiny` preset is trained once per test run (seconds at 32 px), shared by the pytest-xdist workers.
"""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest


def pytest_configure(config):
    """One compute thread per pytest-xdist worker (`pytest -n 2`), for the processes it starts too (CLI runs,
    the app's server and its jobs): two workers with a thread per core each would oversubscribe the cores,
    and on these tiny models OpenMP threads waiting for each other cost more than they give."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """The tests marked slow(seconds) first, longest first: with pytest-xdist handing out two tests at a time
    (pyproject.toml), the workers start on the long ones and finish together on the short ones, instead of
    one worker running the browser test alone at the end (longest-processing-time-first scheduling)."""
    def seconds(item) -> float:
        marker = item.get_closest_marker("slow")
        return marker.args[0] if marker and marker.args else 0.0

    items.sort(key=lambda item: -seconds(item))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A clean generated Kermany-layout dataset: train/val/test, 12 + 12 images each, 64 px."""
    from tests.fixtures.xray_fixtures import write_kermany_dataset

    return write_kermany_dataset(tmp_path_factory.mktemp("tiny_dataset") / "data", n_per_class=(12, 12), size=64,
                                 splits=("train", "val", "test"))


def _built_once(tmp_path_factory, name: str, build) -> Path:
    """A folder that `build(folder)` fills once per test run. Under pytest-xdist the workers share it: the
    first to come builds it under a lock, the others wait and reuse it (the session's tiny training is the
    suite's most expensive setup). Tests read it and copy what they change."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    import shutil

    from kd import locks

    folder = tmp_path_factory.getbasetemp().parent / name  # this run's pytest-N/, shared by its workers
    with locks.acquire(folder.with_suffix(".lock"), wait=900):
        if not (folder / ".built").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return folder


@pytest.fixture(scope="session")
def built_once(tmp_path_factory):
    """`built_once(name, build)`: the folder `build(folder)` filled once for this test run (see _built_once)."""
    return lambda name, build: _built_once(tmp_path_factory, name, build)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(data, out): a tiny dataset (train/val/test, 12 + 12 images each, one unreadable file in train/)
    and a finished `tiny` pipeline run on it (teacher, student and labels-only baseline student)."""
    from tests.fixtures.xray_fixtures import write_kermany_dataset

    def build(root: Path) -> None:
        data = write_kermany_dataset(root / "data", n_per_class=(12, 12), size=64, splits=("train", "val", "test"))
        (data / "train" / "PNEUMONIA" / "person900_bacteria_1.jpeg").write_bytes(b"not a jpeg at all")
        from kd.cli import main  # the command a user types, so that the card records it as `reproduce`

        assert main(["pipeline", "--preset", "tiny", "--data", str(data), "--out", str(root / "run"),
                     "--device", "cpu"]) == 0

    root = _built_once(tmp_path_factory, "tiny_run", build)
    return root / "data", root / "run"


@pytest.fixture(scope="session")
def served_tiny(tiny_run, tmp_path_factory):
    """(weights, data): the served files of `tiny_run` (teacher, students, card; not the phases' states) with
    the refusal check re-fitted on a generated dataset of 100 + 100 X-ray-like pictures. The run fitted its own
    at export, but on a validation split of a few images its threshold refuses many new X-ray-like pictures;
    with ~30 validation images about 1 in 30 (tests/test_ood.py)."""
    import shutil

    from kd.cli import main
    from tests.fixtures.xray_fixtures import dicom_bytes, write_kermany_dataset, xray16_array

    def build(root: Path) -> None:
        (root / "weights").mkdir()
        for f in tiny_run[1].iterdir():  # the served files only: the run's phase folders hold ~1 GB of states
            if f.is_file() and f.name not in ("train.log", "progress.jsonl", "status.json"):
                shutil.copy2(f, root / "weights" / f.name)
        data = write_kermany_dataset(root / "data", n_per_class=(100, 100), size=64, seed=3, splits=("train", "test"))
        for i in range(30):  # the tests' DICOMs too: 12-bit detector values, windowed when decoded
            for label, name in (("NORMAL", f"IM-{7000 + i}-0001.dcm"), ("PNEUMONIA", f"person{7000 + i}_virus_1.dcm")):
                (data / "train" / label / name).write_bytes(dicom_bytes(xray16_array(128, 128, seed=500 + i)))
        assert main(["fit-ood", "--weights", str(root / "weights"), "--data", str(root / "data")]) == 0

    root = _built_once(tmp_path_factory, "served_tiny", build)
    return root / "weights", root / "data"


@pytest.fixture(scope="session")
def tiny_weights(served_tiny):
    """The weights the app and CLI tests serve: `served_tiny`'s (teacher.safetensors, student.safetensors,
    model_card.json, ood.safetensors, framing.safetensors)."""
    return served_tiny[0]


@pytest.fixture(scope="session")
def kd_tiny(tiny_run, tiny_weights, tmp_path_factory):
    """The app's tiny world: `tiny_run`'s dataset (with its one unreadable training file, which every page must
    take in its stride) and its weights (teacher, student, labels-only student), trained once per session.
    Nothing in os.environ is changed here: use `app_env` for that."""
    return SimpleNamespace(root=tmp_path_factory.mktemp("kd_app"), data=tiny_run[0], weights=tiny_weights)


@pytest.fixture
def app_env(kd_tiny, tmp_path, monkeypatch):
    """Point the app at the tiny weights, a fresh runs folder and the tiny dataset (this test only)."""
    runs = tmp_path / "runs"
    runs.mkdir()
    env = {"KD_WEIGHTS": str(kd_tiny.weights), "KD_RUNS_DIR": str(runs), "KD_DATA": str(kd_tiny.data)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return SimpleNamespace(data=kd_tiny.data, weights=kd_tiny.weights, runs=runs, env=env, tmp=tmp_path)
