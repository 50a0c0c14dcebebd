"""Knowledge distillation loss of Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
Network" (2015), arXiv:1503.02531.

The student matches the teacher's class distribution softened by a temperature T > 1. Gradients of
the soft term scale as 1/T^2, so it is multiplied by T^2 to keep its weight comparable to the hard
label term when T changes.

Images without a label (label -1: the unlabeled transfer set of Chen et al. 2020, "Big Self-Supervised Models
are Strong Semi-Supervised Learners", SimCLRv2) contribute the soft term only; the label term averages over
the labelled images of the batch, and is 0 for a batch with none.
"""
import torch
import torch.nn.functional as F
from torch import nn


class DistillKL(nn.Module):
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch."""

    def __init__(self, temperature: float = 4.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        log_p_student = F.log_softmax(student_logits / t, dim=1)
        p_teacher = F.softmax(teacher_logits / t, dim=1)
        return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * t * t


def distillation_loss(student_logits, teacher_logits, labels, temperature: float, alpha: float,
                      class_weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> torch.Tensor:
    """alpha * CE(labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T); CE over the labels >= 0 only."""
    labelled = labels >= 0
    if labelled.all():
        ce = F.cross_entropy(student_logits, labels, weight=class_weight, label_smoothing=label_smoothing)
    elif labelled.any():
        ce = F.cross_entropy(student_logits[labelled], labels[labelled], weight=class_weight,
                             label_smoothing=label_smoothing)
    else:
        ce = student_logits.sum() * 0.0  # keeps the graph (DDP) without a label term
    return alpha * ce + (1 - alpha) * DistillKL(temperature)(student_logits, teacher_logits.detach())
