"""Distillation losses, one per file. SSL objectives come from lightly (`lightly.loss`)."""
from kd.losses.distill import DistillKL, distillation_loss
from kd.losses.hint import HintLoss
from kd.losses.lung_cam import outside_lung_balance
from kd.losses.lung_gradient import outside_lung_gradient_share
from kd.losses.outside_reliance import outside_lung_reliance

__all__ = ["DistillKL", "distillation_loss", "HintLoss", "outside_lung_balance", "outside_lung_gradient_share",
           "outside_lung_reliance"]
