"""The app in a real browser: `streamlit run` in a subprocess, driven by Playwright with Debian's chromium.

With the shipped weights: upload an X-ray they never saw (tests/fixtures/data/, from the official test split)
beside a page of text; the X-ray gets both models and both heat maps at the default CAM's grid, the text
page is refused with its reason. Then start a tiny full pipeline on the Train page, stop it (confirmed) after
its first epoch, resume it, see the runs table say "running" and the loss chart grow, and follow it to the end
with a positive elapsed time; use its weights and see a photograph refused by the check its export fitted, with
no probability; visit Evaluate and Data. Screenshots of each page go to
the folder named by KD_SCREENSHOTS (else the test's tmp folder).
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest

from kd import cam, jobs
from kd.model_card import read_card
from kd.paths import SHIPPED_WEIGHTS
from tests.fixtures import app_server
from tests.fixtures.app_server import CHROMIUM, CHROMIUM_ARGS
from tests.fixtures.non_xrays import non_xrays, text_page
from tests.fixtures.xray_fixtures import REAL_XRAY as UNSEEN_XRAY  # an official-test image: never trained on
from tests.fixtures.xray_fixtures import jpeg_bytes

EPOCHS = 6  # tiny phases (about a second an epoch) long enough to be stopped, resumed and watched
COLOUR_PHOTO = non_xrays(np.zeros((64, 64), np.uint8))["colour_photo.jpeg"]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"no chromium at {CHROMIUM} (apt-get install chromium)")


@pytest.fixture
def server(app_env):
    env = {**os.environ, **app_env.env, "KD_WEIGHTS": str(SHIPPED_WEIGHTS)}  # real models for Diagnose
    proc, url = app_server.start(env, log=app_env.tmp / "streamlit.log")
    try:
        yield url
    finally:
        jobs.stop_job(app_env.runs)  # a training left running by a failed test
        app_server.stop(proc)


def _chart_points(page) -> int:
    """Points in the first plotly chart on the page (the training loss)."""
    return page.evaluate("""() => {
        const el = document.querySelector('.js-plotly-plot');
        return el ? el.querySelectorAll('.scatterlayer .point').length : 0;
    }""")


def _table_rows(page) -> list[list[str]]:
    """The cells of every st.dataframe on the page, row by row: the grid draws on a canvas, and keeps its
    cells in a hidden table for screen readers, which is what this reads."""
    return page.evaluate("""() => [...document.querySelectorAll('[data-testid="stDataFrame"] tr')]
        .map(tr => [...tr.querySelectorAll('td[role="gridcell"]')].map(td => td.textContent.trim()))
        .filter(cells => cells.length)""")


def _elapsed_seconds(page) -> int:
    """The live panel's Elapsed metric ("m:ss" or "h:mm:ss") in seconds; fails on "?" or a minus sign."""
    text = page.locator('[data-testid="stMetric"]').filter(has_text="Elapsed") \
        .locator('[data-testid="stMetricValue"]').first.inner_text().strip()
    assert not text.startswith("-") and text != "?", text
    seconds = 0
    for part in text.split(":"):
        seconds = seconds * 60 + int(part)
    return seconds


def _screenshot(page, path: Path) -> None:
    """The whole page: Streamlit scrolls inside its main container, so grow the viewport instead."""
    height = page.evaluate("() => document.querySelector('[data-testid=\"stMain\"]')?.scrollHeight || 1000")
    page.set_viewport_size({"width": 1400, "height": max(1000, min(int(height) + 50, 6000))})
    page.wait_for_timeout(500)
    page.screenshot(path=str(path))
    page.set_viewport_size({"width": 1400, "height": 1000})


