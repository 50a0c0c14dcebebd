"""Distillation losses, one per file. SSL objectives come from lightly (`lightly.loss`)."""
from kd.losses.distill import DistillKL, distillation_loss
from kd.losses.hint import HintLoss

__all__ = ["DistillKL", "distillation_loss", "HintLoss"]
