"""Safe model and state I/O.

Training state: `torch.save` to a temporary file in the same folder, then `os.replace`, so a crash or
a full disk never leaves a half-written checkpoint in place of a good one (temporaries left by
killed writers are removed by the next write in the same folder); loaded with
`weights_only=True`, so a crafted pickle cannot run code. Shipped weights: safetensors.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

try:
    from safetensors import SafetensorError as _SafetensorError
except ImportError:  # older safetensors
    _SafetensorError = RuntimeError


class CheckpointError(RuntimeError):
    """A checkpoint or weights file that cannot be written or read; the message says which and why."""


# ".<name>.<pid>.<random>.tmp" (temporary_path) or ".<key>.<pid>.npy.tmp" (image caches of earlier versions)
_TEMPORARY = re.compile(r"\..+\.(?P<pid>\d+)\.(?:[a-z0-9_]{8}|npy)\.tmp")
_UNTAGGED = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")  # written before temporaries carried their writer's pid
_UNTAGGED_AGE_S = 3600


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        pass
    return True


def remove_dead_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporaries in `folder` whose writer is gone: a writer killed mid-save runs no
    clean-up, and a training state's temporary is tens of MB, an image cache's gigabytes. Live
    writers' files are left alone; untagged ones, from earlier versions, go once an hour old."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        tagged = _TEMPORARY.fullmatch(name)
        if not (tagged or _UNTAGGED.fullmatch(name)):
            continue
        tmp = Path(folder) / name
        try:
            stale = not _alive(int(tagged["pid"])) if tagged else time.time() - tmp.stat().st_mtime > _UNTAGGED_AGE_S
            if stale:
                tmp.unlink()
                removed.append(tmp)
        except OSError:
            pass
    return removed


def temporary_path(path: str | Path) -> Path:
    """A new empty temporary beside `path` (`.<name>.<pid>.<random>.tmp`), to write it atomically;
    what dead writers left in that folder is removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _write_failure(path: Path, e: BaseException, free_at_failure: int | None) -> CheckpointError:
    """Name the file and the cause; torch.save reports a full disk as a RuntimeError without errno ("unexpected
    pos ..."), so a disk found (nearly) full when the write failed is named as such."""
    if isinstance(e, OSError):
        reason = e.strerror or str(e)
    else:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if free_at_failure is not None and free_at_failure < 2**20:
            reason = f"No space left on device ({reason})"
    free = _free_bytes(path.parent)
    if free is not None and not isinstance(e, OSError):
        reason += f" ({free / 2**20:.0f} MB free on that disk once the failed write was removed)"
    return CheckpointError(f"Could not write {path}: {reason}. The previous file, if any, is intact.")


def _discard(tmp: Path) -> None:
    """Remove a failed write's temporary and free its space now: truncation frees the blocks even while the
    writer's file is still open (torch.save's, held by the exception's traceback), so that on a full disk the
    failure itself can still be recorded (status.json)."""
    try:
        os.truncate(tmp, 0)
    except OSError:
        pass
    tmp.unlink(missing_ok=True)


def _atomic_write(path: Path, write) -> None:
    tmp = None
    try:
        tmp = temporary_path(path)
        write(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError, _SafetensorError) as e:
        free = _free_bytes(path.parent)
        if tmp is not None:
            _discard(tmp)
        raise _write_failure(path, e, free) from e
    except BaseException:
        if tmp is not None:
            _discard(tmp)
        raise


def save_state(state: dict, path: str | Path) -> None:
    """Atomically save a training state (tensors, numbers, strings, lists, dicts)."""
    _atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


def load_state(path: str | Path, map_location="cpu") -> dict:
    """Load a training state without unpickling arbitrary objects."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # UnpicklingError for crafted pickles, RuntimeError for corrupt zips
        raise CheckpointError(f"Refused to load {path}: not a plain weights checkpoint ({type(e).__name__}).") from e


def write_json_atomic(path: str | Path, obj) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False, default=str)
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def save_weights(model: torch.nn.Module, path: str | Path, fp16: bool = False, metadata: dict | None = None) -> None:
    """A model's state dict as safetensors (optionally float16: half the size, same predictions to ~1e-3)."""
    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        if fp16 and v.is_floating_point():
            v = v.half()
        tensors[k] = v
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    _atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_weights(model: torch.nn.Module, path: str | Path, strict: bool = True) -> torch.nn.Module:
    """Load safetensors into a model, casting to the model's dtypes."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path.name}: only .safetensors weights are loaded here.")
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"Weights file {path} not found.") from None
    except Exception as e:
        raise CheckpointError(f"{path} is not a valid safetensors file ({e}).") from e
    damaged = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if damaged:  # a NaN weight gives p = nan, which every "p >= threshold" reads as NORMAL
        raise CheckpointError(f"{path} holds NaN or infinite values (in {', '.join(damaged[:3])}"
                              f"{f' and {len(damaged) - 3} more tensors' if len(damaged) > 3 else ''}): the weights "
                              "are damaged; restore or retrain them.")
    own = model.state_dict()
    tensors = {k: v.to(own[k].dtype) if k in own else v for k, v in tensors.items()}
    try:
        model.load_state_dict(tensors, strict=strict)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not match the model architecture: {str(e).splitlines()[0]}") from e
    return model


def file_in_folder(folder: str | Path, name: str) -> Path:
    """`folder / name`, refused (CheckpointError) unless it resolves to a file directly inside `folder`: a model
    card names its weights files, and must not reach outside its folder by '../', an absolute path or a symlink."""
    folder = Path(folder)
    path = folder / name
    try:
        inside = path.resolve(strict=False).parent == folder.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise CheckpointError(f"{path} cannot be resolved ({e}).") from None
    if not inside or Path(name).name != name:
        raise CheckpointError(f"{path} is outside the weights folder {folder} (the model card must name a file "
                              "in its own folder; symlinks elsewhere are not followed).")
    return path


def load_any_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A user's weights file (safetensors, or a torch checkpoint loaded with weights_only=True)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = load_state(path)
    for key in ("state_dict", "model", "teacher"):  # common wrappers (Lightning, SwAV, DINO)
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict.")
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items() if torch.is_tensor(v)}
