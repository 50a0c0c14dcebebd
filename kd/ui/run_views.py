"""How runs stand, from their files only: one run's live view (progress frames, state, log tail) and the
runs table with each finished run's numbers."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kd import data as kdata
from kd import progress as kprogress
from kd import runs as kruns
from kd.config import PROBE
from kd.statefile import UnreadableState
from kd.ui.served import ROLES
from kd.ui.state import dataset_state, running_job, runs_root


def step_frame(events: list[dict]) -> pd.DataFrame:
    """Logged steps in run order: `x` counts steps over all phases (a resumed epoch's repeats replaced)."""
    cols = ["x", "phase", "epoch", "step", "global_step", "total_steps", "loss", "lr", "images_per_s", "eta_s",
            "time"]
    steps = [e for e in events if e.get("kind") == "step"]
    if not steps:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame(steps)
    for c in cols[1:]:
        if c not in df:
            df[c] = np.nan
    order = list(dict.fromkeys(df["phase"]))
    df = df.drop_duplicates(["phase", "global_step"], keep="last")
    df["phase"] = pd.Categorical(df["phase"], categories=order, ordered=True)
    df = df.sort_values(["phase", "global_step"])
    offsets, total = {}, 0
    for ph in order:
        offsets[ph] = total
        rows = df["phase"] == ph
        planned = df.loc[rows, "total_steps"].max()  # NaN when no step of the phase said
        total += int(planned if pd.notna(planned) and planned > 0 else df.loc[rows, "global_step"].max())
    df["x"] = df["global_step"] + df["phase"].astype(str).map(offsets)
    df["phase"] = df["phase"].astype(str)
    return df[cols].reset_index(drop=True)


def epoch_frame(events: list[dict]) -> pd.DataFrame:
    """Validation metrics per phase and epoch (AUC, accuracy... or the SSL kNN probe)."""
    rows = {}
    for e in events:
        if e.get("kind") == "epoch":
            rows[(e.get("phase"), e.get("epoch"))] = {"phase": e.get("phase"), "epoch": e.get("epoch"),
                                                      **(e.get("metrics") or {}), "seconds": e.get("seconds")}
    return pd.DataFrame(list(rows.values()))


def _duration(seconds: float | None) -> str:
    if seconds is None or not np.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass
class RunView:
    name: str
    path: Path
    state: str  # running | finished | failed | stopped | starting
    status: dict
    steps: pd.DataFrame
    epochs: pd.DataFrame
    fraction: float
    progress_text: str
    images_per_s: float | None
    elapsed: str
    error: str | None
    running: bool
    problems: list[str]  # "unreadable: <file>, <why>" for status.json / progress.jsonl: shown, the rest goes on
    resume_problem: str | None = None  # why Resume would fail again (resume_problem), so it is not offered

    @property
    def can_resume(self) -> bool:
        return (not self.running and self.state in ("stopped", "failed") and (self.path / "config.json").exists()
                and self.resume_problem is None)


def resume_problem(run_dir: Path) -> str | None:
    """Why resuming a stopped or failed run cannot work as things are (its settings unreadable, its dataset
    gone or not in the layout, an unlabeled folder gone), or None. Checked before Resume is offered, so a run
    that failed on its data is not offered a resume that fails the same way until the data is fixed."""
    from kd.config import Config

    try:
        cfg = Config.load(run_dir / "config.json")
        if not cfg.data.strip():
            return f"{run_dir / 'config.json'} names no dataset folder."
        problem = dataset_state(cfg.data)[1]  # the check the sidebar shows, cached per folder state
        if problem:
            return problem.split("\n\nExpected layout")[0]
        if cfg.unlabeled:
            kdata.list_unlabeled(cfg.unlabeled)
    except (ValueError, OSError) as e:  # DatasetError and UnreadableState are ValueErrors
        return str(e).split("\n\nExpected layout")[0]
    return None


def live_state(status: dict, running: bool, job: dict | None) -> str | None:
    """The state to show for a run: its status's, except that the running job's run reads "starting" until
    the job has rewritten the status it left when it last stopped (launched or resumed just now)."""
    state = status.get("state")
    fresh = (status.get("started") or 0) >= (job or {}).get("started", 0)
    if running and (state not in ("running", "finished") or not fresh):
        return "starting"
    return state


def is_job_run(job: dict | None, run_dir: str | Path) -> bool:
    return bool(job and Path(job["run_dir"]).resolve() == Path(run_dir).resolve())


def run_view(run_dir: str | Path) -> RunView:
    """Everything the live panel shows about one run, from its status and progress files only."""
    run_dir = Path(run_dir)
    job = running_job()
    running = is_job_run(job, run_dir)
    problems = []
    try:
        status = kruns.run_status(run_dir, kprogress.load_status(run_dir) or {})
    except UnreadableState as e:
        status = {}
        problems.append(str(e))
    events, bad_lines = kprogress.load_progress(run_dir)
    if bad_lines:
        problems.append(str(bad_lines))
    state = live_state(status, running, job) or "unknown"
    phases = list(status.get("phases") or [])
    phase = status.get("phase")
    probing = phase == PROBE  # the linear probe that opens fine-tuning: shown as that phase's first part
    if probing:
        phase = "finetune"
    steps = step_frame(events)
    if state == "finished":
        fraction, text = 1.0, "finished"
    elif phase in phases:
        i = phases.index(phase)
        within = (status.get("global_step") or 0) / max(1, status.get("total_steps") or 1)
        if status.get("last_event") == "phase_start" or probing:
            within = 0.0
        fraction = min(1.0, (i + within) / max(1, len(phases)))
        text = f"{phase} ({i + 1}/{len(phases)}) · {'linear probe · ' if probing else ''}{_phase_position(status)}"
        if running and status.get("eta_s") is not None and status.get("last_event") == "step":
            text += f" · ETA for this phase {_duration(status.get('eta_s'))}"
    elif phase == "export":
        fraction, text = 0.99, f"exporting weights and model card ({status.get('model', '')})"
    else:
        fraction, text = 0.0, "preparing data (decoding images into the cache)" if running else state
    elapsed = _duration(kprogress.elapsed_seconds(status, running))
    blocked = resume_problem(run_dir) if not running and state in ("stopped", "failed") else None
    return RunView(run_dir.name, run_dir, state, status, steps, epoch_frame(events), float(fraction), text,
                   status.get("images_per_s") if running else None, elapsed, None if running else status.get("error"),
                   running, problems, blocked)


def _phase_position(status: dict) -> str:
    """Where the phase is: its epoch and step once it logged one, else what it is doing before its first step."""
    epochs = status.get("epochs")
    if status.get("last_event") == "teacher_targets":
        return "computing the teacher's outputs for distillation"
    if status.get("step") is None:
        if status.get("last_event") == "resume" and status.get("epoch") is not None:
            return f"resuming at epoch {status['epoch'] + 1}/{epochs}"
        return f"starting ({epochs} epoch{'s' if epochs != 1 else ''})" if epochs is not None else "starting"
    return f"epoch {status.get('epoch')}/{epochs} · step {status.get('step')}/{status.get('steps')}"


def log_tail(run_dir: str | Path, lines: int = 25, max_bytes: int = 64_000) -> str:
    """The last lines of train.log (progress-bar carriage returns folded)."""
    path = Path(run_dir) / "train.log"
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    out = [line.split("\r")[-1] for line in text.split("\n")]
    return "\n".join([line for line in out if line.strip()][-lines:])


def _card_number(card: dict | None, role: str, key: str) -> float | None:
    try:
        v = card["models"][role]["validation"][key]
        return None if v is None else round(float(v), 3)
    except (KeyError, TypeError, ValueError):
        return None


def runs_frame(runs: list[dict], job: dict | None = None) -> pd.DataFrame:
    """One row per run with its state and key numbers from its model card (validation split).

    `job`: the running job's record, whose run reads as the live panel says (live_state). Elapsed counts
    every session of a resumed run, as the live panel does; training time is the phases' epochs alone
    (the card's wall_time_s), without decoding and export."""
    rows = []
    for r in runs:
        status, card = r["status"], r["card"]
        cfg = (card or {}).get("config", {})
        state = live_state(status, is_job_run(job, r["path"]), job) or "?"
        rows.append({
            "run": r["name"], "state": state,
            "phases": ", ".join(status.get("phases") or []), "preset": cfg.get("preset", ""),
            "teacher AUC": _card_number(card, "teacher", "auc"), "student AUC": _card_number(card, "student", "auc"),
            "teacher acc": _card_number(card, "teacher", "accuracy"),
            "student acc": _card_number(card, "student", "accuracy"),
            "elapsed": _duration(kprogress.elapsed_seconds(status, state == "running")) if status.get("started") else "",
            "training time": _duration((card or {}).get("wall_time_s", {}).get("total")) if card else "",
            "modified": datetime.datetime.fromtimestamp(r["modified"]).strftime("%Y-%m-%d %H:%M"),
            "note": r.get("problem") or "",  # e.g. "unreadable: <run>/model_card.json, <why>"
        })
    frame = pd.DataFrame(rows)
    return frame if frame.empty or frame["note"].any() else frame.drop(columns="note")


def _newest_card_first(runs: list[dict]) -> list[dict]:
    """Runs with a model card, the newest card first (by the card's date, not the folder's modification
    time, which a later log line changes)."""
    return sorted((r for r in runs if r.get("card")), key=lambda r: str(r["card"].get("date") or ""), reverse=True)


def carded_runs(runs: list[dict]) -> list[str]:
    """Runs with a model card, newest card first."""
    return [r["name"] for r in _newest_card_first(runs)]


def has_both_models(run: dict) -> bool:
    """A finished run whose card has an exported teacher and student (a single phase may export only one)."""
    models = (run.get("card") or {}).get("models", {})
    return all("threshold" in models.get(role, {}) and (Path(run["path"]) / models[role].get("file", "")).is_file()
               for role in ROLES)


def usable_runs(runs: list[dict]) -> list[str]:
    """Runs whose weights Diagnose and Evaluate can use, the newest finished first."""
    return [r["name"] for r in _newest_card_first(runs) if has_both_models(r)]


def list_runs() -> list[dict]:
    return kruns.list_runs(runs_root())
