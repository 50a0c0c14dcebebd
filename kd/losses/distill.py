"""Knowledge distillation loss of Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
Network" (2015), arXiv:1503.02531.

The student matches the teacher's class distribution softened by a temperature T > 1. Gradients of
the soft term scale as 1/T^2, so it is multiplied by T^2 to keep its weight comparable to the hard
label term when T changes.
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
    """alpha * CE(labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T)."""
    ce = F.cross_entropy(student_logits, labels, weight=class_weight, label_smoothing=label_smoothing)
    return alpha * ce + (1 - alpha) * DistillKL(temperature)(student_logits, teacher_logits.detach())
