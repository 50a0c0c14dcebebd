"""Feature hint of Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015), arXiv:1412.6550.

The student's layer4 map (512 channels for ResNet18) goes through a learned 1x1 convolution to the
teacher's width (2048 for ResNet50) and is pulled towards the teacher's map by mean squared error.
"""
import torch
import torch.nn.functional as F
from torch import nn


class HintLoss(nn.Module):
    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        self.adapter = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False)

    def forward(self, student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
        student_map = self.adapter(student_map)
        if student_map.shape[-2:] != teacher_map.shape[-2:]:
            student_map = F.adaptive_avg_pool2d(student_map, teacher_map.shape[-2:])
        return F.mse_loss(student_map, teacher_map.detach())
