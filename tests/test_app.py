"""The Streamlit app, driven headless with streamlit.testing (AppTest), and the logic of kd/ui/.

AppTest in Streamlit 1.67 has a file-uploader element (`at.file_uploader[...].set_value`), so uploads go
through the real page: bytes in, both models' probabilities and heat maps out.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from kd import cam, jobs, lungs, serving  # noqa: E402
from kd import runs as kruns  # noqa: E402
from kd.config import PRESETS  # noqa: E402
from kd.data import LAYOUT_HELP, stratified_sample  # noqa: E402
from kd.model_card import DISCLAIMER  # noqa: E402
from tests.fixtures.xray_fixtures import (BAD_UPLOAD_KEYWORDS, BAD_UPLOADS, colour_photo, xray_dicom,  # noqa: E402
                                 png_bytes, xray_like_array, xray_png)
from kd.ui import data_page  # noqa: E402
from kd.ui import diagnose as ui_diagnose  # noqa: E402
from kd.ui import evaluate_page  # noqa: E402
from kd.ui import figures, state  # noqa: E402
from kd.ui import served  # noqa: E402
from kd.ui import run_views  # noqa: E402
from kd.ui import train_page  # noqa: E402

APP = Path(__file__).resolve().parent.parent / "streamlit_app.py"
PAGES = {"pages/diagnose.py": "Diagnose", "pages/train.py": "Train", "pages/evaluate.py": "Evaluate",
         "pages/data.py": "Data"}
TIMEOUT = 90


def start_app() -> AppTest:
    return AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()


def open_page(at: AppTest, page: str) -> AppTest:
    at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def alerts(at: AppTest, kind: str) -> list[str]:
    return [e.value for e in getattr(at, kind)]


def all_text(at: AppTest) -> str:
    parts = []
    for kind in ("markdown", "caption", "info", "error", "warning", "success", "code"):
        parts += [str(e.value) for e in getattr(at, kind)]
    return "\n".join(parts)


def metric_values(at: AppTest, label: str) -> list[str]:
    return [m.value for m in at.metric if m.label == label]


def element_keys(at: AppTest, element_type: str) -> list[str]:
    return [getattr(e, "key", None) for e in at.get(element_type)]


# ----------------------------------------------------------------------------- pages


def test_every_page_renders_with_the_disclaimer(app_env):
    at = start_app()
    assert not at.exception
    for page, title in PAGES.items():
        open_page(at, page)
        assert at.title[0].value == title
        assert any(DISCLAIMER in w for w in alerts(at, "warning")), f"no disclaimer on {page}"
        assert at.text_input(key=state.DATA_KEY).value == str(app_env.data)  # shared path, default from KD_DATA

    open_page(at, "pages/data.py")
    counts = at.dataframe[0].value
    assert list(counts["split"]) == ["train", "val", "official-val", "test"]
    assert counts["total images"].sum() == 73  # 72 generated files and tiny_run's unreadable one (listed)
    assert "what it is" not in counts.columns and f"- **val**: {data_page.SPLIT_HELP['val']}" in all_text(at)
    assert "data_sizes" in element_keys(at, "plotly_chart")
    assert len(at.image) == 2 * 4  # a grid per class

    open_page(at, "pages/evaluate.py")
    assert "From the model card" in all_text(at)
    charts = set(element_keys(at, "plotly_chart"))
    assert {"eval_roc", "eval_calibration", "eval_cm_teacher", "eval_cm_student"} <= charts
    # the split box says test: the page opens on the card's test figures, labelled as such
    assert at.selectbox(key="eval_split").value == "test"
    assert "Split: **test**, the dataset's test/ folder" in all_text(at) and figures.CALIBRATION_NOTE in all_text(at)
    at.radio(key="eval_card_split").set_value("validation").run()
    assert not at.exception and "Split: **validation**" in all_text(at)
    at.selectbox(key="eval_split").set_value("test")
    at.button(key="eval_run").click().run()
    assert not at.exception and not at.error
    assert "Recomputed on split **test**" in all_text(at)
    table = at.dataframe[0].value
    assert list(table.columns) == ["Teacher", "Student"] and "AUC (95% CI)" in table.index
    at.slider(key="eval_threshold").set_value(0.0).run()
    assert not at.exception
    assert at.dataframe[1].value.loc["Sensitivity"].tolist() == [1.0, 1.0]  # everything called pneumonia
    assert at.dataframe[1].value.loc["Specificity"].tolist() == [0.0, 0.0]


def test_upload_png_and_dicom_shows_both_models(app_env):
    at = start_app()
    at.file_uploader(key="uploads").set_value(
        [("chest.png", xray_png(), "image/png"), ("chest.dcm", xray_dicom(), "application/dicom")]).run()
    assert not at.exception and not at.error
    probabilities = metric_values(at, "Probability of pneumonia")
    assert len(probabilities) == 4  # teacher and student, for each of the two files
    assert all(0.0 <= float(p.rstrip("%")) <= 100.0 for p in probabilities)
    assert len(at.image) == 4  # one overlay per model and file
    assert "chest.png" in all_text(at) and "chest.dcm" in all_text(at)
    assert len(metric_values(at, "CAM correlation")) == 2
    assert cam.AGREEMENT_HELP in all_text(at)

    size = served.load_models(app_env.weights)[0].input_size
    default_source = cam.cam_option(cam.DEFAULT_CAM).source(size)  # the map says which layer and grid it is
    assert all(default_source in c for i in at.image for c in i.captions)
    at.selectbox(key="cam_method").set_value("layer3 LayerCAM")
    at.slider(key="cam_opacity").set_value(0.8).run()
    assert not at.exception and len(at.image) == 4
    assert all("LayerCAM on layer3" in c for i in at.image for c in i.captions)


def test_each_map_says_how_much_of_it_lies_on_the_outlined_lung_fields(app_env):
    """Under each map: its share on the estimated lung fields against an even spread (what the app computed, not a
    fixed figure), the outline drawn in white on the overlay, and the outline's toggle."""
    at = start_app()
    at.file_uploader(key="uploads").set_value([("chest.png", xray_png(), "image/png")]).run()
    assert not at.exception and not at.error
    pair, _ = served.load_models(app_env.weights)
    d = ui_diagnose.diagnose_bytes(pair, xray_png(), "chest.png", cam.DEFAULT_CAM).diagnosis
    assert d.lungs is not None and d.lungs.any()
    captions = [c.value for c in at.caption if "outlined lung fields" in str(c.value)]
    assert len(captions) == 2  # one under each model's map
    for role, caption in zip(served.ROLES, captions):
        share = d.views[role].in_lungs
        assert share == pytest.approx(lungs.in_lung_share(d.views[role].cam, d.lungs))
        assert f"{share:.0%} of this map" in caption and f"an even spread: {d.lungs.mean():.0%}" in caption
        assert ("outside the lungs" in caption) == (share < d.lungs.mean())
    result = ui_diagnose.CaseResult("chest.png", cam.DEFAULT_CAM, d)
    drawn, plain = (ui_diagnose.overlay_image(result, "teacher", 0.0, outline_lungs=flag) for flag in (True, False))
    white = (drawn == 255).all(-1) & ~(plain == 255).all(-1)
    assert white.sum() > 0 and (white == lungs.outline(d.lungs, drawn.shape[:2]) & ~(plain == 255).all(-1)).all()
    assert at.checkbox(key="cam_lungs").value is True
    at.checkbox(key="cam_lungs").uncheck().run()
    assert not at.exception and len(at.image) == 2


