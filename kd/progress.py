"""Training progress another process can follow: JSON lines plus an atomically replaced status file.

`progress.jsonl` gets one line per logged step and per epoch (phase, epoch, step, loss, lr,
images/s, ETA, validation metrics); `status.json` always holds the latest state. The app's live
page only reads these two files, through kd.statefile: what it cannot use is reported as
"unreadable: <file>, <why>" rather than crashing the page.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from kd import statefile
from kd.checkpoint import write_json_atomic
from kd.statefile import NUMBER, OPTIONAL_NUMBER, OPTIONAL_STR, UnreadableState, list_of, object_with

PROGRESS_FILE = "progress.jsonl"
STATUS_FILE = "status.json"

_COUNTERS = ("epoch", "epochs", "step", "steps", "global_step", "total_steps", "images_per_s", "eta_s", "loss", "lr",
             "started", "finished", "stopped", "updated", "elapsed_before")
_PHASE_COUNTERS = ("epoch", "epochs", "step", "steps", "global_step", "total_steps", "images_per_s", "eta_s", "loss")
_FINITE = statefile.finite(or_null=True)  # counters feed ETAs, int() and charts: Infinity or NaN crash them
# What the readers of status.json use (the app's live panel, kd.jobs); other keys pass unchecked.
STATUS_SHAPE = object_with(optional={
    "state": str, "phases": list_of(str), "phase": OPTIONAL_STR, "last_event": str, "error": OPTIONAL_STR,
    "pid": int, "model": str, "precision": OPTIONAL_STR, **{key: _FINITE for key in _COUNTERS}})
# One progress event; steps and epochs need what the charts are drawn from.
_EVENT_FIELDS = {"time": NUMBER, "phase": OPTIONAL_STR, "metrics": statefile.mapping_of(OPTIONAL_NUMBER),
                 "seconds": _FINITE, **{key: _FINITE for key in _COUNTERS}}
_EVENT_REQUIRED = {"step": {"phase": str, "global_step": statefile.finite()},
                   "epoch": {"phase": str, "epoch": statefile.finite()}}


def check_event(value, what: str = "it") -> None:
    """statefile check of one progress.jsonl record (its required fields depend on its kind)."""
    object_with({"kind": str})(value, what)
    object_with(_EVENT_REQUIRED.get(value["kind"], {}), _EVENT_FIELDS)(value, what)


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
        # a new phase starts with no epoch or step of its own yet (not the last phase's "step 8/8")
        fresh = dict.fromkeys(_PHASE_COUNTERS) if fields.get("phase") != self.state.get("phase") else {}
        self.update(**{**fresh, **{k: v for k, v in fields.items() if k != "metrics"}}, last_event=kind)

    def start(self, **fields) -> None:
        """A run (or a resumed run) begins: `started` is now, and the time its earlier sessions ran is kept
        in `elapsed_before`, so elapsed time counts every session and never goes negative."""
        if not self.enabled:
            return
        before = elapsed_seconds(self.state, running=False) if self.state.get("started") else 0.0
        self.update(**fields, started=time.time(), finished=None, stopped=None, elapsed_before=before or 0.0)

    def update(self, **fields) -> None:
        if not self.enabled:
            return
        self.state.update(fields, updated=time.time(), pid=os.getpid())
        write_json_atomic(self.run_dir / STATUS_FILE, self.state)


def elapsed_seconds(status: dict, running: bool, now: float | None = None) -> float | None:
    """Seconds a run has been running over all its sessions: the earlier sessions' `elapsed_before`, plus
    this session's from `started` to its end (finished, stopped, now while running, else its last update)."""
    started = status.get("started")
    if not started:
        return None
    end = status.get("finished") or status.get("stopped") or (
        (now or time.time()) if running else status.get("updated"))
    if not end:
        return None
    return float(status.get("elapsed_before") or 0.0) + max(0.0, end - started)


def load_status(run_dir: str | Path) -> dict | None:
    """The run's status; None before the run wrote one; UnreadableState when it cannot be used."""
    return statefile.read_json(Path(run_dir) / STATUS_FILE, STATUS_SHAPE, default=None)


def read_status(run_dir: str | Path) -> dict | None:
    """The run's status, or None when there is none or it cannot be used (load_status says why)."""
    try:
        return load_status(run_dir)
    except UnreadableState:
        return None


def load_progress(run_dir: str | Path) -> tuple[list[dict], UnreadableState | None]:
    """The usable events so far, and what was wrong with the lines left out (None when nothing was)."""
    return statefile.read_json_lines(Path(run_dir) / PROGRESS_FILE, check_event)


def read_progress(run_dir: str | Path) -> list[dict]:
    """The usable events so far; a partially written last line and malformed lines are left out."""
    return load_progress(run_dir)[0]
