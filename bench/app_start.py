"""Cold start as a user feels it: seconds from `streamlit run` to the Diagnose page's uploader, and to the
models being loaded (the weights caption), in a real chromium; this checkout against another one.

    python bench/app_start.py --before PATH_TO_ANOTHER_CHECKOUT [--pairs 3]

Each round starts a fresh server of each checkout in turn (before, now: interleaved, so the machine's load
falls on both), with the shipped weights of this checkout, and opens the page once. Prints the medians and
the ratio before / now for the uploader (issue 20: 31 s when the models loaded first).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import common
from tests.fixtures import app_server
from tests.fixtures.app_server import CHROMIUM, CHROMIUM_ARGS


def one_start(browser, repo: Path, env: dict) -> tuple[float, float]:
    """(seconds to the uploader, seconds to the models' caption) from the server's launch."""
    t0 = time.perf_counter()
    proc, url = app_server.start(env, repo=repo)
    try:
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector("input[type=file]", state="attached", timeout=180_000)
        uploader = time.perf_counter() - t0
        page.get_by_text("Models: shipped weights").first.wait_for(timeout=180_000)
        models = time.perf_counter() - t0
        page.close()
    finally:
        app_server.stop(proc)
    return uploader, models


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="another checkout (e.g. a git worktree of an older commit)")
    p.add_argument("--pairs", type=int, default=common.MIN_PAIRS)
    args = p.parse_args(argv)
    from playwright.sync_api import sync_playwright

    env = {**os.environ, "KD_WEIGHTS": str(common.REPO / "weights")}
    env.pop("KD_DATA", None)
    times: dict[str, list[tuple[float, float]]] = {"before": [], "now": []}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            for _ in range(args.pairs):
                for name, repo in (("before", Path(args.before)), ("now", common.REPO)):
                    times[name].append(one_start(browser, repo, env))
                    print(f"  {name:6} uploader {times[name][-1][0]:5.1f} s, models {times[name][-1][1]:5.1f} s",
                          flush=True)
        finally:
            browser.close()
    med = {name: [statistics.median(t[i] for t in v) for i in (0, 1)] for name, v in times.items()}
    ratios = [b[0] / n[0] for b, n in zip(times["before"], times["now"])]
    print(f"to the uploader: before {med['before'][0]:.1f} s, now {med['now'][0]:.1f} s, before/now "
          f"{statistics.median(ratios):.2f}x (median of {len(ratios)} pairs, range {min(ratios):.2f}-{max(ratios):.2f}); "
          f"to the models: before {med['before'][1]:.1f} s, now {med['now'][1]:.1f} s")
    return {"median": med, "ratios": ratios}


if __name__ == "__main__":
    main()