def test_the_lung_share_caption_cautions_only_below_an_even_spread():
    mask = np.zeros((10, 10), bool)
    mask[2:8, 2:5] = True  # 18 % of the area
    heat = np.zeros((10, 10))
    on = serving.ModelView(0.9, "PNEUMONIA", 0.5, heat, 0.1, in_lungs=0.62)
    off = serving.ModelView(0.9, "PNEUMONIA", 0.5, heat, 0.1, in_lungs=0.05)
    assert ui_diagnose.lung_share_text(on, mask) == ("62% of this map lies on the outlined lung fields "
                                                      "(an even spread: 18%).")
    caution = ui_diagnose.lung_share_text(off, mask)
    assert "5% of this map" in caution and "outside the lungs" in caution
    assert ui_diagnose.lung_share_text(serving.ModelView(0.1, "NORMAL", 0.5, heat, 0.1), mask) is None
    assert ui_diagnose.lung_share_text(on, np.zeros((10, 10), bool)) is None


def test_an_empty_heat_map_is_explained_and_agreement_not_claimed(app_env, monkeypatch):
    real_explain = cam.explain  # the real pass still runs: the refusal check reads the teacher's layer3 in it
    monkeypatch.setattr(cam, "explain", lambda loaded, x, method="GradCAM", **k: (real_explain(loaded, x, method, **k), (0.01, np.zeros(x.shape[-2:], np.float32)))[1])
    at = start_app()
    at.file_uploader(key="uploads").set_value([("normal.png", xray_png(), "image/png")]).run()
    assert not at.exception and not at.error
    assert all_text(at).count(cam.EMPTY_MAP_NOTE) == 2  # one under each model's map
    assert metric_values(at, "CAM correlation") == ["n/a"] and metric_values(at, "Top-20% overlap (IoU)") == ["n/a"]


def test_faithfulness_computes_each_heat_map_once(app_env, monkeypatch):
    """ROAD's maps also give the teacher/student agreement: one CAM per image and model, no second pass."""
    pair, _ = served.load_models(app_env.weights)
    calls = []
    real = cam.explain
    monkeypatch.setattr(cam, "explain", lambda *a, **k: calls.append(1) or real(*a, **k))
    samples = stratified_sample(data_page.split_samples(app_env.data, "test"), 4)
    res = cam.faithfulness(pair, samples, "GradCAM", percentiles=(50,))
    assert res["n"] == 4 and len(calls) == 2 * 4
    assert res["agreement"]["empty_maps"] in range(5)


def test_faithfulness_tab_reports_road_and_agreement(app_env):
    at = open_page(start_app(), "pages/evaluate.py")
    at.slider(key="faith_n").set_value(4)
    at.button(key="faith_run").click().run(timeout=120)
    assert not at.exception and not at.error
    assert "ROAD (mean)" in at.dataframe[-1].value.columns
    [correlation] = metric_values(at, "Mean CAM correlation (teacher vs student)")
    empty_note = "had an empty map in a model and are left out of the means" in all_text(at)
    assert empty_note or correlation != "n/a"  # n/a only when every image had an empty map


def test_bad_uploads_show_their_message_and_the_page_keeps_working(app_env):
    at = start_app()
    uploads = [(filename, make(), "application/octet-stream") for make, filename in BAD_UPLOADS.values()]
    at.file_uploader(key="uploads").set_value(uploads + [("good.png", xray_png(), "image/png")]).run()
    assert not at.exception
    errors = alerts(at, "error")
    assert len(errors) == len(BAD_UPLOADS)
    for (case, keyword), message in zip(BAD_UPLOAD_KEYWORDS.items(), errors):
        assert keyword in message.lower(), (case, message)
        assert "Traceback" not in message
    assert len(at.image) == 2  # the good file in the same batch still got both models

    at.file_uploader(key="uploads").set_value([("holiday.jpg", colour_photo(), "image/jpeg")]).run()
    assert not at.exception and not at.error
    assert any("Refused: no probability is shown." in w for w in alerts(at, "warning"))
    assert not metric_values(at, "Probability of pneumonia") and len(at.image) == 1  # the refused picture, small
    assert at.get("progress")[-1].proto.text == "1 file: 1 refused (no probability: see each)."
    thumb = ui_diagnose._thumbnail(colour_photo(), "holiday.jpg")  # shown in its own colours, not grey
    assert thumb.ndim == 3 and thumb.shape[2] == 3 and np.abs(thumb[..., 0].astype(int) - thumb[..., 2]).mean() > 20


def test_dataset_case_shows_its_ground_truth(app_env):
    at = start_app()
    at.selectbox(key="case_split").set_value("test").run()
    first = data_page.split_samples(app_env.data, "test")[0]
    at.selectbox(key="case_path").set_value(first.path).run()
    assert not at.exception and not at.error
    assert "ground truth" in all_text(at) and len(at.image) == 2


def test_without_weights_or_dataset_the_pages_say_what_to_do(app_env, tmp_path, monkeypatch):
    monkeypatch.setenv("KD_WEIGHTS", str(tmp_path / "no-weights-here"))
    monkeypatch.delenv("KD_DATA")
    at = start_app()
    assert not at.exception
    assert "python -m kd pipeline" in " ".join(alerts(at, "error"))
    assert at.get("file_uploader")  # drawn before the models are loaded (seconds on a cold start), so it shows at once
    for page in ("pages/train.py", "pages/data.py"):
        open_page(at, page)
        text = all_text(at)
        assert "10.17632/rscbjbr9sj.2" in text and "chest-xray-pneumonia" in text and LAYOUT_HELP in text
    open_page(at, "pages/evaluate.py")
    assert "python -m kd pipeline" in " ".join(alerts(at, "error"))

    at.text_input(key=state.DATA_KEY).input(str(tmp_path)).run()  # a folder without train/
    open_page(at, "pages/data.py")
    assert any("has no train/ folder" in e for e in alerts(at, "error"))
    assert LAYOUT_HELP in all_text(at)


# ----------------------------------------------------------------------------- training


def _fill_tiny_form(at: AppTest, name: str) -> None:
    at.selectbox(key="train_preset").set_value("tiny")
    at.checkbox(key="train_baseline").uncheck()
    at.text_input(key=train_page.RUN_NAME_KEY).input(name)


def _finished_run(tiny_run, run_dir: Path) -> Path:
    """A finished run in the runs folder: `tiny_run`'s records and teacher weights (not its training states)."""
    source = tiny_run[1]
    for f in ["config.json", "split.json"] + [f"{p}/{n}" for p in ("pretrain", "finetune")
                                              for n in ("done.json", "teacher.safetensors")]:
        (run_dir / f).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / f).write_bytes((source / f).read_bytes())
    return run_dir


