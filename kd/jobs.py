"""Background training jobs for the app: one at a time, surviving page reruns and closed tabs.

A job is `python -m kd <command>` (or torchrun for several GPUs) in its own process group, so
stopping it stops every worker. One job at a time: `RUNS/.job.lock` is a `kd.locks` lock taken by
the starter and handed to the job's process, which holds it until it exits, however it exits; so
two starts at once cannot both win, and a killed job leaves nothing to clean up. Reading whether a
job runs only reads. The runs themselves (which there are, how each stands, the weights in use) are
kd.runs.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from kd import locks
from kd.checkpoint import write_json_atomic
from kd.config import PHASE_COMMANDS, Config
from kd.paths import REPO, default_runs_root
from kd.progress import read_status
from kd.runs import RunError

LOCK_FILE = ".job.lock"
COMMANDS = tuple(PHASE_COMMANDS)  # what a job may run


class JobError(RunError):
    """A job cannot be started, stopped or found; the message says why."""


def _alive(proc: psutil.Process) -> bool:
    """Whether a process still runs (not its pid reused: psutil compares start times). A zombie does not:
    if it is our own child, it is reaped here."""
    try:
        if not proc.is_running():
            return False
        if proc.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return True
        if proc.ppid() == os.getpid():
            os.waitpid(proc.pid, os.WNOHANG)
    except (psutil.NoSuchProcess, ChildProcessError):
        pass
    return False


def _family(pid: int) -> list[psutil.Process]:
    """A process and all its live descendants ([] when it is gone). torchrun starts its workers in
    sessions of their own, so the job's process group alone does not reach them."""
    try:
        root = psutil.Process(pid)
        return [root, *(child for child in root.children(recursive=True) if _alive(child))] if _alive(root) else []
    except psutil.NoSuchProcess:
        return []


def process_tree(pid: int) -> list[int]:
    """The pids of a process and all its live descendants (see _family)."""
    return [proc.pid for proc in _family(pid)]


def _signal_all(procs: list[psutil.Process], sig: int) -> None:
    for proc in procs:
        if not proc.is_running():  # gone, and its pid perhaps another process's by now
            continue
        for send in (lambda: os.killpg(os.getpgid(proc.pid), sig), lambda: proc.send_signal(sig)):
            try:
                send()
            except (ProcessLookupError, PermissionError, psutil.NoSuchProcess, psutil.AccessDenied):
                pass


def _ended(family: list[psutil.Process], lock: Path, timeout: float) -> bool:
    """Wait until every process of the family has ended and released the job's lock: a process's main
    thread can end (a zombie, reaped here when it is our child) while its other threads still hold it."""
    deadline = time.time() + timeout
    while any(_alive(p) for p in family) or locks.is_held(lock):
        if time.time() >= deadline:
            return False
        time.sleep(0.1)
    return True


_CHILDREN: list[subprocess.Popen] = []  # jobs this process started, waited for once they end (reap_children)


def reap_children() -> None:
    """Wait for the jobs this process started that have ended (Popen.poll: waitpid WNOHANG), so a finished
    run does not stay a <defunct> child of the app server; running ones are left alone."""
    for proc in list(_CHILDREN):
        if proc.poll() is not None:
            try:
                _CHILDREN.remove(proc)
            except ValueError:  # another session's thread reaped it first
                pass


def current_job(runs_root: str | Path | None = None) -> dict | None:
    """The running job's record (pid, run_dir, command, ...), or None. Reads files only (and reaps this
    process's ended jobs)."""
    reap_children()
    runs_root = Path(runs_root or default_runs_root())
    record = locks.holder(runs_root / LOCK_FILE)
    if record is None:
        return None
    return {"pid": None, "run_dir": "", "command": "", "gpus": 1, "started": 0, **record}


def start_job(cfg: Config, command: str = "pipeline", gpus: int = 1, resume: bool = False,
              runs_root: str | Path | None = None) -> dict:
    """Launch training in the background; refuses when a job is already running."""
    runs_root = Path(runs_root or default_runs_root())
    if command not in COMMANDS:
        raise JobError(f"Unknown job {command!r}; choose one of {', '.join(COMMANDS)}.")
    runs_root = Path(runs_root)
    run_dir = Path(cfg.out).resolve()
    if runs_root.resolve() not in run_dir.parents:
        raise JobError(f"Runs are written inside {runs_root} only.")
    cfg.validate()
    runs_root.mkdir(parents=True, exist_ok=True)
    writer = locks.holder(run_dir / locks.RUN_LOCK)
    if writer is not None:
        raise JobError(f"{run_dir.name} is being written by another run (process {writer.get('pid', '?')}, "
                       "perhaps started from the command line): wait for it to finish or stop it.")
    try:
        lock = locks.acquire(runs_root / LOCK_FILE, run_dir=str(run_dir), command=command, gpus=gpus)
    except locks.LockedError as e:
        name = Path(e.holder.get("run_dir") or "?").name
        raise JobError(f"A training job is already running ({name}, pid {e.holder.get('pid', '?')}). "
                       "Stop it first or wait for it to finish.") from None
    proc = None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_path = run_dir / "config.json"
        if not (resume and config_path.exists()):
            cfg.save(config_path)
        args = ["-m", "kd", command, "--data", cfg.data, "--out", str(run_dir), "--config", str(config_path),
                "--device", cfg.device] + (["--resume"] if resume else [])
        if gpus > 1:
            args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", "-m", *args[1:]]
        with open(run_dir / "train.log", "ab") as log:  # the job inherits the lock: held until it exits
            proc = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, pass_fds=(lock.fileno(),))
        _CHILDREN.append(proc)
        record = {"pid": proc.pid, "run_dir": str(run_dir), "command": command, "gpus": gpus, "started": time.time()}
        lock.describe(**record)
    except BaseException:
        if proc is not None:  # a job nobody could find or stop must not run on
            proc.kill()
            proc.wait()
        raise
    finally:
        lock.release()  # this process's descriptor only; the job's keeps the lock
    return record


def stop_job(runs_root: str | Path | None = None, timeout: float = 10.0) -> bool:
    """Stop the running job's whole process group (torchrun workers too); its last checkpoint stays."""
    runs_root = Path(runs_root or default_runs_root())
    job = current_job(runs_root)
    if job is None:
        return False
    family = _family(job["pid"])  # launcher, torchrun workers and anything they started
    lock = runs_root / LOCK_FILE
    _signal_all(family, signal.SIGTERM)  # torchrun forwards it to its workers; the loop's checkpoint stays
    if not _ended(family, lock, timeout):
        _signal_all([p for p in family if p.is_running()], signal.SIGKILL)
        _ended(family, lock, 5.0)
    status = read_status(job["run_dir"]) or {}
    write_json_atomic(Path(job["run_dir"]) / "status.json", {**status, "state": "stopped", "stopped": time.time()})
    return True


def resume_job(run_dir: str | Path, runs_root: str | Path | None = None) -> dict:
    """Continue a stopped or failed run from its last checkpoint, with its saved settings."""
    runs_root = Path(runs_root or default_runs_root())
    run_dir = Path(run_dir)
    try:
        cfg = Config.load(run_dir / "config.json")
    except (OSError, ValueError) as e:
        raise JobError(f"{e}: so {run_dir.name} cannot be resumed.") from e
    cfg.out = str(run_dir)
    status = read_status(run_dir) or {}
    command = "pipeline" if len(status.get("phases", [])) != 1 else status["phases"][0]
    return start_job(cfg, command if command in COMMANDS else "pipeline", resume=True, runs_root=runs_root)
