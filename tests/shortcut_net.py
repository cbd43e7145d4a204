"""A tiny CNN that learns a planted shortcut in seconds, for the audit that must catch it.

Global max pooling lets one strongly activated cell (the mark) decide a class, which is what
makes a shortcut quick to learn; ``features`` is the CAM layer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from workers.synth import CLASS_NAMES

INPUT = 64


class ShortcutNet(nn.Module):
    def __init__(self, num_classes: int = len(CLASS_NAMES)) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU()
        )
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).amax(dim=(2, 3)))


def train_on(manifest: Path, out: Path, *, steps: int = 100, seed: int = 0) -> Path:
    """Fit on the manifest's images at 64 x 64; write a checkpoint camaudit loads with its metadata."""
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    pixels = []
    for row in rows:
        with Image.open(manifest.parent / row["uri"]) as image:
            resized = image.convert("RGB").resize((INPUT, INPUT), Image.Resampling.BILINEAR)
        pixels.append(np.asarray(resized))
    x = (torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    y = torch.tensor([CLASS_NAMES.index(row["label"]) for row in rows])
    torch.manual_seed(seed)
    model = ShortcutNet()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, len(rows), (32,), generator=generator)
        loss = F.cross_entropy(model(x[index]), y[index])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    torch.save(
        {
            "state_dict": model.state_dict(),
            "class_names": list(CLASS_NAMES),
            "input_size": [INPUT, INPUT],
            "mean": [0.5, 0.5, 0.5],
            "std": [0.25, 0.25, 0.25],
        },
        out,
    )
    return out
