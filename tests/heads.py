"""Tiny models with the heads the targets tests need, built by ``python:tests.heads:...``.

The factories seed their own initialisation so every process that resolves the reference (the
planner, each worker) builds the same weights without a checkpoint file; the tests add one to
carry class names as metadata.
"""

from __future__ import annotations

import torch
from torch import nn

SHAPES = ["circle", "square", "triangle", "cross", "ring"]


class _SmallNet(nn.Module):
    """Conv features -> global average pooling -> one linear layer."""

    def __init__(self, outputs: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 5, stride=4, padding=2),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(8, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def binary_net() -> nn.Module:
    """A screening model: one logit, positive means 'lesion'."""
    torch.manual_seed(0)
    return _SmallNet(1)


def multilabel_net() -> nn.Module:
    """Five independent sigmoid outputs; the bias spreads their probabilities around 0.5."""
    torch.manual_seed(1)
    model = _SmallNet(len(SHAPES))
    with torch.no_grad():
        model.head.weight.mul_(20)
        model.head.bias.copy_(torch.linspace(-1.0, 1.0, len(SHAPES)))
    return model


def mean_logit(output: torch.Tensor) -> torch.Tensor:
    """A custom scalar target: the mean of the logits, one score per image."""
    return output.mean(dim=1)
