"""A differentiable Grad-CAM's mass outside the lung fields less its mass inside: a penalty that trains the map.

Ross et al., "Right for the Right Reasons: Training Differentiable Models by Constraining their Explanations"
(IJCAI 2017), arXiv:1703.03717, penalise input gradients where an expert mask says no evidence lies; Li et al.,
"Tell Me Where to Look: Guided Attention Inference Network" (CVPR 2018), arXiv:1802.10171, train the Grad-CAM
map directly. This is the second, on the map the app shows (Grad-CAM of the PNEUMONIA logit on one stage) and
with kd.lungs' estimated lung fields as the mask: Grad-CAM's channel weights are the score's gradient at the
stage, kept in the graph (`create_graph`), so the penalty's own gradient reaches every layer up to that stage.
"""
import torch
import torch.nn.functional as F


def outside_lung_balance(score: torch.Tensor, activations: torch.Tensor, lungs: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of (sum of cam outside the lungs - sum of cam inside) / sum |cam|, in [-1, 1], for the
    signed map cam = sum_k mean_ij(d score / d A_k) A_k (Grad-CAM draws relu(cam)).

    score: [B], one scalar per image, computed from `activations` [B, K, h, w] (a stage's output); lungs:
    [B, 1, H, W] in [0, 1], the lung fields in the view the model saw (averaged down to the map's grid).
    -1: positive on the lungs and negative elsewhere (drawn on the lungs only). Two earlier forms were met
    without a map on the lungs: the share of relu(cam) outside, by drawing nothing; relu(cam)'s outside minus
    inside, by the same empty map, where relu gives no gradient (a fresh student's map in evaluation mode is
    empty from the start). On the signed map every pixel inside the lungs is pushed up, so an empty drawing
    scores only the outside's area share less the inside's and still has a gradient towards the lungs."""
    (grads,) = torch.autograd.grad(score.sum(), activations, create_graph=True)
    cam = (grads.mean((2, 3), keepdim=True) * activations).sum(1, keepdim=True).float()
    inside = F.adaptive_avg_pool2d(lungs.float(), cam.shape[-2:])
    balance = (cam * (1 - inside)).sum((1, 2, 3)) - (cam * inside).sum((1, 2, 3))
    return (balance / cam.abs().sum((1, 2, 3)).clamp_min(1e-8)).mean()
