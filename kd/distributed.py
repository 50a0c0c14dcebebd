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


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; under torchrun each process takes its LOCAL_RANK GPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CUDA was requested but no GPU is available; use --device cpu or auto.")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        index = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels once
        return torch.device("cuda", index)
    return torch.device("cpu")


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
