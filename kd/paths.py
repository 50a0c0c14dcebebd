"""Where things are on disk: this checkout, the shipped weights, the runs folder.

Each default is read from the environment when it is asked for (`KD_WEIGHTS`, `KD_RUNS_DIR`), not
once at import, so a test or a launcher can point the app elsewhere without re-importing `kd`.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # the checkout: weights/, runs/ and streamlit_app.py are here
SHIPPED_WEIGHTS = REPO / "weights"


def default_weights() -> Path:
    """The weights folder used when none is named: env KD_WEIGHTS, else the shipped one."""
    return Path(os.environ.get("KD_WEIGHTS") or SHIPPED_WEIGHTS)


def default_runs_root() -> Path:
    """Where runs are written: env KD_RUNS_DIR, else <repo>/runs."""
    return Path(os.environ.get("KD_RUNS_DIR") or REPO / "runs")
