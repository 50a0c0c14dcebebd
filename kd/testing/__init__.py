"""Fixtures shared by tests/ and bench/: generated X-rays and datasets, and the real app in a subprocess.

Not used by the app, the CLI or training. They live in the package (not in tests/) so that the
benchmarks and the tests import them from one place without importing each other.

- `kd.testing.xray_fixtures`: deterministic X-ray-like images, every kind of bad upload, and a tiny
  generated dataset in the Kermany layout (`write_kermany_dataset`).
- `kd.testing.app_server`: `streamlit run streamlit_app.py` on a free local port, and Debian's chromium.
"""