@pytest.mark.slow(12)
def test_distilling_from_the_train_page_builds_on_a_finished_runs_teacher(app_env, tiny_run):
    """"Distil the student" starts a new run on the teacher of a finished one ("Build on run"): refused with a
    message while none is chosen, then trained to its card, which says where the teacher came from."""
    at = open_page(start_app(), "pages/train.py")
    _finished_run(tiny_run, app_env.runs / "source")
    _fill_tiny_form(at, "student")
    at.selectbox(key="train_command").set_value("Distil the student").run()
    at.button(key="train_start").click().run()
    assert not at.exception and any("choose the run under Build on run" in e for e in alerts(at, "error"))
    assert not (app_env.runs / "student").exists() and jobs.current_job(app_env.runs) is None
    at.selectbox(key="train_from_run").set_value("source")
    at.text_input(key=train_page.RUN_NAME_KEY).input("student")
    at.button(key="train_start").click().run()
    assert not at.exception and any("Started distill" in s for s in alerts(at, "success")), alerts(at, "error")
    deadline = time.time() + 180
    while jobs.current_job(app_env.runs) and time.time() < deadline:
        time.sleep(2)
    card = json.loads((app_env.runs / "student" / "model_card.json").read_text())
    source = str((app_env.runs / "source").resolve())
    assert card["config"]["from_run"] == source and card["phases"]["finetune"]["from_run"] == source
    assert set(card["models"]) >= {"teacher", "student"} and set(card["phases"]) == {"pretrain", "finetune", "distill"}


def _runs_table(at: AppTest):
    [table] = [d.value for d in at.dataframe if "run" in d.value.columns and "elapsed" in d.value.columns]
    return table


def _state(at: AppTest) -> str | None:
    values = metric_values(at, "State")
    return values[0] if values else None


@pytest.mark.slow(12)  # seconds on an idle machine, alone
def test_training_from_the_train_page_shows_progress_and_finishes(app_env):
    at = open_page(start_app(), "pages/train.py")
    _fill_tiny_form(at, "apptest")
    at.radio(key="train_teacher_targets").set_value("cached-tta")  # the teacher's mean over 7 framings
    corpus = app_env.tmp / "outside"  # an unlabeled folder for pretraining and distillation's transfer set
    corpus.mkdir()
    for i in range(3):
        (corpus / f"{i}.png").write_bytes(png_bytes(xray_like_array(40 + 8 * i, 36, seed=20 + i)))
    at.text_area(key="train_unlabeled").set_value(str(corpus))
    at.checkbox(key="train_distill_unlabeled").check()
    at.button(key="train_start").click().run()
    assert not at.exception
    assert any("Started pipeline" in s for s in alerts(at, "success")), alerts(at, "error")
    saved = json.loads((app_env.runs / "apptest" / "config.json").read_text())
    assert saved["teacher_targets"] == "cached-tta"
    assert saved["unlabeled"] == [str(corpus.resolve())] and saved["distill_unlabeled"] is True

    _fill_tiny_form(at, "second")  # one job at a time
    at.button(key="train_start").click().run()
    assert any("already running" in e for e in alerts(at, "error")), (alerts(at, "error"), alerts(at, "success"), alerts(at, "info"))

    saw_progress = saw_chart = saw_running_row = False
    deadline = time.time() + 240
    while time.time() < deadline:
        time.sleep(2)
        at.run()
        assert not at.exception
        saw_progress |= bool(at.get("progress"))
        saw_chart |= "train_loss_chart" in element_keys(at, "plotly_chart")
        table = _runs_table(at)
        saw_running_row |= table.loc[table["run"] == "apptest", "state"].item() in ("running", "starting")
        if _state(at) == "finished" and not jobs.current_job(app_env.runs):
            break
    else:
        pytest.fail(f"training did not finish: {run_views.log_tail(app_env.runs / 'apptest')}")
    at.run()
    assert saw_progress and saw_chart and saw_running_row
    assert "Training precision: float32" in all_text(at)  # the tiny preset does not ask for bf16
    assert "train_loss_chart" in element_keys(at, "plotly_chart")
    runs = _runs_table(at)
    assert "apptest" in list(runs["run"]) and runs.loc[runs["run"] == "apptest", "state"].item() == "finished"
    [card] = [d.value for d in at.dataframe if "split" in d.value.columns]  # the finished run's model card
    assert set(card["split"]) == {"validation", "test"} and set(card["model"]) == {"Teacher", "Student"}
    used = json.loads((app_env.runs / "apptest" / "model_card.json").read_text())["data"]["unlabeled"]
    assert used["folders"][0]["images"] == 3 and used["used_for"] == ["SSL pretraining", "distillation's transfer set"]

    at.selectbox(key="train_use_choice").set_value("apptest")
    at.button(key="train_use").click().run()
    assert not at.exception
    assert state.active_weights() == app_env.runs / "apptest"
    open_page(at, "pages/diagnose.py")
    assert "run **apptest**" in all_text(at)
    open_page(at, "pages/train.py")
    at.button(key="train_use_shipped").click().run()
    assert state.active_weights() == app_env.weights


