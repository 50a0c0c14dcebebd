"""Shared fixtures: a tiny trained run for the pipeline/CLI tests, and the app's tiny environment.

Both build a tiny Kermany-layout dataset and train the `tiny` preset once per session (seconds at 32 px).
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A clean generated Kermany-layout dataset: train/val/test, 12 + 12 images each, 64 px."""
    from kd.testing.xray_fixtures import write_kermany_dataset

    return write_kermany_dataset(tmp_path_factory.mktemp("tiny_dataset") / "data", n_per_class=(12, 12), size=64,
                                 splits=("train", "val", "test"))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(data, out): a tiny dataset (train/val/test, 12 + 12 images each, one unreadable file in train/)
    and a finished `tiny` pipeline run on it (teacher, student and labels-only baseline student)."""
    from kd.config import preset
    from kd.pipeline import run
    from kd.testing.xray_fixtures import write_kermany_dataset

    root = tmp_path_factory.mktemp("tiny_run")
    data = write_kermany_dataset(root / "data", n_per_class=(12, 12), size=64, splits=("train", "val", "test"))
    (data / "train" / "PNEUMONIA" / "person900_bacteria_1.jpeg").write_bytes(b"not a jpeg at all")
    out = root / "run"
    cfg = preset("tiny")
    cfg.data, cfg.out, cfg.device = str(data), str(out), "cpu"
    run(cfg, progress=False)
    return data, out


@pytest.fixture(scope="session")
def tiny_weights(tiny_run):
    """The weights folder of `tiny_run` (teacher.safetensors, student.safetensors, model_card.json)."""
    return tiny_run[1]


@pytest.fixture(scope="session")
def kd_tiny(tiny_dataset, tmp_path_factory):
    """The clean tiny dataset (12 + 12 images per split, 64 px) and tiny weights trained on it.

    Fine-tune + distil only (the app needs a teacher and a student, not the SSL phase). Nothing in
    os.environ is changed here: use `app_env` for that."""
    from kd.config import preset
    from kd.pipeline import run

    root = tmp_path_factory.mktemp("kd_app")
    data = tiny_dataset
    weights = root / "weights"
    cfg = preset("tiny")
    cfg.data, cfg.out, cfg.device, cfg.baseline = str(data), str(weights), "cpu", False
    run(cfg, phases=("finetune", "distill"), progress=False)
    assert (weights / "model_card.json").exists()
    return SimpleNamespace(root=root, data=data, weights=weights)


@pytest.fixture
def app_env(kd_tiny, tmp_path, monkeypatch):
    """Point the app at the tiny weights, a fresh runs folder and the tiny dataset (this test only)."""
    runs = tmp_path / "runs"
    runs.mkdir()
    env = {"KD_WEIGHTS": str(kd_tiny.weights), "KD_RUNS_DIR": str(runs), "KD_DATA": str(kd_tiny.data)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return SimpleNamespace(data=kd_tiny.data, weights=kd_tiny.weights, runs=runs, env=env, tmp=tmp_path)
