"""Training progress another process can follow: JSON lines plus an atomically replaced status file.

`progress.jsonl` gets one line per logged step and per epoch (phase, epoch, step, loss, lr,
images/s, ETA, validation metrics); `status.json` always holds the latest state. The app's live
page only reads these two files.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from kd.checkpoint import write_json_atomic

PROGRESS_FILE = "progress.jsonl"
STATUS_FILE = "status.json"


class Reporter:
    """Writes progress of a run; a disabled reporter (non-zero DDP ranks) writes nothing."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.state: dict = {}
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            previous = read_status(self.run_dir)
            self.state = previous or {}

    def log(self, kind: str, **fields) -> None:
        """Append one event line and fold it into the status."""
        if not self.enabled:
            return
        record = {"time": time.time(), "kind": kind, **fields}
        with open(self.run_dir / PROGRESS_FILE, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
        self.update(**{k: v for k, v in fields.items() if k != "metrics"}, last_event=kind)

    def update(self, **fields) -> None:
        if not self.enabled:
            return
        self.state.update(fields, updated=time.time(), pid=os.getpid())
        write_json_atomic(self.run_dir / STATUS_FILE, self.state)


def read_status(run_dir: str | Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None


def read_progress(run_dir: str | Path) -> list[dict]:
    """All events so far; a partially written last line is ignored."""
    events = []
    try:
        with open(Path(run_dir) / PROGRESS_FILE) as f:
            for line in f:
                try:
                    events.append(json.loads(line))
                except ValueError:
                    pass
    except OSError:
        pass
    return events
