"""Memory of the real app: `streamlit run streamlit_app.py` with the shipped weights, driven by chromium.

    python bench/app_memory.py [--files 24]

idle   : resident memory of the server once it answers, before any page is opened (the baseline);
loaded : after the Diagnose page has loaded both models and diagnosed --files full-resolution X-rays
         (../shared/data/fullres_samples, else a real X-ray enlarged to 2,000 px) uploaded at once;
peak   : the server's high-water mark (VmHWM) over the whole run.
Needs Debian's chromium at /usr/bin/chromium and the playwright package (as the browser test does).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import SHARED
from tests.fixtures import app_server
from tests.fixtures.app_server import CHROMIUM, CHROMIUM_ARGS
from tests.fixtures.xray_fixtures import real_xray


def status_mib(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a process, in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def uploads(n: int) -> list[dict]:
    """The full-resolution samples, else a real test-split X-ray enlarged to 2000x1700 with a little noise
    per file (distinct uploads that the out-of-distribution check lets through to both models)."""
    files = sorted((SHARED / "fullres_samples").rglob("*.jpeg"))[:n]
    if files:
        return [{"name": f.name, "mimeType": "image/jpeg", "buffer": f.read_bytes()} for f in files]
    return [{"name": f"enlarged_{i}.jpeg", "mimeType": "image/jpeg", "buffer": real_xray(2000, 1700, noise=4, seed=i)}
            for i in range(n)]


def main(argv=None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=24)
    args = p.parse_args(argv)
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        print("playwright is not installed: app memory not measured (pip install -r requirements.txt)")
        return None
    if not Path(CHROMIUM).exists():
        print(f"no chromium at {CHROMIUM}: app memory not measured (apt-get install chromium)")
        return None
    files = uploads(args.files)
    with tempfile.TemporaryDirectory() as runs:
        env = {k: v for k, v in os.environ.items() if k != "KD_WEIGHTS"}  # the shipped weights
        proc, url = app_server.start({**env, "KD_RUNS_DIR": runs})
        try:
            time.sleep(1)
            idle = status_mib(proc.pid)
            t0 = time.perf_counter()
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(url)
                expect(page.get_by_role("heading", name="Diagnose")).to_be_visible(timeout=60_000)
                page.locator("input[type=file]").set_input_files(files=files)
                expect(page.locator('[data-testid="stImage"] img')).to_have_count(2 * len(files), timeout=300_000)
                seconds = time.perf_counter() - t0
                loaded = status_mib(proc.pid)
                browser.close()
        finally:
            app_server.stop(proc)
    print(f"streamlit server, shipped weights, {len(files)} X-rays diagnosed in {seconds:.1f} s "
          f"(both models, both Grad-CAM overlays each)")
    print(f"  idle RSS {idle['VmRSS']:7.0f} MiB (baseline)")
    print(f"  loaded   {loaded['VmRSS']:7.0f} MiB  ({loaded['VmRSS'] / idle['VmRSS']:.1f}x idle)")
    print(f"  peak     {loaded['VmHWM']:7.0f} MiB  ({loaded['VmHWM'] / idle['VmRSS']:.1f}x idle)")
    return {"idle_mib": idle["VmRSS"], "loaded_mib": loaded["VmRSS"], "peak_mib": loaded["VmHWM"],
            "seconds": seconds, "files": len(files)}


if __name__ == "__main__":
    main()
