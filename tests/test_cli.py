"""The command line answers --help and usage errors without importing torch (seconds saved on every call)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PROBE = """
import sys
from kd.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "torchvision", "kd.pipeline", "kd.serving") if m in sys.modules)
print("HEAVY", " ".join(heavy) or "-", "EXIT", code)
"""


def probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_help_imports_no_torch():
    for args in (["--help"], ["evaluate", "--help"], ["predict", "--help"], ["pipeline", "--help"]):
        done = probe(*args)
        assert done.stdout.strip().endswith("HEAVY - EXIT 0"), (args, done.stdout[-500:], done.stderr[-2000:])


def test_usage_error_imports_no_torch():
    done = probe("evaluate")  # --data missing
    assert "HEAVY - EXIT 2" in done.stdout and "--data" in done.stderr


def test_help_explains_splits_and_default_weights():
    out = probe("evaluate", "--help").stdout
    for words in ("official-val", "patient-level validation split", "KD_WEIGHTS"):
        assert words in " ".join(out.split()), words
    assert "KD_WEIGHTS" in probe("predict", "--help").stdout
