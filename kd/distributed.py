"""Just enough of torch.distributed for one loop that runs alone or under `torchrun --nproc_per_node N`."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1  # the GPU of each process is resolve_device's business (LOCAL_RANK)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: torch.device) -> Dist:
    """Join the process group when launched by torchrun (NCCL on CUDA, gloo on CPU)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def mean_across_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar metrics over all ranks (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def auto_device_type() -> str:
    """What --device auto trains on here: "cuda" when a GPU is present, else "cpu" (no side effects)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; under torchrun each process takes its LOCAL_RANK GPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CUDA was requested but no GPU is available; use --device cpu or auto.")
    if name == "cuda" or (name == "auto" and auto_device_type() == "cuda"):
        index = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels once
        return torch.device("cuda", index)
    return torch.device("cpu")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX, as oneDNN detects them). Without it bf16
    autocast is emulated: training steps at 128 px ran 12x (ResNet18) and 18x (ResNet50) slower than float32 on an
    AVX2-only CPU (bench/cpu_bf16.py), where with it they ran 1.5-1.9x faster."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: no fast bf16 either
        return False


def bf16_autocast(device: torch.device, asked: bool) -> bool:
    """Whether training steps on `device` run under bf16 autocast: on CUDA where the GPU supports bf16, on the
    CPU when asked (Config.cpu_bf16) and the CPU has native bf16; float32 otherwise."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return asked and cpu_has_native_bf16()


def bf16_falls_back(device: torch.device, asked: bool) -> bool:
    """bf16 was asked for CPU training, and this CPU will train in float32 instead (no native bf16)."""
    return device.type == "cpu" and asked and not bf16_autocast(device, asked)


def training_precision(device: torch.device, asked: bool) -> str:
    """What bf16_autocast chose, in words for the run's status, the Train page and the console."""
    if bf16_autocast(device, asked):
        return "bf16 autocast"
    if bf16_falls_back(device, asked):
        return ("float32: bf16 was asked, but this CPU has no native bf16 (AVX512-BF16 or AMX), where emulated "
                "bf16 is several times slower")
    return "float32"


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
