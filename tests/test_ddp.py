"""The training loop and the whole pipeline under DDP: two gloo processes on CPU, as torchrun starts them."""
import json
import os
import time

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


def _join_rank(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)


def _worker(rank: int, world: int, port: int, out: str, skew_clock: bool = False):
    _join_rank(rank, world, port)
    if skew_clock and rank == 1:  # this rank's clock runs 1000x fast: logging must not depend on clocks
        import kd.train

        real = time.time
        kd.train.time = type("SkewedTime", (), {"time": staticmethod(lambda: 1000 * real())})
    dist = setup(torch.device("cpu"))
    assert dist == Dist(rank, world)
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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, args, timeout: float) -> None:
    """Start two ranks and wait for both; a hang (a collective one rank never reaches) fails the test."""
    ctx = mp.start_processes(fn, args=args, nprocs=2, join=False, start_method="spawn")
    deadline = time.time() + timeout
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the ranks did not finish within {timeout:.0f} s (deadlock?)")


def _loop_then_pipeline(rank: int, world: int, ports: tuple[int, int], out: str, data: str):
    """One spawn for both checks (each costs two fresh processes): the training loop with rank 1's clock
    running 1000x fast, then the whole pipeline, still with that clock, in a new process group."""
    from kd.config import preset
    from kd.pipeline import run

    _worker(rank, world, ports[0], out, skew_clock=True)
    _join_rank(rank, world, ports[1])
    cfg = preset("tiny")
    cfg.data, cfg.out, cfg.device = data, f"{out}/pipeline", "cpu"
    run(cfg, progress=False)


@pytest.mark.slow(13)  # seconds on an idle machine, alone
def test_two_gloo_ranks_stay_in_sync_and_run_the_whole_pipeline(tmp_path):
    """As torchrun --nproc_per_node 2 starts them. The loop: logging follows steps, not clocks, so no rank
    waits at a collective the other never reaches, and DDP keeps both ranks' parameters equal. The pipeline
    (`kd pipeline` under torchrun): SSL, fine-tuning, distillation, the labels-only student, and the export
    that rank 0 does alone (it must not wait at a barrier the other rank never reaches)."""
    from tests.fixtures.xray_fixtures import write_kermany_dataset

    data = write_kermany_dataset(tmp_path / "data", n_per_class=(8, 8), size=40, splits=("train", "test"))
    _spawn(_loop_then_pipeline, (2, (_free_port(), _free_port()), str(tmp_path), str(data)), timeout=600)

    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    fresh = dict(build_student().named_parameters())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["fc.weight"], fresh["fc.weight"])  # it trained
    assert (tmp_path / "run" / "state.pt").exists()
    steps = [json.loads(x) for x in (tmp_path / "progress.jsonl").read_text().splitlines()]
    assert sum(e["kind"] == "step" for e in steps) >= 1  # rank 0 alone writes progress, averaged over ranks

    out = tmp_path / "pipeline"
    for phase in ("pretrain", "finetune", "distill", "baseline"):
        assert (out / phase / "done.json").exists(), phase
    card = json.loads((out / "model_card.json").read_text())
    assert {"teacher", "student", "student_baseline"} <= set(card["models"])
    assert card["models"]["student"]["test"]["n"] == 16
    assert json.loads((out / "status.json").read_text())["state"] == "finished"
