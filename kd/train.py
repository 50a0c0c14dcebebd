"""The one training loop, used by every phase (SSL, fine-tuning, distillation), the CLI, the app's
background jobs and torchrun alike.

AdamW (fused) with linear warm-up then cosine decay (per step), gradient clipping, channels_last on every
device (the fast layout for convolutions on CPU and GPU), bf16 autocast on CUDA (and on the CPU when asked:
`bf16`, and only where the CPU has native bf16: kd.distributed.bf16_autocast), DDP when launched by
torchrun. After each epoch the full training state is written atomically, so a killed run resumes from its
last epoch. Batch order and augmentation are drawn from (seed, phase, epoch, rank), which makes a resumed run
bit-identical on CPU.
"""
from __future__ import annotations

import math
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from kd import distributed
from kd.checkpoint import CheckpointError, load_state, save_state
from kd.config import PhaseConfig
from kd.objectives import Objective, ValContext
from kd.progress import Reporter

STATE_FILE = "state.pt"
LOGS_PER_EPOCH = 20  # progress lines per epoch; decided by step count, so every rank logs (and all-reduces) together


def warmup_cosine(warmup_steps: int, total_steps: int):
    """LR multiplier: linear warm-up to 1, then cosine to 0.

    Kept by hand, not lightly's CosineWarmupScheduler: that one refuses a warm-up longer than the phase
    (the presets' 0-epoch SSL phase has one) and ends its cosine a step earlier, which would change the
    schedule every recorded recipe trained with."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def phase_seed(*parts) -> int:
    """A seed drawn from (run seed, phase, ...) alone, so a phase draws the same numbers whether or not
    the phases before it ran in this process (what makes a resumed run bit-identical)."""
    return zlib.crc32("-".join(map(str, parts)).encode())


def _prefetch(batches):
    """Overlap reading the next batch from the memory-mapped cache with the current step."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        it = iter(batches)
        nxt = pool.submit(next, it, None)
        while True:
            item = nxt.result()
            if item is None:
                return
            nxt = pool.submit(next, it, None)
            yield item


# fused AdamW: one kernel over all parameters instead of a Python loop over them, same update rule. On this
# 2-core CPU the optimizer step is 1.76x (ResNet50) / 1.4-1.6x (ResNet18) as fast, a whole training step at
# 128 px, batch 32, bf16 only 1.02-1.04x: it matters most where steps are small (bench/fused_adamw.py)
FUSED_ADAMW = True


