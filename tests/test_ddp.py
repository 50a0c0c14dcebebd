"""The training loop under DDP: two gloo processes on CPU end with identical parameters."""
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from kd.cache import ImageSet
from kd.config import PhaseConfig
from kd.distributed import Dist, setup
from kd.models import build_student
from kd.objectives import SupervisedObjective, ValContext, class_weights
from kd.progress import Reporter
from kd.train import fit


def _worker(rank: int, world: int, port: int, out: str):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist = setup(torch.device("cpu"))
    assert dist == Dist(rank, world, rank)
    rng = np.random.default_rng(0)
    images = ImageSet(rng.integers(0, 255, (32, 32, 32), dtype=np.uint8), np.arange(32) % 2, np.arange(32))
    torch.manual_seed(rank)  # different init per rank: DDP must broadcast rank 0's
    obj = SupervisedObjective(build_student(), "student", 32, class_weights(images.class_counts()))
    phase = PhaseConfig(epochs=1, image_size=32, batch_size=8, lr=1e-3, warmup_epochs=0)
    fit(obj, images, phase, ValContext(None, images, torch.device("cpu")), f"{out}/run", Reporter(out, rank == 0),
        "ddp", dist=dist)
    # parameters, not BatchNorm running statistics: those see each rank's own batches (rank 0 saves its own)
    torch.save({k: v.detach().clone() for k, v in obj.student.named_parameters()}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_gloo_ranks_stay_in_sync(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    fresh = dict(build_student().named_parameters())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["fc.weight"], fresh["fc.weight"])  # it trained
    assert (tmp_path / "run" / "state.pt").exists()
    assert not (tmp_path / "rank1" / "progress.jsonl").exists()
