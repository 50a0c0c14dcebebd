"""How far the score moves when everything outside the lung fields is blurred away: a penalty on needing it.

Occlusion (kd.cam.Occlusion, Zeiler & Fergus 2014) and ROAD (Rong et al. 2022) call a region evidence when
replacing it with a blurred copy lowers the score; measured so, the shipped models' evidence lies on the lung
fields no more than evenly (README "Which heat map"). kd.losses.lung_gradient moved where the score is sensitive
to small changes and left occlusion's map where it was. This term constrains what occlusion measures: the served
score of a view and of the same view with its outside-lung pixels replaced by the blurred fill must agree, so
the score cannot rest on the shoulders, the mediastinum or a film marker (background reliance as measured by
Xiao et al. 2021, "Noise or Signal: The Role of Image Backgrounds in Object Recognition", ICLR; trained away as a
consistency term, as in Xie et al. 2020, "Unsupervised Data Augmentation for Consistency Training").
Measured on a distillation probe (README "Which heat map", the fourth lever) the term was met and the student's
evidence moved further off the lungs, at a lower validation AUC: it stays off.
"""
from typing import Callable

import torch


def outside_lung_reliance(score: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, lungs: torch.Tensor,
                          fill: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of (score(x) - score(x inside the lungs, `fill` outside))^2, over the variance of
    score(x) across the batch.

    score: the model's scalar per image, [B'] from [B', C, H, W] (called once, on both views stacked); x: the view
    [B, C, H, W], B >= 2; lungs: [B, 1, H, W] in [0, 1], the lung fields in that view; fill: what the outside shows
    instead (occlusion's blurred copy). A ratio, as kd.losses.lung_gradient's: the plain mean square was met at
    once by a score that no longer told the images apart (validation AUC 0.48 after two epochs of a probe), and a
    score scaled down or made constant does not meet this one. Both views carry the gradient: the term is met by a
    score that reads only the lungs."""
    kept = x * lungs + fill * (1 - lungs)
    full, lungs_only = score(torch.cat([x, kept])).float().chunk(2)
    return (full - lungs_only).pow(2).mean() / full.var(unbiased=False).clamp_min(1e-6)