@pytest.fixture
def full_disk(tmp_path):
    """A 24 MB tmpfs: room for a tiny run's state files and image cache, not for a ResNet50 training state."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip()})")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.slow(15)
def test_a_job_that_fills_the_disk_says_so_in_status_and_panel(app_env, full_disk, monkeypatch):
    """Disk full (issue 21, item 3): the failed checkpoint's temporary is freed first, so status.json records the
    failure and its cause, train.log has the error line, and the Train page shows it; no temporary is left."""
    monkeypatch.setenv("KD_RUNS_DIR", str(full_disk))
    at = open_page(start_app(), "pages/train.py")
    _fill_tiny_form(at, "full")
    at.button(key="train_start").click().run()
    assert any("Started pipeline" in s for s in alerts(at, "success")), alerts(at, "error")
    deadline = time.time() + 180
    while jobs.current_job(full_disk) is not None and time.time() < deadline:
        time.sleep(1)
    run = full_disk / "full"
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and "No space left on device" in status["error"], status
    assert "No space left on device" in (run / "train.log").read_text()
    assert not [p for p in run.rglob("*.tmp")]
    at.run()
    assert _state(at) == "failed"
    assert any("No space left on device" in e for e in alerts(at, "error")), alerts(at, "error")


def _live_sleeper_lock(runs: Path, run_dir: Path) -> subprocess.Popen:
    """A process that holds the real one-job lock (as a job's launcher does) until it is killed."""
    from kd import locks

    with locks.acquire(runs / jobs.LOCK_FILE) as lock:
        proc = subprocess.Popen(["sleep", "120"], pass_fds=(lock.fileno(),))
        lock.describe(pid=proc.pid, run_dir=str(run_dir), command="pipeline", gpus=1, started=time.time())
    return proc


def test_a_second_job_is_refused_while_one_runs(app_env):
    busy = app_env.runs / "busy"
    busy.mkdir()
    sleeper = _live_sleeper_lock(app_env.runs, busy)
    try:
        at = open_page(start_app(), "pages/train.py")
        _fill_tiny_form(at, "other")
        at.button(key="train_start").click().run()
        assert not at.exception
        assert any("already running" in e and "busy" in e for e in alerts(at, "error"))
        assert not (app_env.runs / "other").exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_stale_lock_is_recovered_then_resume_and_stop(app_env):
    runs = app_env.runs
    crashed = runs / "crashed"
    cfg = train_page.build_config(str(app_env.data), "crashed", "tiny", epochs=2, baseline=False)
    crashed.mkdir()
    cfg.save(crashed / "config.json")
    (crashed / "status.json").write_text(json.dumps({"state": "running", "phases": ["finetune"], "phase": "finetune",
                                                     "started": time.time() - 60}))
    before = (crashed / "status.json").read_bytes()

    at = open_page(start_app(), "pages/train.py")  # nobody holds the run folder: its job died
    assert (crashed / "status.json").read_bytes() == before  # reading the page rewrote nothing
    assert _state(at) == "failed"
    assert any("ended unexpectedly" in e for e in alerts(at, "error"))

    at.button(key="train_resume").click().run()
    assert not at.exception
    job = jobs.current_job(runs)
    assert job and Path(job["run_dir"]).name == "crashed" and job["command"] == "finetune"
    at.run()
    assert _state(at) in ("running", "starting")
    at.button(key="train_stop").click().run()
    assert not at.exception
    assert jobs.current_job(runs) is not None  # Stop asks first, saying what a stop keeps
    assert any(f"Stop run **crashed**?" in w and "Resume continues" in w for w in alerts(at, "warning"))
    at.button(key="train_stop_confirm").click().run()
    assert not at.exception
    assert jobs.current_job(runs) is None
    assert json.loads((crashed / "status.json").read_text())["state"] == "stopped"
    assert _state(at) == "stopped"
    assert any(b.key == "train_resume" for b in at.button)


# ----------------------------------------------------------------------------- kd/ui logic


def test_build_config_is_the_cli_config_and_validates(app_env, tmp_path):
    cfg = train_page.build_config(str(app_env.data), "r1", "tiny", epochs=3, image_size=48, batch_size=4, temperature=2.0,
                           alpha=0.3, ssl_method="byol", device="cpu", baseline=False, teacher_targets="cached")
    assert cfg.out == str(app_env.runs / "r1") and cfg.data == str(app_env.data.resolve())
    assert all(cfg.phase(p).epochs == 3 and cfg.phase(p).image_size == 48 and cfg.phase(p).batch_size == 4
               for p in ("pretrain", "finetune", "distill"))
    assert (cfg.temperature, cfg.alpha, cfg.ssl_method, cfg.device, cfg.baseline, cfg.teacher_targets) == \
        (2.0, 0.3, "byol", "cpu", False, "cached")
    kept, reference = train_page.build_config(str(app_env.data), "r2", "cpu"), PRESETS["cpu"]()
    assert all(kept.phase(p) == reference.phase(p) for p in ("pretrain", "finetune", "distill"))  # None keeps them
    assert kept.teacher_targets == "cached" and train_page.build_config(str(app_env.data), "r5", "gpu").teacher_targets == "online"

    from kd.data import DatasetError

    with pytest.raises(kruns.RunError, match="not allowed"):
        train_page.build_config(str(app_env.data), "../escape", "tiny")
    with pytest.raises(DatasetError, match="Expected layout"):
        train_page.build_config(str(tmp_path / "nowhere"), "r3", "tiny")
    with pytest.raises(ValueError, match="alpha"):
        train_page.build_config(str(app_env.data), "r4", "tiny", alpha=1.5)
    _, message = train_page.start_training(dict(data_root=str(app_env.data), run_name="bad name!", preset_name="tiny"),
                                    "pipeline")
    assert "not allowed" in message
    corpus = tmp_path / "corpus" / "deep"
    corpus.mkdir(parents=True)
    (corpus / "a.png").write_bytes(png_bytes(xray_like_array(40, 30)))
    cfg = train_page.build_config(str(app_env.data), "r6", "tiny", unlabeled=f"  {corpus.parent}\n\n",
                                distill_unlabeled=True)
    assert cfg.unlabeled == [str(corpus.parent.resolve())] and cfg.distill_unlabeled
    (tmp_path / "empty").mkdir()
    for folders, problem in ((str(tmp_path / "empty"), "holds no pictures"), (str(tmp_path / "nope"), "does not exist")):
        with pytest.raises(DatasetError, match=problem):
            train_page.build_config(str(app_env.data), "r7", "tiny", unlabeled=folders)
    with pytest.raises(ValueError, match="needs unlabeled folders"):
        train_page.build_config(str(app_env.data), "r8", "tiny", distill_unlabeled=True)


def test_progress_events_become_frames_and_figures():
    events = [
        {"kind": "phase_start", "phase": "pretrain"},
        *[{"kind": "step", "phase": "pretrain", "epoch": 1, "step": s, "global_step": s, "total_steps": 4,
           "loss": 3.0 - s / 10, "lr": 0.001 * s, "images_per_s": 5.0, "eta_s": 4 - s} for s in (1, 2, 3, 4)],
        {"kind": "epoch", "phase": "pretrain", "epoch": 1, "metrics": {"knn_accuracy": 0.7}},
        {"kind": "resume", "phase": "finetune", "epoch": 0},
        *[{"kind": "step", "phase": "finetune", "epoch": 1, "step": s, "global_step": s, "total_steps": 2,
           "loss": 0.7, "lr": 0.001, "images_per_s": 9.0, "eta_s": 0} for s in (1, 2, 1, 2)],  # resumed: repeated
        {"kind": "epoch", "phase": "finetune", "epoch": 1, "metrics": {"auc": 0.8, "accuracy": 0.75}},
    ]
    steps = run_views.step_frame(events)
    assert list(steps["x"]) == [1, 2, 3, 4, 5, 6] and list(steps["phase"]) == ["pretrain"] * 4 + ["finetune"] * 2
    epochs = run_views.epoch_frame(events)
    assert set(epochs.columns) >= {"phase", "epoch", "knn_accuracy", "auc", "accuracy"}
    assert len(figures.loss_figure(steps).data) == 2 and len(figures.lr_figure(steps).data) == 2
    assert figures.metrics_figure(epochs) is not None
    assert run_views.step_frame([]).empty and figures.metrics_figure(run_views.epoch_frame([])) is None


def test_log_tail_folds_progress_bars(tmp_path):
    (tmp_path / "train.log").write_text("start\n" + "".join(f"\rdecode {i}%" for i in range(0, 101, 10)) + "\nend\n")
    assert run_views.log_tail(tmp_path) == "start\ndecode 100%\nend"
    assert run_views.log_tail(tmp_path / "missing") == ""


def test_evaluation_helpers_on_a_small_result():
    result = {
        "labels": [0, 0, 1, 1], "files": ["/d/a.jpeg", "/d/b.jpeg", "/d/c.jpeg", "/d/d.jpeg"],
        "teacher": {"probabilities": [0.1, 0.7, 0.8, 0.9], "threshold": 0.5},
        "student": {"probabilities": [0.2, 0.3, 0.4, 0.9], "threshold": 0.5},
    }
    frame = evaluate_page.disagreement_frame(result)
    assert sorted(frame["file"]) == ["b.jpeg", "c.jpeg"]  # b: teacher wrong, c: student wrong; a, d: both right
    assert frame["reason"].str.startswith("disagree").all()
    at = evaluate_page.at_threshold(result, 0.5)
    assert at["teacher"]["confusion_matrix"] == {"tn": 1, "fp": 1, "fn": 0, "tp": 2}
    table = evaluate_page.threshold_table(at)
    assert table.loc["Sensitivity", "Teacher"] == 1.0 and table.loc["Sensitivity", "Student"] == 0.5
    assert evaluate_page.operating_points(at)["teacher"] == (0.5, 1.0)
    reports = {r: {"roc": {"fpr": [0, 1], "tpr": [0, 1], "thresholds": [1, 0]}, "auc": 0.5,
                   "calibration": {"temperature": 1.0, "ece_raw": 0.1, "ece_scaled": 0.05,
                                   "curve": {"mean_predicted": [0.2], "fraction_positive": [0.3], "count": [4]}},
                   "confusion_matrix": {"tn": 1, "fp": 1, "fn": 0, "tp": 2}} for r in served.ROLES}
    assert len(figures.roc_figure(reports, evaluate_page.operating_points(at)).data) == 5
    assert len(figures.calibration_figure(reports).data) == 3
    assert figures.confusion_figure(reports["teacher"]["confusion_matrix"], "t").data


def test_diagnose_bytes_memo_and_faithfulness(app_env):
    pair, problem = served.load_models(app_env.weights)
    assert problem is None
    memo: dict = {}
    first = ui_diagnose.diagnose_bytes(pair, xray_png(), "a.png", "GradCAM", memo)
    again = ui_diagnose.diagnose_bytes(pair, xray_png(), "a.png", "GradCAM", memo)
    assert again.diagnosis is first.diagnosis and len(memo) == 2  # the decoded upload, and its maps by GradCAM
    calls = []
    real = serving.diagnose
    serving.diagnose = lambda *a: calls.append(1) or real(*a)  # decoding and the refusal check live in there
    try:
        other = ui_diagnose.diagnose_bytes(pair, xray_png(), "a.png", "layer3 GradCAM", memo)
    finally:
        serving.diagnose = real
    assert not calls and len(memo) == 3 and other.diagnosis.picture is first.diagnosis.picture  # only the maps anew
    assert list(first.diagnosis.seconds) == ["decoding", "refusal check", "teacher", "student"]
    for role in served.ROLES:
        image = ui_diagnose.overlay_image(first, role, 0.5)
        side = max(pair.input_size, cam.DISPLAY_SIZE)  # drawn sharper than the tiny model input
        assert image.dtype == np.uint8 and image.shape == (side, side, 3)
        assert first.diagnosis.square.shape == (pair.input_size, pair.input_size)
    bad = ui_diagnose.diagnose_bytes(pair, b"", "empty.jpg", "GradCAM", memo)
    assert bad.diagnosis is None and "empty" in bad.error.lower()

    samples = stratified_sample(data_page.split_samples(app_env.data, "test"), 2)
    assert sorted(s.label for s in samples) == [0, 1]
    seen = []
    res = cam.faithfulness(pair, samples, "GradCAM", progress=lambda f, text: seen.append(f), percentiles=(50,))
    assert res["n"] == 2 and set(res["road"]) == set(served.ROLES) and seen[-1] == pytest.approx(1.0)
    agree = res["agreement"]  # means over the images where neither map is empty; None when there are none
    assert (agree["correlation"] is None) == (agree["empty_maps"] == res["n"])
    assert agree["correlation"] is None or (-1.0 <= agree["correlation"] <= 1.0 and 0.0 <= agree["top20_iou"] <= 1.0)
    assert list(evaluate_page.faithfulness_frame(res).index) == ["Teacher", "Student"]


def test_runs_frame_and_usable_runs(app_env):
    card = json.loads((app_env.weights / "model_card.json").read_text())
    teacher_only = {**card, "models": {"teacher": card["models"]["teacher"],
                                       "student": {"architecture": "resnet18", "file": "student.safetensors"}}}
    runs = [{"name": "done", "path": str(app_env.weights), "status": {"state": "finished", "phases": ["finetune"]},
             "card": card, "modified": time.time()},
            {"name": "teacher-only", "path": str(app_env.tmp), "status": {"state": "finished"},
             "card": teacher_only, "modified": time.time()},
            {"name": "running", "path": "/x/r", "status": {"state": "running"}, "card": None, "modified": time.time()}]
    frame = run_views.runs_frame(runs)
    assert list(frame["run"]) == ["done", "teacher-only", "running"]
    assert frame.loc[0, "teacher AUC"] is not None and frame.loc[2, "state"] == "running"
    assert run_views.usable_runs(runs) == ["done"]
    assert train_page.use_run("missing") is not None  # no model card: refused with a message


# ----------------------------------------------------------------------------- state files of the wrong shape

RANDOM_BYTES = bytes(b for b in np.random.default_rng(0).bytes(300) if b != ord("\n"))
GOOD_STEP = {"kind": "step", "phase": "finetune", "epoch": 1, "step": 1, "global_step": 1, "total_steps": 4,
             "loss": 0.7, "lr": 0.001, "images_per_s": 9.0, "eta_s": 3}
BROKEN_RUN_FILES = {  # the cases: (file in the run folder, content, words of the message)
    "status [1,2]": ("status.json", b"[1,2]", "it must be a JSON object, not [1, 2]"),
    "status started abc": ("status.json", b'{"state": "running", "started": "abc"}', "'started' must be a number"),
    "progress 5": ("progress.jsonl", b"5\n", "line 2: it must be a JSON object, not 5"),
    "progress step without fields": ("progress.jsonl", b'{"kind":"step"}\n', "line 2: it has no 'phase'"),
    "progress epoch metrics 5": ("progress.jsonl", b'{"kind":"epoch","metrics":5}\n', "line 2: it has no 'phase'"),
    "progress epoch metrics 5 with phase": ("progress.jsonl", b'{"kind":"epoch","phase":"finetune","epoch":1,'
                                            b'"metrics":5}\n', "'metrics' must be a JSON object, not 5"),
    "progress random bytes": ("progress.jsonl", RANDOM_BYTES + b"\n", "line 2: "),
    "progress total_steps Infinity": ("progress.jsonl", b'{"kind":"step","phase":"finetune","global_step":2,'
                                      b'"total_steps":Infinity}\n', "'total_steps' must be a finite number"),
    "status elapsed_before NaN": ("status.json", b'{"state": "stopped", "elapsed_before": NaN}',
                                  "'elapsed_before' must be a finite number, not NaN"),
    "status nested 100,000 deep": ("status.json", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    "progress nested 100,000 deep": ("progress.jsonl", b"[" * 100_000 + b"]" * 100_000 + b"\n", "nested too deeply"),
}


def _broken_run(runs: Path, name: str, content: bytes) -> Path:
    """A run folder whose `name` holds `content`; its other state files are fine (a step to chart)."""
    run = runs / "broken"
    run.mkdir(exist_ok=True)
    (run / "status.json").write_text(json.dumps({"state": "stopped", "phases": ["finetune"], "phase": "finetune"}))
    (run / "progress.jsonl").write_text(json.dumps(GOOD_STEP) + "\n")
    if name == "progress.jsonl":
        content = (run / name).read_bytes() + content
    (run / name).write_bytes(content)
    return run


@pytest.mark.parametrize("case", BROKEN_RUN_FILES)
def test_train_page_says_which_state_file_is_unreadable_and_goes_on(app_env, case):
    name, content, why = BROKEN_RUN_FILES[case]
    run = _broken_run(app_env.runs, name, content)
    at = open_page(start_app(), "pages/train.py")
    assert not at.exception
    [message] = [w for w in alerts(at, "warning") if w.startswith("unreadable: ")]
    assert message.startswith(f"unreadable: {run / name}, ") and why in message, message
    assert metric_values(at, "Run") == ["broken"]  # the live panel and the runs table are still there
    assert "broken" in list(_runs_table(at)["run"])
    if name == "progress.jsonl":
        assert "train_loss_chart" in element_keys(at, "plotly_chart")  # the good line is still charted


@pytest.mark.parametrize("where", [kruns.ACTIVE_FILE, jobs.LOCK_FILE + ".json"])
def test_deeply_nested_active_json_or_job_lock_leaves_every_page_rendering(app_env, where):
    (app_env.runs / where).write_bytes(b"[" * 100_000 + b"]" * 100_000)
    at = start_app()
    for page in PAGES:
        open_page(at, page)
        assert not at.exception, (page, at.exception)
    if where == kruns.ACTIVE_FILE:
        assert any("nested too deeply" in w for w in alerts(at, "warning"))
        assert state.active_weights() == app_env.weights


def test_a_stray_job_lock_does_not_break_the_train_page(app_env):
    (app_env.runs / jobs.LOCK_FILE).write_text('{"pid": "abc"}')
    at = open_page(start_app(), "pages/train.py")
    assert not at.exception


def test_diagnose_says_the_weights_model_card_is_unreadable(app_env, tmp_path, monkeypatch):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "model_card.json").write_text("[1]")
    monkeypatch.setenv("KD_WEIGHTS", str(weights))
    at = start_app()
    assert not at.exception
    assert any(f"unreadable: {weights / 'model_card.json'}, it must be a JSON object, not [1]" in e
               for e in alerts(at, "error"))
    open_page(at, "pages/train.py")  # the other pages go on
    open_page(at, "pages/evaluate.py")
    assert any("unreadable: " in e for e in alerts(at, "error"))


@pytest.mark.parametrize("page", ["pages/diagnose.py", "pages/train.py"])
def test_an_unreadable_active_json_is_said_and_the_shipped_weights_serve(app_env, page):
    (app_env.runs / kruns.ACTIVE_FILE).write_text("[1]")
    at = open_page(start_app(), page)
    assert any(w.startswith(f"unreadable: {app_env.runs / kruns.ACTIVE_FILE}, ") for w in alerts(at, "warning"))
    assert state.active_weights() == app_env.weights
    if page == "pages/diagnose.py":
        at.file_uploader(key="uploads").set_value([("chest.png", xray_png(), "image/png")]).run()
        assert not at.exception and len(metric_values(at, "Probability of pneumonia")) == 2


def test_a_run_whose_model_card_is_unreadable_is_listed_with_why(app_env):
    run = _broken_run(app_env.runs, "model_card.json", b"[1]")
    at = open_page(start_app(), "pages/train.py")
    runs = _runs_table(at)
    [note] = runs.loc[runs["run"] == "broken", "note"]
    assert note == f"unreadable: {run / 'model_card.json'}, it must be a JSON object, not [1]"
    assert "broken" not in run_views.usable_runs(run_views.list_runs())


# ----------------------------------------------------------------------------- issue 12: Diagnose


def _record_overlays(monkeypatch) -> list[np.ndarray]:
    shown = []
    real = ui_diagnose.overlay_image
    monkeypatch.setattr(ui_diagnose, "overlay_image", lambda *a, **k: shown.append(real(*a, **k)) or shown[-1])
    return shown


def test_the_xray_is_shown_at_its_own_aspect_ratio(app_env, monkeypatch):
    """A portrait X-ray is drawn portrait (longest side DISPLAY_SIZE), not squashed to a square."""
    from tests.fixtures.xray_fixtures import png_bytes, xray_like_array

    shown = _record_overlays(monkeypatch)
    at = start_app()
    at.file_uploader(key="uploads").set_value([("tall.png", png_bytes(xray_like_array(400, 200)), "image/png")]).run()
    assert not at.exception and not at.error
    assert len(shown) == 2
    for picture in shown:
        h, w = picture.shape[:2]
        assert max(h, w) == cam.DISPLAY_SIZE and abs(h / w - 2.0) < 0.02


def test_decision_rule_is_next_to_the_probability_and_empty_map_note_fits_the_decision(app_env, monkeypatch):
    real_explain = cam.explain  # the real pass still runs: the refusal check reads the teacher's layer3 in it
    monkeypatch.setattr(cam, "explain", lambda loaded, x, method="GradCAM", **k: (real_explain(loaded, x, method, **k), (0.51, np.zeros(x.shape[-2:], np.float32)))[1])
    at = start_app()
    at.file_uploader(key="uploads").set_value([("case.png", xray_png(), "image/png")]).run()
    assert not at.exception and not at.error
    text = all_text(at)
    assert "PNEUMONIA if the calibrated probability is ≥" in text
    assert "confident NORMAL" not in text  # 51 %: not a confident anything
    assert text.count("Empty heat map") == 2


def test_the_default_overlay_leaves_the_xray_plain_where_the_map_is_low():
    picture = np.full((64, 64), 128, np.uint8)
    heat = np.zeros((64, 64), np.float32)
    heat[:8, :8] = 1.0
    out = cam.overlay(picture, heat, 0.4)
    assert (out[32:, 32:] == 128).all()  # no blue tint where the map is 0
    assert not (out[:4, :4] == 128).all()  # coloured where it is high


def test_maps_fade_with_the_probability_and_the_colour_scale_says_what_colour_means(app_env, monkeypatch):
    picture = np.full((32, 32), 100, np.uint8)
    heat = np.ones((32, 32), np.float32)
    assert (cam.overlay(picture, heat, 0.5, strength=0.0) == 100).all()  # a map at no strength: the X-ray alone
    faint, full = cam.overlay(picture, heat, 0.5, cam.fade_strength(0.0)), cam.overlay(picture, heat, 0.5, 1.0)
    assert np.abs(faint.astype(int) - 100).mean() < np.abs(full.astype(int) - 100).mean()
    assert cam.fade_strength(0.0) == cam.FADE_FLOOR and cam.fade_strength(1.0) == 1.0
    real_explain = cam.explain  # the real pass still runs: the refusal check reads the teacher's layer3 in it
    monkeypatch.setattr(cam, "explain", lambda loaded, x, method="GradCAM", **k: (real_explain(loaded, x, method, **k), (0.2, np.ones(x.shape[-2:], np.float32)))[1])
    at = start_app()
    at.file_uploader(key="uploads").set_value([("case.png", xray_png(), "image/png")]).run()
    assert cam.MAP_MEANING in all_text(at) and cam.FADE_MEANING.strip() in all_text(at)
    assert any("linear-gradient" in m.value for m in at.markdown)  # the scale, in the overlay's colours
    assert all("drawn at 32% strength" in c for i in at.image for c in i.captions)  # 0.15 + 0.85 x 0.2
    assert any(t.startswith("Time on this machine: decoding") for t in alerts(at, "caption"))
    at.checkbox(key="cam_fade").uncheck().run()
    assert not any("strength" in c for i in at.image for c in i.captions)
    assert cam.FADE_MEANING.strip() not in all_text(at)


def test_models_are_warmed_when_loaded_and_each_upload_shows_progress(app_env, monkeypatch):
    """The first diagnosis does not pay for a cold model: the cached loader runs one forward + CAM per model."""
    calls = []
    real = cam.explain
    monkeypatch.setattr(cam, "explain", lambda *a, **k: calls.append(1) or real(*a, **k))
    served.clear_model_cache()
    at = open_page(start_app(), "pages/diagnose.py")
    assert len(calls) == 2  # teacher and student warmed, before any upload
    at.file_uploader(key="uploads").set_value(
        [("a.png", xray_png(), "image/png"), ("b.dcm", xray_dicom(), "application/dicom")]).run()
    assert not at.exception and not at.error
    bars = at.get("progress")
    assert bars and bars[-1].proto.text == "2 files: 2 diagnosed."


# ----------------------------------------------------------------------------- issue 12: Train


def test_use_these_weights_defaults_to_the_newest_finished_run(app_env):
    import os
    import shutil

    for name, date in (("new", "2026-02-01T10:00:00"), ("old", "2026-01-01T10:00:00")):
        run = app_env.runs / name
        shutil.copytree(app_env.weights, run, ignore=shutil.ignore_patterns("state.pt"))  # 1 GB of states otherwise
        card = json.loads((run / "model_card.json").read_text())
        (run / "model_card.json").write_text(json.dumps({**card, "date": date}))
        (run / "status.json").write_text(json.dumps({"state": "finished"}))
    os.utime(app_env.runs / "old", (time.time() + 60, time.time() + 60))  # touched later (a log line), trained earlier
    at = open_page(start_app(), "pages/train.py")
    assert at.selectbox(key="train_use_choice").value == "new"


def test_a_bad_dataset_path_shows_its_error_and_the_layout_once(app_env, tmp_path):
    at = open_page(start_app(), "pages/train.py")
    at.text_input(key=state.DATA_KEY).set_value(str(tmp_path / "nowhere")).run()
    at.button(key="train_start").click().run()
    assert not at.exception
    errors = "\n".join(alerts(at, "error"))
    assert errors.count("does not exist") == 1 and "Not started" in errors, errors
    assert all_text(at).count("Expected layout") == 1
    plan = [m.value for m in at.markdown if "**This run**" in m.value][0]
    assert "\n    " not in plan and "DESCRIPTION" not in plan  # one paragraph for a person, no code names


# ----------------------------------------------------------------------------- issue 12: Data


def test_image_sizes_all_alike_show_both_classes_side_by_side(app_env):
    import pandas as pd

    sizes = pd.DataFrame({"class": ["NORMAL"] * 3 + ["PNEUMONIA"] * 5, "width": [224] * 8, "height": [224] * 8})
    fig = figures.size_histogram(sizes)
    assert fig.layout.barmode == "group" and fig.layout.xaxis.type == "category"
    assert {tuple(trace.x) for trace in fig.data} == {("224 px",) * 3, ("224 px",) * 5} or \
        {len(trace.x) for trace in fig.data} == {3, 5}


# ----------------------------------------------------------------------------- issue 20: the walkthrough's rough edges

def test_every_page_says_who_the_models_are_for_and_the_disclaimer_once(app_env):
    at = start_app()
    for page in PAGES:
        open_page(at, page)
        assert all_text(at).count(DISCLAIMER) == 1, page  # the banner; not again in the sidebar
        assert "children aged one to five" in all_text(at)


def test_a_train_folder_without_both_classes_is_not_found_and_nothing_starts(app_env, tmp_path):
    from tests.fixtures.xray_fixtures import write_kermany_dataset

    data = write_kermany_dataset(tmp_path / "one_class", n_per_class=(4, 4), size=32)
    import shutil

    shutil.rmtree(data / "train" / "PNEUMONIA")
    at = open_page(start_app(), "pages/train.py")
    at.text_input(key=state.DATA_KEY).set_value(str(data)).run()
    assert not any("dataset found" in c for c in alerts(at, "caption"))
    assert any("has no PNEUMONIA/ folder" in c for c in alerts(at, "caption"))  # the sidebar says why
    _fill_tiny_form(at, "broken")
    at.button(key="train_start").click().run()
    assert not at.exception and any("Not started" in e for e in alerts(at, "error"))
    assert not (app_env.runs / "broken").exists() and jobs.current_job(app_env.runs) is None


def test_the_plan_under_the_form_follows_the_fields_and_names_what_will_not_run(app_env, tiny_run):
    at = open_page(start_app(), "pages/train.py")
    plan = lambda: [m.value for m in at.markdown if m.value.startswith(("**This run**", "Not startable"))][0]  # noqa: E731
    assert "Not run: SSL-pretrain the teacher (the cpu preset pretrains only on unlabeled folders" in plan()
    assert "fine-tune the teacher: 6 ep @ 128 px" in plan()
    at.text_area(key="train_unlabeled").set_value("/corpus/one\n/corpus/two").run()
    assert "SSL-pretrain the teacher (simclr, with the unlabeled folders): 8 ep @ 64 px" in plan()
    assert "Not run" not in plan()
    at.number_input(key="train_epochs").set_value(5).run()  # every phase, pretraining included
    assert "SSL-pretrain the teacher (simclr, with the unlabeled folders): 5 ep" in plan()
    at.selectbox(key="train_preset").set_value("gpu").run()  # no pretraining there unless Epochs asks for it
    at.number_input(key="train_epochs").set_value(None).run()
    assert "Not run: SSL-pretrain the teacher (0 epochs in the gpu preset" in plan()
    at.selectbox(key="train_preset").set_value("tiny").run()
    assert "(tiny preset: about a minute on a CPU" in plan() and "@ 32 px" in plan()
    assert "Full pipeline" in at.selectbox(key="train_command").options
    at.selectbox(key="train_command").set_value("Distil the student").run()
    assert "Not startable as set: Distil the student builds on the finetune phase of a finished run" in plan()
    assert at.selectbox(key="train_from_run").options == []  # no finished run yet, and the box says so
    assert "no run with a fine-tuned teacher yet" in at.selectbox(key="train_from_run").placeholder
    _finished_run(tiny_run, app_env.runs / "source")
    at.run()
    at.selectbox(key="train_from_run").set_value("source").run()  # distillation brings its control
    assert "the fine-tuned teacher of run **source**" in plan()
    assert "fine-tune the teacher" not in plan() and "distil the student: 1 ep" in plan()
    assert "labels-only student (ablation): 1 ep" in plan()
    at.checkbox(key="train_baseline").uncheck().run()
    assert "distil the student: 1 ep" in plan() and "labels-only" not in plan()


def test_ssl_pretraining_alone_without_unlabeled_folders_is_refused_before_it_starts(app_env):
    """The cpu preset pretrains only on a corpus: "SSL-pretrain the teacher" without unlabeled folders would have
    nothing to do, so Start says why and starts no job."""
    at = open_page(start_app(), "pages/train.py")
    at.text_input(key=state.DATA_KEY).set_value(str(app_env.data)).run()
    _fill_tiny_form(at, "ssl")
    at.selectbox(key="train_preset").set_value("cpu")
    at.selectbox(key="train_command").set_value("SSL-pretrain the teacher").run()
    at.button(key="train_start").click().run()
    assert not at.exception
    assert any("pretrains only on a corpus" in e and "unlabeled X-ray folders" in e for e in alerts(at, "error"))
    assert not (app_env.runs / "ssl").exists() and jobs.current_job(app_env.runs) is None


@pytest.mark.parametrize("native", [False, True])
def test_the_plan_says_when_this_cpu_will_train_in_float32(app_env, monkeypatch, native):
    """The cpu preset's time assumes bf16 autocast; on a CPU without native bf16 the run trains in float32
    (kd.distributed.bf16_autocast), and the plan says so before Start rather than after an hour."""
    from kd import distributed

    monkeypatch.setattr(distributed, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    at = open_page(start_app(), "pages/train.py")
    plan = lambda: [m.value for m in at.markdown if "**This run**" in m.value][0]  # noqa: E731
    assert ("On this machine: float32: bf16 was asked, but this CPU has no native bf16" in plan()) is not native
    at.selectbox(key="train_preset").set_value("tiny").run()  # asks for no bf16: nothing to say
    assert "On this machine" not in plan()


def test_using_a_run_without_a_refusal_check_says_diagnose_will_not_predict(app_env):
    import shutil

    run = app_env.runs / "old-run"
    shutil.copytree(app_env.weights, run)
    (run / "ood.safetensors").unlink()
    at = open_page(start_app(), "pages/train.py")
    at.selectbox(key="train_use_choice").set_value("old-run")
    at.button(key="train_use").click().run()
    assert any("has no fitted out-of-distribution check" in w for w in alerts(at, "warning"))
    open_page(at, "pages/diagnose.py")
    assert any("No diagnosis with these weights" in e and "kd fit-ood" in e for e in alerts(at, "error"))
    at.file_uploader(key="uploads").set_value([("chest.png", xray_png(), "image/png")]).run()
    assert not at.exception and not metric_values(at, "Probability of pneumonia")


def test_tables_show_an_empty_cell_as_a_dash_not_none():
    import pandas as pd

    styled = figures.table(pd.DataFrame({"run": ["a", "b"], "AUC": [None, 0.98765]}))
    shown = styled.to_string()
    assert "None" not in shown and "nan" not in shown and figures.EMPTY_CELL in shown and "0.988" in shown
    assert styled.data["AUC"].tolist()[0] == figures.EMPTY_CELL  # in the data: st.dataframe ignores na_rep


def test_evaluate_says_when_images_were_trained_on_and_when_no_external_check_is_possible(app_env, tmp_path):
    at = open_page(start_app(), "pages/evaluate.py")
    at.selectbox(key="eval_split").set_value("train")
    at.button(key="eval_run").click().run()
    assert not at.exception and not at.error
    assert any("are among the images these weights were trained on" in w for w in alerts(at, "warning"))
    at.selectbox(key="eval_split").set_value("test")
    at.button(key="eval_run").click().run()
    assert any("None of these" in m and "was used to train or select" in m for m in alerts(at, "success"))
    assert evaluate_tab_key_kept(at)

    import shutil

    no_test = tmp_path / "no_test"
    shutil.copytree(app_env.data, no_test, ignore=shutil.ignore_patterns("test"))
    at.text_input(key=state.DATA_KEY).set_value(str(no_test)).run()
    assert evaluate_page.NO_TEST_NOTE in alerts(at, "info")


def evaluate_tab_key_kept(at: AppTest) -> bool:
    """The Evaluate tabs are a keyed widget (st.tabs key + on_change), so a slider's rerun keeps the open tab."""
    at.slider(key="eval_threshold").set_value(0.3).run()
    return not at.exception and "eval_tab" in at.session_state


def test_the_navigation_patch_matches_the_pinned_streamlit(app_env):
    """kd.ui.state.ensure_navigation flips Streamlit's private PagesManager.uses_pages_directory (no public
    switch exists while the folder is named pages/): the attribute must exist, and a page opened directly runs
    inside the entry script's navigation (banner and sidebar), with the flag off afterwards."""
    from streamlit.runtime.pages_manager import PagesManager

    assert hasattr(PagesManager, "uses_pages_directory")
    at = open_page(start_app(), "pages/train.py")
    assert any(DISCLAIMER in w for w in alerts(at, "warning"))  # the entry script's banner: run through navigation
    assert at.text_input(key=state.DATA_KEY).value == str(app_env.data)  # and its sidebar
    assert PagesManager.uses_pages_directory is False


def test_evaluate_recomputes_with_the_pair_the_page_holds(app_env, monkeypatch):
    """The Evaluate page passes its loaded pair to kd.evaluate.evaluate_pair: the weights are not read again,
    and the figures are those of `kd evaluate` on the same folder."""
    import kd.evaluate

    at = open_page(start_app(), "pages/evaluate.py")  # the pair is loaded (and cached) here
    reference = kd.evaluate.evaluate_weights(app_env.weights, app_env.data, "test", n_boot=1000)
    monkeypatch.setattr(kd.evaluate, "load_pair", lambda *a, **k: pytest.fail("the weights were loaded again"))
    at.selectbox(key="eval_split").set_value("test")
    at.button(key="eval_run").click().run()
    assert not at.exception and not at.error
    stored = evaluate_page.stored_evaluation(app_env.weights.resolve(), app_env.data, "test") or next(
        iter(at.session_state[evaluate_page.EVAL_KEY].values()))
    for role in served.ROLES:
        assert stored[role]["probabilities"] == reference[role]["probabilities"]
        assert stored[role]["auc"] == reference[role]["auc"]
