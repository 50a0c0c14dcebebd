"""The share of the score's input-gradient energy outside the lung fields: a penalty on where the evidence lies.

Ross et al., "Right for the Right Reasons: Training Differentiable Models by Constraining their Explanations"
(IJCAI 2017), arXiv:1703.03717: penalise the input gradient where an expert mask says no evidence lies, so the
model's decision stops depending on those pixels. kd.losses.lung_cam trains the heat map instead, and was met
by a map drawn on the lungs while the score's evidence stayed outside them (ROAD fell below zero, README "Which
heat map"); this term constrains what the score is sensitive to, which is what a faithful map then shows.
"""
import torch


def outside_lung_gradient_share(score: torch.Tensor, x: torch.Tensor, lungs: torch.Tensor,
                                create_graph: bool = True) -> torch.Tensor:
    """Mean over the batch of sum((d score / d x)^2 outside the lungs) / sum((d score / d x)^2), in [0, 1].

    score: [B], one scalar per image, computed from the input `x` [B, C, H, W] (which must require grad);
    lungs: [B, 1, H, W] in [0, 1], the lung fields in the view the model saw. The gradient is kept in the graph
    (`create_graph`), so the term's own gradient trains every layer; a measurement passes create_graph=False. A
    ratio, not Ross et al.'s absolute sum: it does not fall by scaling the score down, only by moving the score's
    sensitivity onto the lungs."""
    (grads,) = torch.autograd.grad(score.sum(), x, create_graph=create_graph)
    energy = grads.float().pow(2).sum(1, keepdim=True)
    outside = (energy * (1 - lungs.float())).sum((1, 2, 3))
    return (outside / energy.sum((1, 2, 3)).clamp_min(1e-20)).mean()
