"""Batched, tensor-only augmentation for X-rays (runs wherever the batch is: CPU or GPU).

One random affine per image (crop scale, aspect, small rotation and translation) applied with
`affine_grid` + `grid_sample`, then gamma, brightness/contrast, blur and noise. No flips (the heart is
on the left) and no hue/saturation (grayscale). Randomness comes from an explicit generator, so an
epoch is reproducible from (seed, epoch): that is what makes kill-and-resume give identical weights.
The levers are `kd.config.AugmentConfig`; their effect on the official test split is in bench/recipes.md.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kd.config import AugmentConfig
from kd.preprocess import standardize


@dataclass(frozen=True)
class Augment:
    scale: tuple[float, float] = (0.7, 1.0)  # fraction of the image area kept by the crop (> 1: zoom out)
    rotation: float = 10.0  # degrees, +-
    translate: float = 0.06  # fraction of the image, +-
    brightness: float = 0.2  # additive, +-
    contrast_jitter: float = 0.2  # multiplicative, 1 +- (not Config.contrast, the preprocessing's normalisation)
    aspect: float = 0.0  # +- log aspect ratio
    gamma: float = 0.0  # +- log gamma
    blur: float = 0.0  # max Gaussian sigma (output pixels)
    noise: float = 0.0  # max additive noise std ([0, 1] pixel units)
    outside_lungs: float = 0.0  # share of images blurred outside their lung fields (kd.config.AugmentConfig)

    @classmethod
    def from_config(cls, cfg: AugmentConfig) -> "Augment":
        fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("scale_min", "scale_max")}
        return cls(scale=(cfg.scale_min, cfg.scale_max), **fields)

    def __call__(self, images: torch.Tensor, out_size: int, generator: torch.Generator, lungs: bool = False):
        """uint8 [B, H, W] -> normalised float [B, 1, out, out]; with `lungs`, also the images' lung fields
        (kd.lungs) moved by the same crop, turn and shift, [B, 1, out, out] in [0, 1] (no extra random draw: the
        view is the same either way)."""
        b, dev = images.shape[0], images.device

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(b, generator=generator, device=dev)

        side = uniform(*self.scale).sqrt()
        angle = uniform(-self.rotation, self.rotation) * math.pi / 180
        shift = (1 - side).abs().unsqueeze(1) * (2 * torch.rand(b, 2, generator=generator, device=dev) - 1)
        shift = shift + uniform(-self.translate, self.translate).unsqueeze(1) * 2
        stretch = uniform(-self.aspect, self.aspect).exp().sqrt() if self.aspect else torch.ones(b, device=dev)
        sx, sy = side * stretch, side / stretch
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([torch.stack([cos * sx, -sin * sy, shift[:, 0]], 1),
                             torch.stack([sin * sx, cos * sy, shift[:, 1]], 1)], 1)
        x = images.unsqueeze(1).float() / 255
        if self.outside_lungs:
            x = blur_outside_lungs(images, x, torch.rand(b, generator=generator, device=dev) < self.outside_lungs)
        grid = F.affine_grid(theta, [b, 1, out_size, out_size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        lung_view = F.grid_sample(lung_masks(images, x.dtype), grid, mode="bilinear", padding_mode="zeros",
                                  align_corners=False) if lungs else None
        if self.gamma:
            x = x.clamp_min(1e-6) ** uniform(-self.gamma, self.gamma).exp().view(b, 1, 1, 1)
        c = uniform(1 - self.contrast_jitter, 1 + self.contrast_jitter).view(b, 1, 1, 1)
        mean = x.mean(dim=(2, 3), keepdim=True)
        x = ((x - mean) * c + mean + uniform(-self.brightness, self.brightness).view(b, 1, 1, 1)).clamp(0, 1)
        if self.blur:
            x = gaussian_blur(x, uniform(0, self.blur), self.blur)
        if self.noise:
            std = uniform(0, self.noise).view(b, 1, 1, 1)
            x = (x + std * torch.randn(x.shape, generator=generator, device=dev)).clamp(0, 1)
        return (standardize(x), lung_view) if lungs else standardize(x)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Blur each image of [B, 1, H, W] with its own sigma (a separable kernel per image; sigma 0 = unchanged)."""
    b = x.shape[0]
    radius = max(1, math.ceil(3 * max_sigma))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigma.clamp_min(1e-3).view(b, 1)
    k = torch.exp(-0.5 * (t.view(1, -1) / s) ** 2)
    k = k / k.sum(1, keepdim=True)  # [B, K]
    y = x.transpose(0, 1)  # [1, B, H, W]: one group per image
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k.view(b, 1, 1, -1), groups=b)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k.view(b, 1, -1, 1), groups=b)
    return y.transpose(0, 1)


