"""The runs folder: which runs there are, how each stands, and which weights the app uses.

A run is a folder of `RUNS/` (`kd.paths.default_runs_root`) written by `kd pipeline` or an app job
(kd.jobs). `active.json` beside the runs names the run whose weights Diagnose and Evaluate use; without
it they use the shipped weights. Everything here that reads only reads: listing runs or asking how one
stands creates, deletes and rewrites nothing.
"""
from __future__ import annotations

import re
from pathlib import Path

from kd import locks, statefile
from kd.checkpoint import write_json_atomic
from kd.model_card import CARD_FILE, read_card
from kd.paths import default_runs_root, default_weights
from kd.progress import read_status

ACTIVE_FILE = "active.json"
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # whole name (fullmatch): no trailing newline
ENDED_UNEXPECTEDLY = "the training process ended unexpectedly; Resume continues from the last epoch"


class RunError(RuntimeError):
    """A run cannot be named, found or used; the message says why."""


_STATE_SUFFIXES = (".json", ".jsonl", ".lock", ".tmp")  # the runs folder's own files (active.json, the job lock)


def check_not_reserved(run_dir: str | Path) -> None:
    """RunError when a run folder would take the name of a state file of the runs folder: a run called
    active.json is a folder where the weights choice is written, which then fails for every later run."""
    name = Path(run_dir).name
    if name.lower() == ACTIVE_FILE or name.lower().endswith(_STATE_SUFFIXES):
        raise RunError(f"Run name {name!r} is reserved: names ending in {', '.join(_STATE_SUFFIXES)} are the runs "
                       "folder's own files (active.json chooses the weights in use); choose another name.")


def run_dir_for(name: str, runs_root: str | Path | None = None) -> Path:
    """A run folder inside runs_root; names are restricted so no path can escape it."""
    runs_root = Path(runs_root or default_runs_root())
    if not _RUN_NAME.fullmatch(name or ""):
        raise RunError(f"Run name {name!r} is not allowed: use letters, digits, '.', '_' or '-' (max 64).")
    check_not_reserved(name)
    return runs_root / name


def run_status(run_dir: str | Path, status: dict | None = None) -> dict:
    """A run's status (`status` when the caller has read it already, else its status.json), except that
    a run recorded as running whose folder no process holds any more ended without saying so (killed,
    out of memory, disk full): it reads as failed."""
    status = (read_status(run_dir) or {}) if status is None else status
    if status.get("state") == "running" and locks.holder(Path(run_dir) / locks.RUN_LOCK) is None:
        return {**status, "state": "failed", "error": status.get("error") or ENDED_UNEXPECTEDLY}
    return status


def list_runs(runs_root: str | Path | None = None) -> list[dict]:
    """Runs, newest first, with their status and model card when finished."""
    root = Path(runs_root or default_runs_root())
    runs = []
    if not root.is_dir():
        return runs
    for d in root.iterdir():
        if not d.is_dir() or d.name.startswith("."):
            continue
        card = problem = None
        if (d / CARD_FILE).exists():
            try:
                card = read_card(d).document  # the pages show it as JSON
            except statefile.UnreadableState as e:
                problem = str(e)
        runs.append({"name": d.name, "path": str(d), "status": run_status(d), "card": card, "problem": problem,
                     "modified": d.stat().st_mtime})
    return sorted(runs, key=lambda r: r["modified"], reverse=True)


def activate(run_dir: str | Path, runs_root: str | Path | None = None) -> None:
    """Make a finished run's weights the ones the Diagnose and Evaluate pages use."""
    runs_root = Path(runs_root or default_runs_root())
    run_dir = Path(run_dir)
    if not (run_dir / CARD_FILE).exists():
        raise RunError(f"{run_dir.name} has no model card yet: only finished runs can be used.")
    write_json_atomic(runs_root / ACTIVE_FILE, {"weights": str(run_dir.resolve())})


def active_weights(runs_root: str | Path | None = None) -> Path:
    """The weights folder in use: the activated run, else the shipped weights."""
    runs_root = Path(runs_root or default_runs_root())
    # a malformed active.json raises statefile.UnreadableState ("unreadable: <file>, <why>"): the app shows it
    active = statefile.read_json(runs_root / ACTIVE_FILE, statefile.object_with({"weights": str}), default=None)
    if active is not None and (Path(active["weights"]) / CARD_FILE).exists():
        return Path(active["weights"])
    return default_weights()


def reset_active(runs_root: str | Path | None = None) -> None:
    """Back to the shipped weights."""
    (Path(runs_root or default_runs_root()) / ACTIVE_FILE).unlink(missing_ok=True)
