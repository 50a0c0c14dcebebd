"""The real app in a subprocess: `streamlit run streamlit_app.py` on a free local port.

Shared by the browser test and bench/app_memory.py, which drive it with Debian's chromium."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the checkout: streamlit_app.py is there
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def start(env: dict[str, str], log: Path | None = None, timeout_s: float = 90) -> tuple[subprocess.Popen, str]:
    """(process, url) once the server answers; RuntimeError (with the log's end) if it dies or is too slow."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    out = open(log, "wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(REPO / "streamlit_app.py"), "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
        cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    if log:
        out.close()  # the child keeps its own descriptor
    deadline = time.time() + timeout_s
    while not _healthy(url):
        if proc.poll() is not None or time.time() > deadline:
            stop(proc)
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            raise RuntimeError(f"streamlit did not start in {timeout_s:.0f} s (exit status {proc.returncode})\n{tail}")
        time.sleep(0.5)
    return proc, url


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL if it has not gone in 15 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
