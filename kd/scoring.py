"""Scoring a whole image set with one model: what validation during training, the export and `kd evaluate`
share. Apart from kd.serving (single uploads, the refusal check), so training imports nothing app-side."""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from kd.augment import center, fixed_view
from kd.cache import ImageSet


@torch.inference_mode()
def predict_logits(model: nn.Module, images: ImageSet, size: int, device: torch.device,
                   batch_size: int = 64, progress=None, lock=None, views=None) -> np.ndarray:
    """Logits [N, 2] of the whole-image view at `size`; `progress(done, total)` is called per batch; `lock`
    (a model shared with the app's sessions: kd.serving.LoadedModel.lock) is held for each batch's pass. `views`
    (kd.augment.TTA_VIEWS): the mean logit over those fixed views instead (test-time augmentation)."""
    was_training = model.training
    model.eval()
    out = []
    n = len(images)
    for start in tqdm(range(0, n, batch_size), desc="predict", leave=False, disable=None):
        x, *_ = images.batch(np.arange(start, min(start + batch_size, n)), device)
        batch = [center(x, size)] if views is None else [fixed_view(x, size, *v) for v in views]
        with lock or contextlib.nullcontext(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                             enabled=device.type == "cuda"):
            out.append(torch.stack([model(v.contiguous(memory_format=torch.channels_last)).float().cpu()
                                    for v in batch]).mean(0))
        if progress:
            progress(min(start + batch_size, n), n)
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, 2), dtype=np.float32)
