"""A multi-view demo model: the demo CNN's trunk on every view, one linear head over them all.

It takes a case as ``[B, V, 3, H, W]``, runs ``features`` on every view (the views folded into
the batch, which is where the CAM engine hooks), average-pools each view, concatenates the V
pooled vectors and applies one linear head: the structure of screening models that see several
views of a case at once. :func:`write_checkpoint` builds its weights from the shipped demo CNN
without training: the head is the demo head divided by V for every view, so the case's logits
are the mean of the views' demo logits and each view's CAM is the demo CAM of that view.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from workers.demo.net import DemoNet

__all__ = ["MultiViewNet", "build", "write_checkpoint"]


class MultiViewNet(nn.Module):
    def __init__(self, num_classes: int = 5, views: int = 2) -> None:
        super().__init__()
        trunk = DemoNet(num_classes)
        self.views = views
        self.features = trunk.features
        self.fc = nn.Linear(trunk.fc.in_features * views, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != self.views:
            raise ValueError(f"expected [B, {self.views}, 3, H, W], got {tuple(x.shape)}")
        b, v = x.shape[:2]
        pooled = self.features(x.reshape(b * v, *x.shape[2:])).mean(dim=(2, 3))
        return self.fc(pooled.reshape(b, -1))


def build(num_classes: int = 5, views: int = 2) -> MultiViewNet:
    return MultiViewNet(num_classes, views)


def write_checkpoint(out: Path, views: int = 2) -> Path:
    """A checkpoint camaudit loads with ``python:workers.demo.multiview:build`` (about 0.75 MB)."""
    from workers.models import DEMO_CHECKPOINT

    demo = torch.load(DEMO_CHECKPOINT, map_location="cpu", weights_only=True)
    state = dict(demo["state_dict"])
    weight, bias = state.pop("fc.weight"), state.pop("fc.bias")
    state["fc.weight"] = torch.cat([weight / views] * views, dim=1)
    state["fc.bias"] = bias.clone()
    meta = {k: demo[k] for k in ("class_names", "input_size", "mean", "std")}
    torch.save({"state_dict": state, **meta}, out)
    return out
