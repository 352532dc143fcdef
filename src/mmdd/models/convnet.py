"""The small ConvNet of the dataset-distillation literature, sized for CPU runs.

depth x [conv3x3(width) -> instance norm -> ReLU -> avgpool2], flattened. Instance norm (a
GroupNorm with one channel per group) keeps it free of running statistics, so a functional
forward with substituted parameters is exact.

The flattened map grows with the square of the resolution (at 224 px, depth 3, width 32: 25,088 features, and
a text head of 639M parameters to match them), so a last map larger than `feature_side` x `feature_side` is
average-pooled down to it: width x feature_side^2 features at any resolution (at 32 px, depth 3 the map is
already 4 x 4 and nothing changes).
"""

from __future__ import annotations

import torch
from torch import nn


class ConvNet(nn.Module):
    def __init__(self, image_size: int = 32, width: int = 64, depth: int = 3, in_channels: int = 3,
                 feature_side: int | None = 4):
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
        if feature_side is not None and feature_side < 1:
            raise ValueError(f"feature_side must be >= 1 or null, got {feature_side}")
        # No parameters, so not part of the state dict: stores and checkpoints keep their names.
        self.pool = nn.AdaptiveAvgPool2d(feature_side) if feature_side and side > feature_side else nn.Identity()
        side = min(side, feature_side) if feature_side else side
        self.num_features = width * side * side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)
