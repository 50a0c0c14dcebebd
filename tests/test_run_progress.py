"""How a run's progress reads: elapsed time over resumed sessions, where a phase stands before its first step,
the runs table's state while a job runs, and each finished run's model card on the Train page."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from kd import progress as kprogress
from kd.ui import evaluate_page
from kd.ui import run_views
from kd.ui import train_page


def _status(run: Path) -> dict:
    return json.loads((run / kprogress.STATUS_FILE).read_text())


def test_elapsed_counts_every_session_of_a_resumed_run(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(kprogress.time, "time", lambda: clock[0])
    reporter = kprogress.Reporter(tmp_path)
    reporter.start(state="running", phases=["finetune"])
    clock[0] = 1100.0
    reporter.update(state="stopped", stopped=clock[0])  # first session: 100 s, then stopped
    clock[0] = 9000.0  # resumed much later: the pause is not counted, nor is it negative
    resumed = kprogress.Reporter(tmp_path)
    resumed.start(state="running", phases=["finetune"])
    status = _status(tmp_path)
    assert status["stopped"] is None and status["finished"] is None and status["elapsed_before"] == 100.0
    assert kprogress.elapsed_seconds(status, running=True, now=9030.0) == 130.0
    clock[0] = 9050.0
    resumed.update(state="finished", finished=clock[0])
    assert kprogress.elapsed_seconds(_status(tmp_path), running=False) == 150.0
    view = run_views.run_view(tmp_path)
    assert view.elapsed == "2:30"


def test_a_stop_before_the_first_status_update_has_no_elapsed_time():
    assert kprogress.elapsed_seconds({}, running=True) is None
    assert kprogress.elapsed_seconds({"started": 10.0}, running=False) is None  # no end known


def test_a_new_phase_does_not_show_the_last_phases_step(tmp_path):
    reporter = kprogress.Reporter(tmp_path)
    reporter.start(state="running", phases=["finetune", "distill"])
    reporter.log("phase_start", phase="finetune", epochs=2)
    assert "finetune (1/2) · starting (2 epochs)" in run_views.run_view(tmp_path).progress_text
    reporter.log("step", phase="finetune", epoch=2, epochs=2, step=8, steps=8, global_step=16, total_steps=16)
    assert "epoch 2/2 · step 8/8" in run_views.run_view(tmp_path).progress_text
    reporter.log("teacher_targets", phase="distill", images=24)
    text = run_views.run_view(tmp_path).progress_text
    assert "distill (2/2) · computing the teacher's outputs" in text and "8/8" not in text
    reporter.log("phase_start", phase="distill", epochs=3)
    text = run_views.run_view(tmp_path).progress_text
    assert "distill (2/2) · starting (3 epochs)" in text and "?" not in text
    reporter.log("resume", phase="distill", epoch=1, epochs=3)
    assert "resuming at epoch 2/3" in run_views.run_view(tmp_path).progress_text


def test_runs_table_says_running_for_the_running_job(tmp_path):
    now = time.time()
    runs = [{"name": "live", "path": str(tmp_path / "live"), "card": None, "modified": now,
             "status": {"state": "running", "started": now - 65, "elapsed_before": 60.0}},
            {"name": "just-started", "path": str(tmp_path / "new"), "card": None, "modified": now,
             "status": {"state": "stopped", "started": now - 500, "stopped": now - 400}},
            {"name": "old", "path": str(tmp_path / "old"), "card": None, "modified": now,
             "status": {"state": "stopped", "started": now - 500, "stopped": now - 400}}]
    frame = run_views.runs_frame(runs, job={"run_dir": str(tmp_path / "live"), "started": now - 65})
    assert frame.loc[0, "state"] == "running" and frame.loc[0, "elapsed"] in ("2:05", "2:06")
    assert frame.loc[2, "state"] == "stopped" and frame.loc[2, "elapsed"] == "1:40"
    resumed = run_views.runs_frame(runs, job={"run_dir": str(tmp_path / "new"), "started": now})
    assert resumed.loc[1, "state"] == "starting"  # launched, its old status not rewritten yet


def test_card_summary_has_validation_and_test_side_by_side(kd_tiny):
    card = json.loads((kd_tiny.weights / "model_card.json").read_text())
    frame = evaluate_page.card_summary_frame(card)
    assert list(zip(frame["model"], frame["split"])) == [
        ("Teacher", "validation"), ("Teacher", "test"), ("Student", "validation"), ("Student", "test")]
    assert frame["AUC (95% CI)"].str.match(r"^(n/a|\d\.\d{3}( \(\d\.\d{3}-\d\.\d{3}\))?)$").all()
    assert evaluate_page.card_splits(card) == ["validation", "test"]
    note = train_page.card_note(card)
    assert "**Written:**" in note and "\n- **Reproduce** (into a new run folder): `python -m kd pipeline" in note
    assert "--resume" not in note and "**test:**" in note


@pytest.mark.parametrize("n, bins", [(16, 2), (60, 3), (312, 10), (786, 10)])
def test_small_splits_get_fewer_calibration_bins(n, bins):
    from kd.metrics import calibration_curve

    y = [i % 2 for i in range(n)]
    p = [i / (n - 1) for i in range(n)]  # spread over [0, 1]: no bin empty
    curve = calibration_curve(y, p)
    assert len(curve["count"]) == bins and sum(curve["count"]) == n


def test_calibration_points_show_their_counts_and_hollow_when_few():
    from kd.ui import figures

    reports = {role: {"calibration": {"temperature": 1.0, "ece_raw": 0.1, "ece_scaled": 0.05,
                                      "curve": {"mean_predicted": [0.2, 0.8], "fraction_positive": [0.1, 0.9],
                                                "count": [3, 120]}}} for role in ("teacher", "student")}
    fig = figures.calibration_figure(reports)
    teacher = fig.data[1]
    assert list(teacher.customdata) == [3, 120] and "n=%{customdata}" in teacher.hovertemplate
    assert teacher.text is None and fig.layout.legend.y < 0  # no labels to overlap; the legend under the chart
    assert list(teacher.marker.symbol) == ["circle-open", "circle"]
    assert teacher.marker.size[0] < teacher.marker.size[1]


def test_a_card_without_bin_counts_gets_no_made_up_counts():
    from kd.ui import figures

    curve = {"mean_predicted": [0.2, 0.8], "fraction_positive": [0.1, 0.9]}  # a card written before counts
    reports = {role: {"calibration": {"curve": curve}} for role in ("teacher", "student")}
    teacher = figures.calibration_figure(reports).data[1]
    assert teacher.text is None and teacher.mode == "lines+markers"


# ----------------------------------------------------------------------------- issue 20: a stopped or failed run's panel

def test_a_stopped_run_shows_no_eta_and_no_images_per_second(tmp_path):
    reporter = kprogress.Reporter(tmp_path)
    reporter.start(state="running", phases=["finetune"])
    reporter.log("phase_start", phase="finetune", epochs=3)
    reporter.log("step", phase="finetune", epoch=1, epochs=3, step=2, steps=8, global_step=2, total_steps=24)
    reporter.update(eta_s=120.0, images_per_s=33.0)
    reporter.update(state="stopped", stopped=time.time())
    view = run_views.run_view(tmp_path)
    assert view.state == "stopped" and view.images_per_s is None and "ETA" not in view.progress_text


def test_a_run_that_failed_on_its_data_is_offered_no_resume_until_the_data_is_fixed(tmp_path):
    from kd.config import preset
    from tests.fixtures.xray_fixtures import write_kermany_dataset

    data = write_kermany_dataset(tmp_path / "data", n_per_class=(4, 4), size=32)
    run = tmp_path / "run"
    run.mkdir()
    cfg = preset("tiny")
    cfg.data = str(data)
    cfg.save(run / "config.json")
    kprogress.Reporter(run).start(state="failed", phases=["finetune"], error="... has no NORMAL/ folder")
    normal = data / "train" / "NORMAL"
    normal.rename(tmp_path / "moved")
    view = run_views.run_view(run)
    assert view.state == "failed" and not view.can_resume
    assert "has no NORMAL/ folder" in view.resume_problem and "Expected layout" not in view.resume_problem
    (tmp_path / "moved").rename(normal)  # fixed: Resume is offered again
    view = run_views.run_view(run)
    assert view.resume_problem is None and view.can_resume