@pytest.mark.slow(40)  # seconds on an idle machine, alone
def test_upload_and_training_in_a_browser(server, app_env):
    sync_api = pytest.importorskip("playwright.sync_api")
    shots = Path(os.environ.get("KD_SCREENSHOTS") or app_env.tmp / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    expect = sync_api.expect
    expect.set_options(timeout=60_000)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(server)

            # Diagnose: an unseen X-ray -> both models, both maps at the default grid; a text page -> refused
            expect(page.get_by_role("heading", name="Diagnose")).to_be_visible()
            expect(page.get_by_text("Research tool, not a diagnostic device").first).to_be_visible()
            page.locator("input[type=file]").set_input_files(files=[
                {"name": UNSEEN_XRAY.name, "mimeType": "image/jpeg", "buffer": UNSEEN_XRAY.read_bytes()},
                {"name": "letter.jpeg", "mimeType": "image/jpeg", "buffer": jpeg_bytes(text_page())}])
            expect(page.get_by_text("2 files: 1 diagnosed, 1 refused (no probability: see each).")).to_be_visible(timeout=120_000)
            probabilities = page.locator('[data-testid="stMetric"]').filter(has_text="Probability of pneumonia")
            expect(probabilities).to_have_count(2)  # teacher and student, for the X-ray only
            for value in probabilities.locator('[data-testid="stMetricValue"]').all_inner_texts():
                assert value.endswith("%") and 0 <= float(value.rstrip("%")) <= 100
            grid = cam.cam_option(cam.DEFAULT_CAM).source(read_card(SHIPPED_WEIGHTS).input.size)
            assert cam.cam_option(cam.DEFAULT_CAM).grid(read_card(SHIPPED_WEIGHTS).input.size) >= 14
            expect(page.locator('[data-testid="stImage"]').filter(has_text=grid)).to_have_count(2)
            refusal = page.locator('[data-testid="stAlert"]').filter(has_text="Refused: no probability is shown.")
            expect(refusal).to_have_count(1)
            expect(refusal).to_contain_text("chest radiograph")
            _screenshot(page, shots / "diagnose.png")

            # Train: a tiny full pipeline from the form, followed live, stopped, resumed, finished
            page.get_by_role("link", name="Train").click()
            expect(page.get_by_role("heading", name="Train")).to_be_visible()
            page.locator('[data-testid="stSelectbox"]').filter(has_text="What to run").click()
            page.get_by_role("option", name="Full pipeline", exact=True).click()
            page.locator('[data-testid="stSelectbox"]').filter(has_text="Preset").click()
            page.get_by_role("option", name="tiny", exact=True).click()
            page.get_by_label("Epochs (every phase)").fill(str(EPOCHS))
            page.get_by_label("Run name", exact=True).fill("browser")
            page.get_by_role("button", name="Start training").click()
            expect(page.get_by_text("Started pipeline")).to_be_visible()

            # stop once the first epoch's checkpoint is on disk: the panel shows epoch 2 or later
            position = re.compile(rf"epoch ([2-9]|\d{{2,}})/{EPOCHS} · step")
            expect(page.get_by_text(position).first).to_be_visible(timeout=180_000)
            page.wait_for_selector(".js-plotly-plot")
            before = _chart_points(page)
            assert before > 0
            state = page.locator('[data-testid="stMetric"]').filter(has_text="State")
            page.get_by_role("button", name="Stop").click()
            expect(page.get_by_text("Stop run browser?")).to_be_visible()
            page.get_by_role("button", name="Yes, stop it").click()
            expect(state.first).to_contain_text("stopped", timeout=60_000)
            stopped_at = _elapsed_seconds(page)
            assert stopped_at > 0
            page.get_by_role("button", name="Resume").click()

            # the resumed run is followed live: the runs table says "running", the loss chart grows
            deadline = time.time() + 60
            while ["browser", "running"] not in [row[:2] for row in _table_rows(page)] and time.time() < deadline:
                page.wait_for_timeout(250)
            assert ["browser", "running"] in [row[:2] for row in _table_rows(page)], _table_rows(page)
            counts = [_chart_points(page)]
            deadline = time.time() + 60
            while counts[-1] <= before and time.time() < deadline:
                page.wait_for_timeout(250)
                counts.append(_chart_points(page))
            assert counts[-1] > before, f"the loss chart did not grow after the resume: {before} then {counts}"
            expect(state.first).to_contain_text("finished", timeout=240_000)
            expect(state).to_have_count(1)  # the page rerun at the end replaced the live panel
            assert _elapsed_seconds(page) >= stopped_at  # both sessions counted, never negative
            # once the process has exited, the whole page reruns: runs table refreshed, polling off
            expect(page.get_by_role("button", name="Stop")).to_have_count(0)
            expect(page.get_by_text("Run to show")).to_be_visible()
            use = page.get_by_role("button", name="Use these weights")
            expect(use).to_have_count(1, timeout=60_000)  # a rerun may briefly show the stale element too
            _screenshot(page, shots / "train.png")
            use.click()
            expect(page.get_by_text("Diagnose and Evaluate now use run browser.")).to_be_visible()

            # Diagnose with the run's weights: its export fitted the refusal check, so a photograph gets none
            page.get_by_role("link", name="Diagnose").click()
            expect(page.get_by_role("heading", name="Diagnose")).to_be_visible()
            expect(page.get_by_text("Models: run browser")).to_be_visible()
            page.locator("input[type=file]").set_input_files(files=[
                {"name": "photo.jpeg", "mimeType": "image/jpeg", "buffer": COLOUR_PHOTO}])
            expect(page.get_by_text("1 file: 1 refused (no probability: see each).")).to_be_visible(timeout=120_000)
            expect(page.locator('[data-testid="stMetric"]').filter(has_text="Probability of pneumonia")).to_have_count(0)
            expect(page.locator('[data-testid="stAlert"]').filter(has_text="Refused: no probability is shown.")) \
                .to_have_count(1)

            # Evaluate and Data render with the tiny dataset
            page.get_by_role("link", name="Evaluate").click()
            expect(page.get_by_role("heading", name="Evaluate")).to_be_visible()
            page.get_by_role("button", name="Recompute on this split").click()
            expect(page.get_by_text("Recomputed on split")).to_be_visible(timeout=120_000)
            _screenshot(page, shots / "evaluate.png")
            page.get_by_role("link", name="Data").click()
            expect(page.get_by_text("Classes and patients per split")).to_be_visible()
            expect(page.locator('[data-testid="stImage"] img')).to_have_count(8)
            _screenshot(page, shots / "data.png")
            assert not page.locator('[data-testid="stException"]').count()
        finally:
            browser.close()
    card = json.loads((app_env.runs / "browser" / "model_card.json").read_text())
    assert card["phases"]["finetune"]["epochs"] == EPOCHS
    events = [json.loads(line) for line in (app_env.runs / "browser" / "progress.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "resume" for e in events)  # it was stopped and resumed, not run through
