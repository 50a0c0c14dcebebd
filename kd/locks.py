"""Exclusive locks that the kernel releases when their holder dies.

A lock is `fcntl.flock` on a file that is never rewritten, replaced or deleted: the lock belongs to
the open file, so a holder killed at any point (SIGKILL, OOM) releases it with its last descriptor,
and there is no stale lock to guess about or recover. Who holds it is written beside it
(`<lock>.json`, replaced atomically) only so that a refusal can name the holder.

Two locks use it: the app's one-training-job lock (`RUNS/.job.lock`, handed to the job's process)
and the run-folder lock (`RUN/.run.lock`, held by `kd.pipeline.run` on the main rank), so two runs
never write the same folder, whoever started them.
"""
from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from kd.checkpoint import write_json_atomic

RUN_LOCK = ".run.lock"


class LockedError(RuntimeError):
    """Another live process holds the lock; `holder` is what it wrote about itself."""

    def __init__(self, message: str, holder: dict):
        super().__init__(message)
        self.holder = holder


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


class Lock:
    """A held lock. `release()` closes this process's descriptor only: a child given the descriptor
    (`pass_fds`) keeps holding the lock until it exits."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    def fileno(self) -> int:
        return self.fd

    def describe(self, **holder) -> None:
        """Say who holds the lock (pid, run folder, ...), for the messages of those refused."""
        write_json_atomic(_record_path(self.path), holder)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # never LOCK_UN: that would release it for a child sharing the open file too
            self.fd = -1

    def __enter__(self) -> "Lock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _try_lock(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def acquire(path: str | Path, wait: float = 0.25, **holder) -> Lock:
    """Take the lock or raise LockedError naming its holder; never blocks longer than `wait` seconds.

    The short wait only rides over `holder()` checks, which take the lock shared for an instant."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + wait
    while not _try_lock(fd, fcntl.LOCK_EX):
        if time.monotonic() >= deadline:
            os.close(fd)
            who = _read_record(path)
            raise LockedError(f"{path} is held by process {who.get('pid', '?')}.", who)
        time.sleep(0.01)
    lock = Lock(path, fd)
    lock.describe(pid=os.getpid(), started=time.time(), **holder)
    return lock




def _read_record(path: Path) -> dict:
    """What the holder wrote about itself; statefile.UnreadableState when it is malformed (the app shows it)."""
    from kd import statefile

    check = statefile.object_with(optional={"pid": int, "run_dir": str, "command": str, "gpus": int,
                                            "started": statefile.NUMBER})
    return statefile.read_json(_record_path(path), check, default={})


def is_held(path: str | Path) -> bool:
    """Whether a live process holds the lock. Only reads: it creates, deletes and rewrites nothing (a
    shared lock taken for an instant)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # no lock file: never taken
        return False
    try:
        return not _try_lock(fd, fcntl.LOCK_SH)  # closing the descriptor below drops the shared lock
    finally:
        os.close(fd)


def holder(path: str | Path) -> dict | None:
    """What the live holder wrote about itself ({} if nothing yet), or None when the lock is free. Only reads."""
    return _read_record(Path(path)) if is_held(path) else None


def run_folder(out: str | Path) -> Lock:
    """Hold a run folder for one run: a second run on the same folder is refused, files untouched."""
    out = Path(out)
    try:
        return acquire(out / RUN_LOCK, run_dir=str(out))
    except LockedError as e:
        raise LockedError(f"{out} is in use by another run (process {e.holder.get('pid', '?')}): wait for it to "
                          "finish or stop it, or choose another output folder.", e.holder) from None
