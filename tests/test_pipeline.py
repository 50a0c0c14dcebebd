"""End to end: the tiny pipeline on a generated dataset, then `evaluate` and `predict` on its weights;
kill-and-resume; unreadable images; crafted checkpoints refused."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kd.checkpoint import CheckpointError, load_state, save_state
from kd.cli import main
from tests.fixtures.xray_fixtures import BAD_UPLOADS, dicom_bytes, jpeg_bytes, png_bytes, write_kermany_dataset, xray16_array, \
    xray_like_array

REPO = Path(__file__).resolve().parent.parent


def test_pipeline_writes_weights_card_and_progress(tiny_run):
    data, out = tiny_run
    card = json.loads((out / "model_card.json").read_text())
    for role in ("teacher", "student", "student_baseline"):
        m = card["models"][role]
        assert (out / m["file"]).exists()
        assert 0.0 <= m["threshold"] <= 1.0 and m["calibration_temperature"] > 0
        v = m["validation"]
        assert set(v["ci"]) >= {"auc", "accuracy", "sensitivity", "specificity"}
        assert v["n_boot"] == m["test"]["n_boot"] == 100  # the tiny preset's Config.bootstrap
        assert v["n"] > 0
        assert m["test"]["n"] == 24  # the test split, reported beside validation, at the same threshold
        assert set(m["threshold_rules"]) == {"youden", "sensitivity", "calibrated-0.5"}
    assert card["models"]["teacher"]["architecture"] == "resnet50"
    assert card["models"]["student"]["architecture"] == "resnet18"
    assert card["input"]["mean"] == 0.5 and card["input"]["size"] == 32
    assert card["data"]["skipped_unreadable"] == 1
    assert set(card["wall_time_s"]) >= {"pretrain", "finetune", "distill", "total"}
    assert "knn_accuracy" in card["ssl_knn_probe"]
    assert card["git_commit"] and card["date"]
    assert all(v.dtype == torch.float16 for k, v in load_file(out / "student.safetensors").items() if v.is_floating_point())
    events = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    kinds = {e["kind"] for e in events}
    assert {"phase_start", "step", "epoch", "finished"} <= kinds
    step = next(e for e in events if e["kind"] == "step")
    assert {"phase", "epoch", "step", "loss", "lr", "images_per_s", "eta_s"} <= set(step)
    assert json.loads((out / "status.json").read_text())["state"] == "finished"
    split = json.loads((out / "split.json").read_text())
    assert not set(split["train"]["patients"]) & set(split["val"]["patients"])


def test_evaluate_json_has_the_keys_independent_evaluation_relies_on(tiny_run, tmp_path):
    data, out = tiny_run
    report = tmp_path / "eval.json"
    assert main(["evaluate", "--data", str(data), "--split", "test", "--weights", str(out), "--json", str(report),
                 "--bootstrap", "50", "--device", "cpu"]) == 0
    result = json.loads(report.read_text())
    card = json.loads((out / "model_card.json").read_text())
    for role in ("teacher", "student"):
        r = result[role]
        assert {"auc", "accuracy", "sensitivity", "specificity", "threshold", "ci", "roc", "calibration"} <= set(r)
        assert r["threshold"] == pytest.approx(card["models"][role]["threshold"])
        assert r["confusion_matrix"]["tp"] + r["confusion_matrix"]["fn"] == r["n_positive"]
    assert result["n"] == 24


def test_predict_names_each_file_and_refuses_bad_ones(served_tiny, tmp_path, capsys):
    """Good pictures of each format get both probabilities; served_tiny's refusal check is fitted on 200 X-ray-like
    pictures (the tiny run's own, on a few validation images, refuses some good ones depending on the thread count)."""
    out, _ = served_tiny
    good = tmp_path / "a.jpg"
    good.write_bytes(jpeg_bytes(xray_like_array(300, 260)))
    png = tmp_path / "b.png"
    png.write_bytes(png_bytes(xray_like_array(200, 200)))
    dcm = tmp_path / "c.dcm"
    dcm.write_bytes(dicom_bytes(xray16_array()))
    make, filename = BAD_UPLOADS["text_as_jpg"]
    bad = tmp_path / filename
    bad.write_bytes(make())
    code = main(["predict", "--weights", str(out), str(good), str(png), str(dcm), str(bad), str(tmp_path / "gone.png")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 2 and len(lines) == 5
    for path, line in zip((good, png, dcm), lines):
        assert line.startswith(str(path)) and "teacher p(pneumonia)=" in line and "student p(pneumonia)=" in line
    assert lines[3].startswith(str(bad)) and "refused" in lines[3] and "Traceback" not in lines[3]
    assert "gone.png" in lines[4] and "refused" in lines[4]
    assert main(["predict", "--weights", str(out), "--json", str(good)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert 0 <= record["teacher"]["probability"] <= 1 and record["student"]["decision"] in ("NORMAL", "PNEUMONIA")


def test_cli_reports_wrong_dataset_without_traceback(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["pipeline", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r"), "--preset", "tiny"]) == 1
    err = capsys.readouterr().err
    assert "no train/ folder" in err and "Expected layout" in err and "Traceback" not in err


def test_crafted_pickle_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"objective": Evil()}, path)
    with pytest.raises(CheckpointError):
        load_state(path)
    assert not marker.exists()


def test_atomic_save_keeps_previous_checkpoint_when_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    save_state({"epoch": 1, "w": torch.ones(3)}, path)

    def broken_save(obj, f):
        Path(f).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(CheckpointError, match="No space left"):
        save_state({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_state(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def _train_cmd(data, out):
    return [sys.executable, "-m", "kd", "finetune", "--data", str(data), "--out", str(out), "--preset", "tiny",
            "--epochs", "3", "--batch-size", "4", "--device", "cpu", "--no-baseline"]


@pytest.mark.slow(11)  # seconds on an idle machine, alone
def test_killed_run_resumes_to_the_same_weights(tmp_path):
    """A real SIGKILL of a `kd finetune` process after its first checkpoint; `--resume` ends at the weights of
    a run never interrupted. The kill needs its own process; the resume and the uninterrupted run happen in
    this one, with the killed process's single thread (bit-identical results need the same thread count)."""
    data = write_kermany_dataset(tmp_path / "data", n_per_class=(10, 10), size=40)  # 4 steps an epoch
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(data, killed), env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        progress = killed / "progress.jsonl"
        if progress.exists() and '"kind": "epoch"' in progress.read_text():
            os.kill(proc.pid, signal.SIGKILL)  # mid-run, after at least one checkpoint
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "finetune" / "done.json").exists()
    saved_epoch = load_state(killed / "finetune" / "state.pt")["epoch"]

    ref = tmp_path / "ref"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_train_cmd(data, killed)[3:] + ["--resume"]) == 0
        assert main(_train_cmd(data, ref)[3:]) == 0
    finally:
        torch.set_num_threads(threads)
    events = [json.loads(x) for x in (killed / "progress.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "resume" and e["epoch"] == saved_epoch + 1 for e in events)
    a = load_file(ref / "finetune" / "teacher.safetensors")
    b = load_file(killed / "finetune" / "teacher.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pretrain_uses_unlabeled_folders_recursively(tmp_path):
    data = write_kermany_dataset(tmp_path / "data", n_per_class=(6, 6), size=40)
    extra = tmp_path / "nih" / "images_001" / "deep"
    extra.mkdir(parents=True)
    for i in range(5):
        (extra / f"{i:05d}.png").write_bytes(png_bytes(xray_like_array(48, 48, seed=i)))
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(data), "--out", str(out), "--preset", "tiny", "--device", "cpu",
                 "--ssl-method", "byol", "--unlabeled", str(tmp_path / "nih")]) == 0
    start = next(json.loads(x) for x in (out / "progress.jsonl").read_text().splitlines() if '"phase_start"' in x)
    assert start["train_images"] == json.loads((out / "split.json").read_text())["train"]["NORMAL"]["images"] + \
        json.loads((out / "split.json").read_text())["train"]["PNEUMONIA"]["images"] + 5
    assert (out / "pretrain" / "teacher.safetensors").exists()
    assert not (out / "model_card.json").exists()  # nothing fine-tuned yet: no card


def test_pretraining_on_the_corpus_alone_leaves_the_labelled_images_to_the_knn_probe(tmp_path, capsys):
    """--no-pretrain-labelled: SSL sees the unlabeled folders only, the kNN probe still scores validation against
    the labelled train split, and the card's config says how the teacher was pretrained; without folders it is
    refused before anything starts."""
    data = write_kermany_dataset(tmp_path / "data", n_per_class=(6, 6), size=40)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(5):
        (corpus / f"{i}.png").write_bytes(png_bytes(xray_like_array(48, 56, seed=i)))
    common = ["--data", str(data), "--preset", "tiny", "--device", "cpu", "--no-pretrain-labelled", "--no-baseline"]
    assert main(["pretrain", "--out", str(tmp_path / "refused"), *common]) == 1
    assert "pretraining without the labelled images needs unlabeled folders" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    out = tmp_path / "run"
    assert main(["pipeline", "--out", str(out), *common, "--unlabeled", str(corpus)]) == 0
    events = [json.loads(x) for x in (out / "progress.jsonl").read_text().splitlines()]
    start = next(e for e in events if e["kind"] == "phase_start" and e["phase"] == "pretrain")
    assert start["train_images"] == 5
    done = json.loads((out / "pretrain" / "done.json").read_text())
    assert done["train_images"] == done["unlabeled_images"] == 5
    assert 0.0 <= done["metrics"]["knn_accuracy"] <= 1.0  # the probe's bank: labelled train images, not the corpus
    card = json.loads((out / "model_card.json").read_text())
    assert card["config"]["pretrain_labelled"] is False
    assert card["data"]["unlabeled"]["used_for"] == ["SSL pretraining"]


def test_a_recipe_that_pretrains_only_on_a_corpus_skips_pretraining_without_one(tmp_path, capsys):
    """pretrain_needs_unlabeled (the cpu preset's SimCLR): without unlabeled folders the pipeline starts at
    fine-tuning and says so, and `kd pretrain` alone is refused naming --unlabeled; with them it pretrains."""
    from kd.config import Config, preset

    assert preset("cpu").skips_pretraining and not preset("tiny").skips_pretraining
    assert preset("cpu").pretrain.epochs > 0 and not preset("cpu", unlabeled=["/corpus"]).skips_pretraining
    assert not Config.from_dict({}).pretrain_needs_unlabeled  # a config.json saved before it: pretrains as it did
    data = write_kermany_dataset(tmp_path / "data", n_per_class=(4, 4), size=40)
    recipe = preset("tiny", pretrain_needs_unlabeled=True)
    recipe.save(tmp_path / "needs_corpus.json")
    common = ["--data", str(data), "--config", str(tmp_path / "needs_corpus.json"), "--device", "cpu"]
    assert main(["pretrain", "--out", str(tmp_path / "p"), *common]) == 1
    assert "give unlabeled folders (--unlabeled DIR ..." in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
    out = tmp_path / "run"
    assert main(["pipeline", "--out", str(out), "--no-baseline", *common]) == 0
    assert "SSL pretraining skipped, the teacher is fine-tuned from scratch" in capsys.readouterr().err
    assert not (out / "pretrain").exists() and (out / "student.safetensors").is_file()
    assert json.loads((out / "status.json").read_text())["phases"] == ["finetune", "distill"]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"{i}.png").write_bytes(png_bytes(xray_like_array(48, 48, seed=i)))
    assert main(["pretrain", "--out", str(tmp_path / "p"), *common, "--unlabeled", str(corpus)]) == 0
    assert (tmp_path / "p" / "pretrain" / "teacher.safetensors").is_file()


def test_distill_before_finetune_says_what_is_missing(tmp_path, capsys):
    data = write_kermany_dataset(tmp_path / "data", n_per_class=(4, 4), size=40)
    assert main(["distill", "--data", str(data), "--out", str(tmp_path / "r"), "--preset", "tiny"]) == 1
    assert "run the phase that produces it first" in capsys.readouterr().err


def _distill_after_tiny_finetune(tiny_run, tmp_path, monkeypatch):
    """(data, a run folder holding the tiny run's fine-tuned teacher, the `enabled` of every torch.autocast
    entered from here on)."""
    import torch

    data, ref = tiny_run
    out = tmp_path / "run"
    (out / "finetune").mkdir(parents=True)
    (out / "finetune" / "teacher.safetensors").write_bytes((ref / "finetune" / "teacher.safetensors").read_bytes())
    autocasts, real_autocast = [], torch.autocast

    def spy(*args, **kwargs):
        autocasts.append(kwargs.get("enabled", True))
        return real_autocast(*args, **kwargs)

    monkeypatch.setattr(torch, "autocast", spy)
    return data, out, autocasts


def test_distill_with_cached_teacher_targets(tiny_run, tmp_path, monkeypatch):
    """--teacher-targets cached: the teacher's logits are computed once, served with every batch. Also
    --cpu-bf16 on a CPU with native bf16: the training steps run under bf16 autocast (and evaluation does not)."""
    from kd import distributed

    monkeypatch.setattr(distributed, "cpu_has_native_bf16", lambda: True)  # as on an AVX512-BF16 CPU
    data, out, autocasts = _distill_after_tiny_finetune(tiny_run, tmp_path, monkeypatch)
    assert main(["distill", "--data", str(data), "--out", str(out), "--preset", "tiny", "--device", "cpu",
                 "--teacher-targets", "cached", "--no-baseline", "--cpu-bf16"]) == 0
    assert json.loads((out / "config.json").read_text())["cpu_bf16"] is True
    events = [json.loads(x) for x in (out / "progress.jsonl").read_text().splitlines()]
    cached = [e for e in events if e["kind"] == "teacher_targets"]
    assert cached and cached[0]["images"] == next(e for e in events if e["kind"] == "phase_start")["train_images"]
    steps = max(e["total_steps"] for e in events if e["kind"] == "step")
    assert sum(autocasts) == steps  # bf16 in every training step; evaluation and export stay float32
    assert (out / "distill" / "student.safetensors").exists()
    assert not (out / "baseline").exists()  # --no-baseline: no labels-only twin
    assert json.loads((out / "config.json").read_text())["teacher_targets"] == "cached"
    card = json.loads((out / "model_card.json").read_text())  # written by code: the command that made it
    assert card["reproduce"] == f"python -m kd distill --data {data} --out {out} --preset tiny --device cpu " \
                                "--teacher-targets cached --no-baseline --cpu-bf16"
    done = json.loads((out / "distill" / "done.json").read_text())  # caching counts in the phase's wall time
    assert 0 < done["prep_seconds"] and done["seconds"] == done["prep_seconds"] + sum(h["seconds"] for h in done["history"])


def test_distill_trains_the_labels_only_twin_unless_told_not_to(tiny_run, tmp_path, monkeypatch):
    """`kd distill` alone brings the claim's control: the labels-only student of the same budget and teacher stem,
    exported beside the distilled one (what bench/kd_transfer.py compares); --no-baseline leaves it out."""
    data, out, _ = _distill_after_tiny_finetune(tiny_run, tmp_path, monkeypatch)
    assert main(["distill", "--data", str(data), "--out", str(out), "--preset", "tiny", "--device", "cpu"]) == 0
    assert (out / "baseline" / "done.json").is_file() and (out / "student_baseline.safetensors").is_file()
    card = json.loads((out / "model_card.json").read_text())
    assert {"student", "student_baseline"} <= set(card["models"])
    status = json.loads((out / "status.json").read_text())
    assert status["phases"] == ["distill", "baseline"] and status["state"] == "finished"


def test_distill_builds_on_another_runs_teacher(tiny_run, tmp_path):
    """`kd distill --from-run RUN` into a new folder: RUN's fine-tuned teacher (and its pretraining) is adopted with
    its records and settings, so the new run's card says how its teacher was made, not what --epochs set."""
    data, ref = tiny_run
    out = tmp_path / "from"
    assert main(["distill", "--data", str(data), "--out", str(out), "--preset", "tiny", "--device", "cpu",
                 "--from-run", str(ref), "--epochs", "2", "--seed", "3", "--no-baseline"]) == 0
    assert load_file(out / "finetune" / "teacher.safetensors").keys() == load_file(ref / "finetune" / "teacher.safetensors").keys()
    for k, v in load_file(ref / "finetune" / "teacher.safetensors").items():
        assert torch.equal(load_file(out / "finetune" / "teacher.safetensors")[k], v), k
    card, ref_card = (json.loads((d / "model_card.json").read_text()) for d in (out, ref))
    assert card["phases"]["finetune"]["from_run"] == str(ref.resolve()) == card["config"]["from_run"]
    assert set(card["phases"]) == {"pretrain", "finetune", "distill"}  # the teacher's pretraining is on record too
    assert card["config"]["finetune"] == ref_card["config"]["finetune"] and card["config"]["finetune"]["epochs"] == 1
    assert card["config"]["distill"]["epochs"] == 2 and card["phases"]["distill"]["epochs"] == 2
    assert card["models"]["teacher"]["test"]["auc"] == pytest.approx(ref_card["models"]["teacher"]["test"]["auc"])
    assert "--from-run" in card["reproduce"]
    teacher = tmp_path / "teacher"  # finetune builds on a run's pretrained backbone the same way
    assert main(["finetune", "--data", str(data), "--out", str(teacher), "--preset", "tiny", "--device", "cpu",
                 "--from-run", str(out), "--seed", "4"]) == 0
    card = json.loads((teacher / "model_card.json").read_text())
    assert set(card["phases"]) == {"pretrain", "finetune"} and "from_run" not in card["phases"]["finetune"]
    assert card["phases"]["pretrain"]["from_run"] == str(out.resolve())


def test_building_on_another_run_is_refused_where_its_teacher_does_not_fit(tiny_run, tmp_path, capsys):
    """--from-run is refused, with a message naming the reason and nothing written, where the teacher could not be
    this run's: another validation split (it may have trained on this run's validation patients), other
    validation patients on record, an unfinished phase, a phase the run folder holds already, or a command with
    nothing to build on."""
    data, ref = tiny_run
    base = ["--data", str(data), "--preset", "tiny", "--device", "cpu", "--from-run", str(ref)]

    def refused(argv: list[str], words: str, out: Path) -> None:
        existed = out.exists() and sorted(out.rglob("*"))
        assert main(argv + ["--out", str(out)]) == 1
        assert words in capsys.readouterr().err
        assert (out.exists() and sorted(out.rglob("*"))) == existed  # nothing written

    refused(["distill", *base, "--split-seed", "5"], "validation split", tmp_path / "a")
    refused(["pipeline", *base], "use it with finetune or distill", tmp_path / "b")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_bytes((ref / "config.json").read_bytes())
    refused(["distill", *base[:-1], str(unfinished)], "its finetune phase has not finished", tmp_path / "c")
    other = tmp_path / "other"  # the same teacher, but its record names other validation patients
    (other / "finetune").mkdir(parents=True)
    for f in ("config.json", "finetune/done.json", "finetune/teacher.safetensors"):
        (other / f).write_bytes((ref / f).read_bytes())
    split = json.loads((ref / "split.json").read_text())
    split["val"]["patients"] = split["val"]["patients"][1:]
    (other / "split.json").write_text(json.dumps(split))
    assert main(["distill", *base[:-1], str(other), "--out", str(tmp_path / "d"), "--no-baseline"]) == 1
    assert "validation patients are not this run's" in capsys.readouterr().err
    assert not (tmp_path / "d" / "finetune").exists() and not (tmp_path / "d" / "distill").exists()
    own = tmp_path / "own"
    (own / "finetune").mkdir(parents=True)
    for f in ("finetune/done.json", "finetune/teacher.safetensors"):
        (own / f).write_bytes((other / f).read_bytes())
    assert main(["distill", *base, "--out", str(own), "--no-baseline"]) == 1
    assert "holds a finetune phase of its own" in capsys.readouterr().err
    assert not (own / "distill").exists()


def test_teacher_targets_over_test_time_views_are_the_teachers_mean_over_them(tiny_run, tmp_path, monkeypatch):
    """--teacher-targets cached-tta: what the student matches is the teacher's mean logit over kd.augment.TTA_VIEWS
    of each training image, computed once."""
    import numpy as np
    import torch

    from kd import objectives, pipeline
    from kd.augment import TTA_VIEWS
    from kd.scoring import predict_logits

    cached = []
    real = objectives.cache_teacher_logits

    def spy(teachers, images, image_size, device, batch_size=64, views=None):
        out = real(teachers, images, image_size, device, batch_size, views=views)
        cached.append((teachers[0], images, image_size, views, out.teacher_logits))
        return out

    monkeypatch.setattr(pipeline, "cache_teacher_logits", spy)
    data, out, _ = _distill_after_tiny_finetune(tiny_run, tmp_path, monkeypatch)
    assert main(["distill", "--data", str(data), "--out", str(out), "--preset", "tiny", "--device", "cpu",
                 "--teacher-targets", "cached-tta", "--no-baseline"]) == 0
    (teacher, images, size, views, logits), = cached
    assert views == TTA_VIEWS
    expected = predict_logits(teacher, images, size, torch.device("cpu"), views=TTA_VIEWS)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(logits, predict_logits(teacher, images, size, torch.device("cpu")), atol=1e-5)
    assert json.loads((out / "config.json").read_text())["teacher_targets"] == "cached-tta"
    assert (out / "distill" / "student.safetensors").exists()


def test_cpu_bf16_without_native_bf16_trains_in_float32(tiny_run, tmp_path, monkeypatch, capsys):
    """--cpu-bf16 on a CPU without native bf16 (AVX2 only): emulated bf16 made training steps 6-12x slower than
    float32 (bench/cpu_bf16.py), so no step runs under autocast, and the run says why in its status, on the
    console and on the Train page."""
    import torch

    from kd import distributed
    from kd.progress import load_status

    monkeypatch.setattr(distributed, "cpu_has_native_bf16", lambda: False)
    data, out, autocasts = _distill_after_tiny_finetune(tiny_run, tmp_path, monkeypatch)
    assert main(["distill", "--data", str(data), "--out", str(out), "--preset", "tiny", "--device", "cpu",
                 "--teacher-targets", "cached", "--no-baseline", "--cpu-bf16"]) == 0
    events = [json.loads(x) for x in (out / "progress.jsonl").read_text().splitlines()]
    assert autocasts.count(False) >= max(e["total_steps"] for e in events if e["kind"] == "step") > 0
    assert True not in autocasts  # no step, no evaluation under bf16
    precision = load_status(out)["precision"]
    assert precision.startswith("float32") and "no native bf16" in precision
    assert f"training precision: {precision}" in capsys.readouterr().err
    assert distributed.training_precision(torch.device("cpu"), asked=False) == "float32"
    monkeypatch.setattr(distributed, "cpu_has_native_bf16", lambda: True)
    assert distributed.training_precision(torch.device("cpu"), asked=True) == "bf16 autocast"


def _mixed_unlabeled_folder(root: Path) -> Path:
    """Unlabeled pictures of mixed sizes and modes, as an outside corpus comes: grey and RGB JPEG, 16-bit and
    RGBA PNG, portrait and landscape, in nested folders, and one file that is not an image."""
    import numpy as np

    (root / "a" / "deep").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "a" / "0.jpeg").write_bytes(jpeg_bytes(xray_like_array(60, 40, seed=11)))
    (root / "a" / "deep" / "1.png").write_bytes(png_bytes(xray16_array(36, 52, seed=12)))
    rgb = np.repeat(xray_like_array(48, 64, seed=13)[..., None], 3, axis=2)
    (root / "b" / "2.jpg").write_bytes(jpeg_bytes(rgb))
    rgba = np.concatenate([rgb[:40, :40], np.full((40, 40, 1), 255, np.uint8)], axis=2)
    (root / "b" / "3.png").write_bytes(png_bytes(rgba))
    (root / "b" / "notes.txt").write_text("not an image")
    (root / "manifest.csv").write_text("file,source_repo,licence\na/0.jpeg,org/x,CC BY 4.0\nb/2.jpg,org/x,CC BY 4.0\n"
                                       "b/3.png,org/y,research use only\n")
    return root


def test_distillation_on_unlabeled_images_too(tiny_run, tmp_path):
    """--distill-unlabeled: distillation's transfer set is the labelled train images plus the unlabeled folders
    (their label -1 gets the soft term only, tests/test_losses.py); the labels-only student never sees them,
    and the model card counts them. The run resumes after the tiny run's fine-tuning (its teacher)."""
    import shutil

    data, ref = tiny_run
    corpus = _mixed_unlabeled_folder(tmp_path / "corpus")
    out = tmp_path / "run"
    for phase in ("pretrain", "finetune"):
        shutil.copytree(ref / phase, out / phase, ignore=shutil.ignore_patterns("state.pt"))
    seen_labels = []
    import kd.objectives as objectives
    real = objectives.distillation_loss

    def spy(s, t, labels, *a, **k):
        seen_labels.append(labels.clone())
        return real(s, t, labels, *a, **k)

    objectives.distillation_loss = spy
    try:
        assert main(["pipeline", "--data", str(data), "--out", str(out), "--preset", "tiny", "--device", "cpu",
                     "--teacher-targets", "cached", "--unlabeled", str(corpus), "--distill-unlabeled",
                     "--resume"]) == 0
    finally:
        objectives.distillation_loss = real
    events = [json.loads(x) for x in (out / "progress.jsonl").read_text().splitlines()]
    starts = {e["phase"]: e["train_images"] for e in events if e["kind"] == "phase_start"}
    assert starts["distill"] == starts["baseline"] + 4  # 4 pictures (the text file is not one); labels alone: none
    assert next(e for e in events if e["kind"] == "teacher_targets")["images"] == starts["distill"]
    every = torch.cat(seen_labels)
    assert 0 < (every == -1).sum() <= 4 and (every >= 0).sum() > 0  # batches mix both (one epoch, last one dropped)
    card = json.loads((out / "model_card.json").read_text())
    assert card["data"]["unlabeled_images"] == 4
    assert json.loads((out / "config.json").read_text())["distill_unlabeled"] is True
    provenance = card["data"]["unlabeled"]  # the corpus named: count, sources, licences, how it was kept apart
    assert provenance["used_for"] == ["distillation's transfer set"]  # the copied pretraining ran without them
    assert "byte-identical" in provenance["kept_apart"]
    [folder] = provenance["folders"]
    assert folder["images"] == 4 and sorted(map(tuple, (d.values() for d in folder["sources"]))) == [
        ("", "not in manifest.csv", 1), ("org/x", "CC BY 4.0", 2), ("org/y", "research use only", 1)]


def test_unlabeled_provenance_without_or_with_a_broken_manifest(tmp_path):
    from kd.data import list_unlabeled, unlabeled_provenance

    corpus = _mixed_unlabeled_folder(tmp_path / "c")
    (corpus / "manifest.csv").write_bytes(b"\xff\xfe broken")
    [entry] = unlabeled_provenance([str(corpus)], list_unlabeled([corpus]))
    assert entry["images"] == 4 and "unreadable" in entry["licences"] and "manifest.csv" in entry["licences"]
    (corpus / "manifest.csv").unlink()
    [entry] = unlabeled_provenance([str(corpus)], list_unlabeled([corpus]))
    assert "no manifest.csv" in entry["licences"]


def test_distill_unlabeled_needs_unlabeled_folders(tmp_path, capsys):
    data = write_kermany_dataset(tmp_path / "data", n_per_class=(4, 4), size=40)
    assert main(["distill", "--data", str(data), "--out", str(tmp_path / "r"), "--preset", "tiny",
                 "--distill-unlabeled"]) == 1
    assert "needs unlabeled folders" in capsys.readouterr().err


@pytest.mark.parametrize("init", ["teacher-stem", "scratch"])
def test_student_init_from_the_teacher_stem_or_scratch(init):
    from kd.config import preset
    from kd.models import build_teacher
    from kd.objectives import class_weights
    from kd.pipeline import student_objective

    torch.manual_seed(0)
    teacher = build_teacher()
    cfg = preset("tiny", student_init=init)
    objective, _, _ = student_objective("distill", cfg, teacher, None, class_weights([1, 1]), torch.device("cpu"))
    same = torch.equal(objective.student.conv1.weight, teacher.conv1.weight)
    assert same is (init == "teacher-stem")


def test_an_ensemble_of_teachers_is_distilled_through_its_mean_logits(tiny_run, tmp_path):
    """--extra-teachers: each teacher's logits are computed once and their mean is the distillation target."""
    import numpy as np

    from kd.cache import ImageSet
    from kd.models import build_teacher
    from kd.objectives import cache_teacher_logits
    from kd.scoring import predict_logits

    torch.manual_seed(0)
    a, b = build_teacher().eval(), build_teacher().eval()
    rng = np.random.default_rng(0)
    images = ImageSet(rng.integers(0, 255, (6, 40, 40), dtype=np.uint8), np.array([0, 1, 0, 1, 1, 0]),
                      np.arange(6))
    device = torch.device("cpu")
    za, zb = (predict_logits(m, images, 32, device, 4) for m in (a, b))
    assert not np.allclose(za, zb)
    mean = cache_teacher_logits([a, b], images, 32, device, 4).teacher_logits
    np.testing.assert_allclose(mean, (za + zb) / 2, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cache_teacher_logits(a, images, 32, device, 4).teacher_logits, za, rtol=1e-4, atol=1e-5)

    data, ref = tiny_run
    out = tmp_path / "run"
    (out / "finetune").mkdir(parents=True)
    (out / "finetune" / "teacher.safetensors").write_bytes((ref / "finetune" / "teacher.safetensors").read_bytes())
    extra = ref / "finetune" / "teacher.safetensors"
    assert main(["distill", "--data", str(data), "--out", str(out), "--preset", "tiny", "--device", "cpu",
                 "--teacher-targets", "cached", "--no-baseline", "--extra-teachers", str(extra)]) == 0
    events = [json.loads(x) for x in (out / "progress.jsonl").read_text().splitlines()]
    assert next(e for e in events if e["kind"] == "teacher_targets")["teachers"] == 2
    card = json.loads((out / "model_card.json").read_text())
    assert card["config"]["extra_teachers"] == [str(extra)]


def test_an_ensemble_of_teachers_is_refused_without_cached_targets_or_weights(tmp_path, capsys):
    data = write_kermany_dataset(tmp_path / "data", n_per_class=(4, 4), size=40)
    weights = tmp_path / "teacher.safetensors"
    weights.write_bytes(b"x")
    assert main(["distill", "--data", str(data), "--out", str(tmp_path / "r"), "--preset", "tiny",
                 "--teacher-targets", "online", "--extra-teachers", str(weights)]) == 1
    assert "use teacher targets 'cached' or 'cached-tta' with extra_teachers" in capsys.readouterr().err
    assert main(["distill", "--data", str(data), "--out", str(tmp_path / "r"), "--preset", "tiny",
                 "--teacher-targets", "cached", "--extra-teachers", str(tmp_path / "gone.safetensors")]) == 1
    assert "extra teacher weights not found" in capsys.readouterr().err


def test_cached_teacher_targets_refuse_the_feature_hint(tmp_path, capsys):
    data = write_kermany_dataset(tmp_path / "data", n_per_class=(4, 4), size=40)
    assert main(["distill", "--data", str(data), "--out", str(tmp_path / "r"), "--preset", "tiny",
                 "--teacher-targets", "cached", "--hint-weight", "0.5"]) == 1
    assert "feature maps" in capsys.readouterr().err


def test_image_set_serves_cached_logits_with_each_batch():
    import dataclasses

    import numpy as np

    from kd.cache import ImageSet

    images = np.arange(5 * 4 * 4, dtype=np.uint8).reshape(5, 4, 4)
    s = ImageSet(images, np.array([0, 1, 0, 1]), np.array([4, 0, 2, 3]))
    assert len(s.batch([2, 0], torch.device("cpu"))) == 2
    logits = np.arange(8, dtype=np.float32).reshape(4, 2)
    x, y, t = dataclasses.replace(s, teacher_logits=logits).batch([2, 0], torch.device("cpu"))
    assert torch.equal(x[0], torch.from_numpy(images[2])) and torch.equal(x[1], torch.from_numpy(images[4]))
    assert y.tolist() == [0, 0] and t.tolist() == [[4, 5], [0, 1]]


def _copy_into(src, dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes())


def test_a_test_image_among_the_training_images_fails_the_run_loudly(tmp_path, capsys):
    data = write_kermany_dataset(tmp_path / "data", n_per_class=(4, 4), size=40, splits=("train", "test"))
    leaked = next((data / "test" / "NORMAL").iterdir())
    _copy_into(leaked, data / "train" / "NORMAL" / "IM-9999-0001.jpeg")  # same bytes, another name
    assert main(["finetune", "--data", str(data), "--out", str(tmp_path / "r"), "--preset", "tiny",
                 "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "byte-identical to held-out images" in err and leaked.name in err and "(test)" in err
    assert not (tmp_path / "r" / "finetune").exists()  # refused before any training


def test_unlabeled_images_that_are_validation_or_test_images_are_refused(tmp_path, capsys):
    data = write_kermany_dataset(tmp_path / "data", n_per_class=(4, 4), size=40, splits=("train", "val"))
    extra = tmp_path / "unlabeled"
    official_val = next((data / "val" / "PNEUMONIA").iterdir())
    _copy_into(official_val, extra / "a" / "copy.png")
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "r"), "--preset", "tiny",
                 "--device", "cpu", "--unlabeled", str(extra)]) == 1
    err = capsys.readouterr().err
    assert "--unlabeled" in err and "(official-val)" in err


def test_one_file_gives_one_probability_in_the_app_in_predict_and_in_evaluate(served_tiny, tmp_path):
    """Diagnose (kd.serving.diagnose), `kd predict` (kd.serving.predict_bytes) and `kd evaluate` decode and
    preprocess the same way, apply the same calibration: one full-resolution JPEG, one probability."""
    from kd.evaluate import evaluate_weights
    from kd.serving import diagnose, load_pair, predict_bytes
    from tests.fixtures.xray_fixtures import jpeg_bytes, xray_like_array

    weights = tmp_path / "weights"
    weights.mkdir()
    for f in served_tiny[0].iterdir():
        if f.suffix in (".safetensors", ".json") and f.name != "config.json" and f.is_file():
            _copy_into(f, weights / f.name)
    card = json.loads((weights / "model_card.json").read_text())
    card["input"]["contrast"] = "equalize"  # exercise the contrast step on every path
    (weights / "model_card.json").write_text(json.dumps(card))
    from kd.refusal_fit import fit_checks

    fit_checks(weights, served_tiny[1])  # the refusal check sees the models' squares: re-fitted for the new contrast
    big = jpeg_bytes(xray_like_array(1700, 1800, seed=7))  # decoded with a JPEG draft on every path
    data = tmp_path / "data"
    _copy_into_bytes = lambda path, b: (path.parent.mkdir(parents=True, exist_ok=True), path.write_bytes(b))  # noqa
    _copy_into_bytes(data / "test" / "NORMAL" / "IM-0001-0001.jpeg", big)
    _copy_into_bytes(data / "test" / "PNEUMONIA" / "person1_virus_1.jpeg", jpeg_bytes(xray_like_array(300, 300, 8)))
    pair = load_pair(weights)
    app = diagnose(pair, big, "IM-0001-0001.jpeg")
    cli = predict_bytes(pair, big, "IM-0001-0001.jpeg")
    report = evaluate_weights(weights, data, "test", n_boot=10)
    row = report["files"].index(str(data / "test" / "NORMAL" / "IM-0001-0001.jpeg"))
    for role in ("teacher", "student"):
        p = cli[role]["probability"]
        assert abs(app.views[role].probability - p) < 1e-4
        assert abs(report[role]["probabilities"][row] - p) < 1e-4
        assert pair.models[role].calibration_temperature != 1.0 or card["models"][role].get("calibration_temperature") == 1.0


# ----------------------------------------------------------------------------- issue 21: reused and damaged run folders

def _copy_run(ref: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(ref, to, ignore=shutil.ignore_patterns("state.pt"))  # finished phases: states not needed
    return to


def _events(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "progress.jsonl").read_text().splitlines()] \
        if (out / "progress.jsonl").exists() else []


def test_a_fresh_run_into_a_finished_runs_folder_is_refused(tiny_run, tmp_path, capsys):
    """Without --resume, a finished run's folder would skip every phase and export the old weights under a card
    naming the new settings: it is refused, and nothing in it changes."""
    data, ref = tiny_run
    out = _copy_run(ref, tmp_path / "r")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["pipeline", "--data", str(data), "--out", str(out), "--preset", "tiny", "--device", "cpu",
                 "--epochs", "2"]) == 1
    err = capsys.readouterr().err
    assert f"{out} already holds pretrain, finetune, distill, baseline output" in err and "--resume" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_resume_refuses_a_finished_phase_whose_weights_are_gone(tiny_run, tmp_path, capsys):
    """pretrain/done.json without pretrain/teacher.safetensors: fine-tuning must not start from random weights
    under a card that lists pretraining."""
    data, ref = tiny_run
    out = _copy_run(ref, tmp_path / "r")
    import shutil

    for phase in ("finetune", "distill", "baseline"):
        shutil.rmtree(out / phase)
    (out / "model_card.json").unlink()
    (out / "pretrain" / "teacher.safetensors").unlink()
    assert main(["pipeline", "--data", str(data), "--out", str(out), "--preset", "tiny", "--device", "cpu",
                 "--resume"]) == 1
    err = capsys.readouterr().err
    assert f"{out / 'pretrain' / 'done.json'} says pretrain finished, but" in err and "teacher.safetensors is missing" in err
    assert not (out / "finetune").exists()


@pytest.mark.parametrize("content, why", [(b"{}", "has no 'seconds'"), (b"garbage", "not valid JSON"),
                                          (b'{"seconds": 1, "history": [], "epochs": "1", "image_size": 32}',
                                           "'epochs' must be an integer")])
def test_resume_names_an_unusable_done_json_before_training(tiny_run, tmp_path, capsys, content, why):
    data, ref = tiny_run
    out = _copy_run(ref, tmp_path / "r")
    (out / "distill" / "done.json").write_bytes(content)
    steps_before = len(_events(out))
    assert main(["pipeline", "--data", str(data), "--out", str(out), "--preset", "tiny", "--device", "cpu",
                 "--resume"]) == 1
    err = capsys.readouterr().err
    assert f"unreadable: {out / 'distill' / 'done.json'}, " in err and why in err and f"delete {out / 'distill'}" in err
    assert len(_events(out)) == steps_before  # refused up front: nothing trained


def test_resume_refuses_a_finished_phase_of_another_budget(tiny_run, tmp_path, capsys):
    data, ref = tiny_run
    out = _copy_run(ref, tmp_path / "r")
    (out / "model_card.json").unlink()
    import shutil

    shutil.rmtree(out / "baseline")
    cfg = json.loads((out / "config.json").read_text())
    cfg["finetune"]["epochs"] = 3
    (out / "config.json").write_text(json.dumps(cfg))
    assert main(["pipeline", "--data", str(data), "--out", str(out), "--device", "cpu", "--resume"]) == 1
    err = capsys.readouterr().err
    assert f"{out / 'finetune'} was trained for 1 epochs at 32 px, but this run's settings ask for 3" in err


@pytest.mark.parametrize("tamper", ["no history", "another phase", "not a dict"])
def test_a_tampered_training_state_is_named_not_a_key_error(tmp_path, tamper):
    from kd.config import preset
    from kd.models import build_student, build_teacher
    from kd.objectives import SupervisedObjective, ValContext, class_weights
    from kd.progress import Reporter
    from kd.train import STATE_FILE, fit

    import numpy as np

    from kd.cache import ImageSet

    images = ImageSet(np.zeros((8, 32, 32), np.uint8), np.array([0, 1] * 4), np.arange(8))
    phase = preset("tiny").finetune
    student = SupervisedObjective(build_student(), "student", 32, class_weights([4, 4]))
    if tamper == "no history":
        state = {"objective": student.state_dict(), "epoch": 0}
    elif tamper == "another phase":  # the teacher's state where the student's belongs
        teacher = SupervisedObjective(build_teacher(), "teacher", 32, class_weights([4, 4]))
        state = {"objective": teacher.state_dict(), "optimizer": {}, "scheduler": {}, "epoch": 0, "history": [{}]}
    else:
        state = [1, 2, 3]
    save_state(state, tmp_path / STATE_FILE)
    ctx = ValContext(None, images, torch.device("cpu"))
    with pytest.raises(CheckpointError, match=rf"{tmp_path / STATE_FILE} is not a training state of the baseline "
                                              r"phase .*delete it"):
        fit(student, images, phase, ctx, tmp_path, Reporter(tmp_path, enabled=False), "baseline", resume=True)


# ----------------------------------------------------------------------------- issue 20: tiny preset, the card's words

def test_a_capped_training_split_and_a_dataset_without_test_are_said_in_the_card(tmp_path):
    """max_train_images (the tiny preset's 256) trains on a seeded subset, validation carved whole first; a dataset
    without test/ gets a card that says there is no external check; `reproduce` is the command without --resume."""
    from kd.cli import main
    from kd.config import preset
    from tests.fixtures.xray_fixtures import write_kermany_dataset

    data = write_kermany_dataset(tmp_path / "data", n_per_class=(14, 14), size=32)
    cfg = preset("tiny", epochs=1)
    cfg.max_train_images, cfg.baseline = 8, False
    cfg.pretrain.epochs = 0
    cfg.save(tmp_path / "config.json")
    out = tmp_path / "run"
    assert main(["pipeline", "--config", str(tmp_path / "config.json"), "--data", str(data), "--out", str(out),
                 "--device", "cpu", "--resume"]) == 0
    card = json.loads((out / "model_card.json").read_text())
    assert sum(v["images"] for v in card["data"]["train"].values()) == 8
    assert sum(v["images"] for v in card["data"]["val"].values()) >= 4  # carved from all 28, not from the 8
    assert card["metrics_split"]["test"].startswith("none: the dataset has no test/ folder")
    assert "--resume" not in card["reproduce"] and card["reproduce"].startswith("python -m kd pipeline --config")
    assert (out / "ood.safetensors").exists()
