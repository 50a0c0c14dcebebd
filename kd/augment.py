"""Batched, tensor-only augmentation for X-rays (runs wherever the batch is: CPU or GPU).

One random affine per image (crop scale, small rotation and translation) applied with
`affine_grid` + `grid_sample`, then brightness/contrast jitter. No flips (the heart is on the left)
and no hue/saturation (grayscale). Randomness comes from an explicit generator, so an epoch is
reproducible from (seed, epoch): that is what makes kill-and-resume give identical weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kd.preprocess import MEAN, STD


@dataclass(frozen=True)
class Augment:
    scale: tuple[float, float] = (0.7, 1.0)  # fraction of the image area kept by the crop
    rotation: float = 10.0  # degrees, +-
    translate: float = 0.06  # fraction of the image, +-
    brightness: float = 0.2  # additive, +-
    contrast: float = 0.2  # multiplicative, 1 +-

    def __call__(self, images: torch.Tensor, out_size: int, generator: torch.Generator) -> torch.Tensor:
        """uint8 [B, H, W] -> normalised float [B, 1, out, out]."""
        b, dev = images.shape[0], images.device

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(b, generator=generator, device=dev)

        side = uniform(*self.scale).sqrt()
        angle = uniform(-self.rotation, self.rotation) * math.pi / 180
        shift = (1 - side).unsqueeze(1) * (2 * torch.rand(b, 2, generator=generator, device=dev) - 1)
        shift = shift + uniform(-self.translate, self.translate).unsqueeze(1) * 2
        cos, sin = torch.cos(angle) * side, torch.sin(angle) * side
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        x = images.unsqueeze(1).float() / 255
        grid = F.affine_grid(theta, [b, 1, out_size, out_size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        c = uniform(1 - self.contrast, 1 + self.contrast).view(b, 1, 1, 1)
        mean = x.mean(dim=(2, 3), keepdim=True)
        x = ((x - mean) * c + mean + uniform(-self.brightness, self.brightness).view(b, 1, 1, 1)).clamp(0, 1)
        return (x - MEAN) / STD


SUPERVISED = Augment()
SSL = Augment(scale=(0.25, 1.0), rotation=15.0, translate=0.08, brightness=0.4, contrast=0.4)


def center(images: torch.Tensor, out_size: int) -> torch.Tensor:
    """Evaluation view: the whole image at out_size, normalised (no randomness)."""
    x = images.unsqueeze(1).float() / 255
    if x.shape[-1] != out_size:
        x = F.interpolate(x, size=(out_size, out_size), mode="bilinear", antialias=True, align_corners=False)
    return (x - MEAN) / STD
