"""The training loop's optimizer: fused AdamW gives the per-parameter AdamW's weights, and the loop falls back
to the per-parameter update when a gradient's memory layout differs from its parameter's."""
import copy

import numpy as np
import torch

import kd.train
from kd.cache import ImageSet
from kd.config import PhaseConfig
from kd.models import build_student
from kd.objectives import SupervisedObjective, ValContext, class_weights
from kd.progress import Reporter


def _train(tmp_path, name: str, fused: bool, monkeypatch) -> dict:
    """One optimizer step of the loop (8 images, batch 8): later steps would differ by more than rounding,
    as Adam divides by the gradient's own size and turns rounding-level gradient differences into steps."""
    monkeypatch.setattr(kd.train, "FUSED_ADAMW", fused)
    rng = np.random.default_rng(0)
    images = ImageSet(rng.integers(0, 255, (8, 32, 32), dtype=np.uint8), np.arange(8) % 2, np.arange(8))
    torch.manual_seed(0)
    obj = SupervisedObjective(build_student(), "student", 32, class_weights(images.class_counts()))
    phase = PhaseConfig(epochs=1, image_size=32, batch_size=8, lr=1e-3, weight_decay=1e-4, warmup_epochs=0)
    kd.train.fit(obj, images, phase, ValContext(None, images, torch.device("cpu")), tmp_path / name,
                 Reporter(tmp_path / name), "finetune")  # the phase name seeds the augmentation: one for both
    return {k: v.detach().clone() for k, v in obj.student.named_parameters()}


def test_fused_adamw_trains_to_the_per_parameter_weights(tmp_path, monkeypatch):
    fused = _train(tmp_path, "fused", True, monkeypatch)
    loop = _train(tmp_path, "loop", False, monkeypatch)
    start = dict(build_student().named_parameters())
    assert not torch.equal(fused["fc.weight"], start["fc.weight"])  # it trained
    worst = max(float((fused[k] - loop[k]).abs().max()) for k in fused)
    assert worst < 1e-6, f"fused and per-parameter AdamW differ by {worst}"


def test_a_gradient_laid_out_unlike_its_parameter_turns_fused_off():
    model = build_student().to(memory_format=torch.channels_last)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
    for p in params:
        p.grad = torch.empty_like(p).copy_(torch.ones(p.shape))  # the parameter's own layout, as autograd makes
    assert kd.train.fused_layouts_agree(optimizer)
    weight = model.layer1[0].conv2.weight  # 64 x 64 x 3 x 3, channels_last
    weight.grad = torch.ones(weight.shape)  # contiguous
    assert not kd.train.fused_layouts_agree(optimizer)
    # and the difference matters: the fused kernel silently updates the wrong elements
    grad = torch.randn(weight.shape)
    updates = []
    for fused in (True, False):
        w = torch.nn.Parameter(copy.deepcopy(weight.detach()))
        assert w.stride() == weight.stride()
        w.grad = grad.clone()
        torch.optim.AdamW([w], lr=1e-2, fused=fused).step()
        updates.append(w.detach())
    assert not torch.allclose(updates[0], updates[1], atol=1e-4)
