"""The teacher (ResNet50) and student (ResNet18): torchvision models, random init, one grayscale channel.

X-rays are grayscale, so the stem takes one channel; a 3-channel init file (ImageNet, SwAV) is
adapted by summing its first convolution over the colour channels, which gives the same response
to a gray image.
"""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from kd.checkpoint import load_any_state_dict

ARCHITECTURES = {"teacher": "resnet50", "student": "resnet18"}
NUM_CLASSES = 2  # logits for NORMAL, PNEUMONIA


def build(arch: str) -> nn.Module:
    """A torchvision ResNet with a 1-channel stem and a 2-way head; only the architectures the product trains (a
    model card names one, and must not make this call whatever torchvision attribute it likes)."""
    if arch not in set(ARCHITECTURES.values()):
        raise ValueError(f"unknown architecture {arch!r}: the models are {', '.join(sorted(set(ARCHITECTURES.values())))}")
    model = getattr(torchvision.models, arch)(weights=None, num_classes=NUM_CLASSES)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


def build_teacher() -> nn.Module:
    return build(ARCHITECTURES["teacher"])


def build_student() -> nn.Module:
    return build(ARCHITECTURES["student"])


def embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled penultimate features (2048-d for ResNet50, 512-d for ResNet18)."""
    return torch.flatten(model.avgpool(feature_map(model, x)), 1)


STAGES = ("layer1", "layer2", "layer3", "layer4")


def feature_map(model: nn.Module, x: torch.Tensor, stage: str = "layer4") -> torch.Tensor:
    """A ResNet stage's output feature map; layer4's is what Grad-CAM looks at and a feature hint matches."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    for name in STAGES[:STAGES.index(stage) + 1]:
        x = getattr(model, name)(x)
    return x


def feature_dim(model: nn.Module) -> int:
    return model.fc.in_features


def init_from_file(model: nn.Module, path: str) -> list[str]:
    """Load matching tensors from a local weights file; returns the names loaded."""
    state = load_any_state_dict(path)
    conv = state.get("conv1.weight")
    if conv is not None and conv.ndim == 4 and conv.shape[1] == 3:
        state["conv1.weight"] = conv.sum(dim=1, keepdim=True)
    return copy_matching(state, model)


def copy_matching(source: dict[str, torch.Tensor] | nn.Module, target: nn.Module) -> list[str]:
    """Copy every tensor whose name and shape match (the head and mismatched blocks are skipped)."""
    src = source.state_dict() if isinstance(source, nn.Module) else source
    dst = target.state_dict()
    copied = [k for k, v in src.items() if k in dst and dst[k].shape == v.shape]
    target.load_state_dict({k: src[k] for k in copied}, strict=False)
    return copied


def seed_student_from_teacher(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Initialise the student from the teacher's weights where shapes match (the stem: conv1, bn1)."""
    stem = {k: v for k, v in teacher.state_dict().items() if k.startswith(("conv1.", "bn1."))}
    return copy_matching(stem, student)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
