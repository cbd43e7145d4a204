"""Architecture of the demo CNN.

The trunk keeps a 16x16 feature map at 128x128 input (three stride-2 steps) so CAMs are sharp
enough to point inside objects; a global-average-pool + linear head makes the plain CAM exact
(class score = mean of the CAM over positions, plus the bias), which is what CAM methods assume.
"""

from __future__ import annotations

import torch
from torch import nn

# (out_channels, stride) per conv-bn-relu block; the input has 3 channels.
TRUNK: tuple[tuple[int, int], ...] = (
    (16, 2),
    (32, 2),
    (48, 1),
    (64, 2),
    (96, 1),
    (96, 1),
)
CAM_LAYER = "features"


def _block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DemoNet(nn.Module):
    """Small conv trunk in ``features``, then ``pool`` and ``fc``."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        blocks = []
        in_channels = 3
        for out_channels, stride in TRUNK:
            blocks.append(_block(in_channels, out_channels, stride))
            in_channels = out_channels
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))
