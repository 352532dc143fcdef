"""The small ConvNet of the dataset-distillation literature, sized for CPU runs.

depth x [conv3x3(width) -> instance norm -> ReLU -> avgpool2], flattened. Instance norm (a
GroupNorm with one channel per group) keeps it free of running statistics, so a functional
forward with substituted parameters is exact.
"""

from __future__ import annotations

import torch
from torch import nn


class ConvNet(nn.Module):
    def __init__(self, image_size: int = 32, width: int = 64, depth: int = 3, in_channels: int = 3):
        super().__init__()
        if image_size % (2**depth) != 0:
            raise ValueError(f"image_size {image_size} must be divisible by 2**depth = {2**depth}")
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(depth):
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, padding=1),
                nn.GroupNorm(width, width, affine=True),
                nn.ReLU(inplace=False),
                nn.AvgPool2d(kernel_size=2, stride=2),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        side = image_size // (2**depth)
        self.num_features = width * side * side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)