def lung_masks(images: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """kd.lungs.lung_mask of each uint8 [H, W] image, as [B, 1, H, W] of 0 / 1."""
    from kd.lungs import lung_mask

    h, w = images.shape[-2:]
    masks = torch.stack([torch.from_numpy(lung_mask(img.cpu().numpy())) for img in images])
    masks = masks.unsqueeze(1).to(images.device, dtype)
    return masks if masks.shape[-2:] == (h, w) else F.interpolate(masks, size=(h, w), mode="bilinear",
                                                                  align_corners=False)


def blur_outside_lungs(images: torch.Tensor, x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """x [B, 1, H, W] with the chosen images' pixels outside their lung fields (kd.lungs.lung_mask, from the
    uint8 `images`) replaced by a Gaussian blur of sigma H/24; the mask's edge is softened over H/64, so the
    seam is not itself a sharp edge to learn."""
    if not bool(chosen.any()):
        return x
    idx = torch.nonzero(chosen).flatten()
    h = x.shape[-2]
    m = lung_masks(images[idx]).to(x.device)
    m = gaussian_blur(m, torch.full((len(idx),), h / 64, device=x.device), h / 64).clamp(0, 1)
    sigma = h / 24
    blurred = gaussian_blur(x[idx], torch.full((len(idx),), sigma, device=x.device), sigma)
    x = x.clone()
    x[idx] = x[idx] * m + blurred * (1 - m)
    return x


SUPERVISED = Augment()
SSL = Augment(scale=(0.25, 1.0), rotation=15.0, translate=0.08, brightness=0.4, contrast_jitter=0.4)


def _resized(images: torch.Tensor, out_size: int) -> torch.Tensor:
    """uint8 [B, H, W] -> [B, 1, out, out] in [0, 1], antialiased: what every evaluation view starts from."""
    x = images.unsqueeze(1).float() / 255
    if x.shape[-2:] != (out_size, out_size):
        x = F.interpolate(x, size=(out_size, out_size), mode="bilinear", antialias=True, align_corners=False)
    return x


def center(images: torch.Tensor, out_size: int) -> torch.Tensor:
    """Evaluation view: the whole image at out_size, normalised (no randomness)."""
    return standardize(_resized(images, out_size))


# Test-time views (area scale, horizontal and vertical shift as a share of the image): the whole image, a closer
# and a wider framing, and four small shifts, all inside the training augmentation's range (kd.config.AugmentConfig:
# crop 0.5-1.1, shift +-0.06). Their mean logit is a prediction that depends less on how the child was framed.
TTA_VIEWS = ((1.0, 0.0, 0.0), (0.8, 0.0, 0.0), (1.1, 0.0, 0.0),
             (1.0, 0.04, 0.0), (1.0, -0.04, 0.0), (1.0, 0.0, 0.04), (1.0, 0.0, -0.04))


def fixed_view(images: torch.Tensor, out_size: int, scale: float, dx: float, dy: float) -> torch.Tensor:
    """uint8 [B, H, W] -> normalised [B, 1, out, out]: the crop of `scale` of the area (> 1: zoomed out into a black
    border) shifted by (dx, dy) of the image, as Augment draws it, without randomness. The whole image (1, 0, 0) is
    `center`."""
    if (scale, dx, dy) == (1.0, 0.0, 0.0):
        return center(images, out_size)
    b, side = images.shape[0], math.sqrt(scale)
    theta = torch.tensor([[side, 0.0, 2 * dx], [0.0, side, 2 * dy]], device=images.device).expand(b, 2, 3)
    grid = F.affine_grid(theta, [b, 1, out_size, out_size], align_corners=False)
    return standardize(F.grid_sample(_resized(images, out_size), grid, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))