def fused_layouts_agree(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every parameter, its gradient and its moments share one memory layout. The fused kernel walks
    them as flat memory, so a gradient with other strides than its parameter gets the wrong update, silently
    on the CPU (pytorch/pytorch#106951); autograd gives gradients their parameter's layout, which this checks
    once per run before the first step (the loop falls back to the per-parameter update otherwise)."""
    def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:  # strides of size-1 dimensions do not matter
        return all(x == y for x, y, n in zip(a.stride(), b.stride(), a.shape) if n > 1)

    for group in optimizer.param_groups:
        for p in group["params"]:
            moments = [v for k, v in optimizer.state.get(p, {}).items() if k != "step" and torch.is_tensor(v)]
            if not all(same_layout(t, p) for t in [p.grad, *moments] if t is not None):
                return False
    return True


def fit(objective: Objective, train_set, phase: PhaseConfig, ctx: ValContext, out_dir: str | Path,
        reporter: Reporter, name: str, seed: int = 0, grad_clip: float = 1.0, resume: bool = False,
        dist: distributed.Dist = distributed.Dist(), bf16: bool = False) -> list[dict]:
    """Train `objective` on `train_set` for `phase.epochs`; returns per-epoch seconds and validation metrics."""
    device = ctx.device
    out_dir = Path(out_dir)
    state_path = out_dir / STATE_FILE
    objective.to(device).to(memory_format=torch.channels_last)
    model = objective
    if dist.enabled:
        model = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in objective.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]  # no weight decay on BatchNorm and biases
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": phase.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=phase.lr, fused=FUSED_ADAMW)
    per_rank = max(1, phase.batch_size // dist.world_size)
    sampler = DistributedSampler(range(len(train_set)), num_replicas=dist.world_size, rank=dist.rank,
                                 shuffle=True, seed=seed, drop_last=True)
    steps_per_epoch = max(1, len(sampler) // per_rank)
    total_steps = steps_per_epoch * phase.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(int(phase.warmup_epochs * steps_per_epoch), total_steps))

    start_epoch, history = 0, []
    if resume and state_path.exists():
        state = load_state(state_path, map_location=device)
        try:  # a state file of another phase or version, or one edited by hand: named, never a KeyError
            if not isinstance(state, dict) or not isinstance(state.get("epoch"), int) or \
                    not isinstance(state.get("history"), list) or len(state["history"]) != state["epoch"] + 1:
                raise ValueError("its epoch and history are missing or disagree")
            objective.load_state_dict(state["objective"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{state_path} is not a training state of the {name} phase ({why[:200]}): delete it "
                                  "to train the phase from its first epoch.") from None
        start_epoch, history = state["epoch"] + 1, state["history"]
        reporter.log("resume", phase=name, epoch=start_epoch, epochs=phase.epochs)

    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=distributed.bf16_autocast(device, bf16))
    images_per_step = per_rank * dist.world_size
    t_phase, done_steps = time.time(), 0
    for epoch in range(start_epoch, phase.epochs):
        sampler.set_epoch(epoch)
        order = np.fromiter(sampler, dtype=np.int64)
        generator = torch.Generator(device=device).manual_seed(phase_seed(seed, name, epoch, dist.rank))
        objective.train()
        batches = (train_set.batch(order[i * per_rank:(i + 1) * per_rank], device) for i in range(steps_per_epoch))
        bar = tqdm(total=steps_per_epoch, desc=f"{name} {epoch + 1}/{phase.epochs}", disable=None if dist.is_main else True)
        t_epoch, running = time.time(), []
        log_every = max(1, steps_per_epoch // LOGS_PER_EPOCH)
        for i, (images, labels, *targets) in enumerate(_prefetch(batches)):
            step = epoch * steps_per_epoch + i
            with torch.autocast(**autocast):
                loss, stats = model(images, labels, generator, *targets)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{name}: loss became {loss.item()} at epoch {epoch + 1}, step {i + 1}; "
                                         f"lower the learning rate (now {phase.lr}).")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            if done_steps == 0 and not fused_layouts_agree(optimizer):
                for group in optimizer.param_groups:
                    group["fused"] = False
            optimizer.step()
            scheduler.step()
            objective.on_step_end(step + 1, total_steps)
            running.append(loss.detach())
            done_steps += 1
            bar.update(1)
            if (i + 1) % log_every == 0 or i == steps_per_epoch - 1:
                now = time.time()
                rate = done_steps * images_per_step / (now - t_phase)
                remaining = total_steps - step - 1
                values = distributed.mean_across_ranks(
                    {"loss": torch.stack(running).mean().item(), **{k: float(v) for k, v in stats.items()}}, device)
                reporter.log("step", phase=name, epoch=epoch + 1, epochs=phase.epochs, step=i + 1,
                             steps=steps_per_epoch, global_step=step + 1, total_steps=total_steps,
                             lr=scheduler.get_last_lr()[0], images_per_s=rate,
                             eta_s=remaining * images_per_step / max(rate, 1e-9), **values)
                bar.set_postfix(loss=f"{values['loss']:.4f}")
                running = []
        bar.close()
        metrics = objective.validate(ctx) if dist.is_main else {}
        history.append({"epoch": epoch + 1, "seconds": time.time() - t_epoch, **metrics})
        if dist.is_main:
            save_state({"objective": objective.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history}, state_path)
        reporter.log("epoch", phase=name, epoch=epoch + 1, epochs=phase.epochs, metrics=metrics,
                     seconds=time.time() - t_epoch)
        distributed.barrier()
    return history
