"""The benchmarks that are not part of run_all's targets still run end to end (tiny sizes; figures unchecked)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))


def test_teacher_cache_bench_compares_both_arms(tiny_dataset, tmp_path, capsys):
    import teacher_cache

    r = teacher_cache.main(["--data", str(tiny_dataset), "--teacher", str(tmp_path / "none.safetensors"),
                            "--epochs", "1", "--size", "32", "--batch", "4", "--eval-size", "32",
                            "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert "randomly initialised teacher" in out and "cached vs online" in out
    assert r["online"]["cache_s"] < 1e-3 < r["cached"]["cache_s"]  # only the cached arm runs the teacher first
    for arm in ("online", "cached"):
        assert 0 <= r[arm]["auc"] <= 1 and r[arm]["epochs"] == 1
    diff, lo, hi = r["auc_difference"]
    assert lo <= diff <= hi


def test_resolution_bench_reports_each_phase(capsys):
    import resolution

    r = resolution.main(["--batch", "2", "--steps", "1", "--images", "100", "--full-size", "48"])
    assert set(r["phases"]) == {"pretrain", "finetune", "distill"}
    assert all(v["low"] > 0 and v["full"] > 0 for v in r["phases"].values())
    assert "of the training time saved" in capsys.readouterr().out


def test_onnx_runtime_export_matches_pytorch():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import inference
    import torch

    from kd.models import build_student

    model = build_student().eval()
    rate, diff = inference.onnx_rate(inference.onnx_session(model, threads=1), model, batch=2, repeats=1)
    assert rate > 0 and diff < 1e-3


def test_app_memory_bench_measures_a_real_server(capsys):
    import app_memory

    if not Path(app_memory.CHROMIUM).exists():
        pytest.skip(f"no chromium at {app_memory.CHROMIUM} (apt-get install chromium)")
    r = app_memory.main(["--files", "1"])
    assert r["files"] == 1 and 0 < r["idle_mib"] < r["loaded_mib"] <= r["peak_mib"]
    assert "X-rays diagnosed" in capsys.readouterr().out
