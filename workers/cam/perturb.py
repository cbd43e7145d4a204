"""Score-CAM and Ablation-CAM: channel weights from extra forwards of the model.

Both cost one forward per (image, channel) in the reference, run one image at a time. Here
the forwards are batched across images and channels under ``inference_mode``, and work whose
result is known in advance is skipped without changing any number:

* Score-CAM: a channel that is zero everywhere yields an all-zero mask, so its masked input is
  the zero image whatever the image; its score comes from one zero-image forward.
* Ablation-CAM: a channel already equal to the ablation value everywhere cannot change the
  score, and its activation contributes nothing to the map either; it is not re-run.
* Ablation-CAM replaces the layer's output, so the part of the network before the layer need
  not see N copies of the image: it runs on one copy and the layer emits the N ablated
  versions (everything downstream broadcasts). Models that cannot take that fall back to
  N copies, detected from an exception or a wrong output batch size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workers.cam.capture import replace_output
from workers.cam.device_errors import is_device_failure
from workers.cam.layout import Layout, channel_axis
from workers.cam.memory_format import ChannelsLast
from workers.cam.precision import autocast
from workers.cam.targets import TargetRequest, score_rows

ABLATION_OFFSET = 1e7


class MaskedForward:
    """Model forwards on extra inputs: inference mode, the call's autocast and memory format."""

    def __init__(
        self, model: nn.Module, device: torch.device, dtype: torch.dtype | None, memory: ChannelsLast
    ):
        self.model = model
        self.device = device
        self.dtype = dtype
        self.memory = memory

    def __call__(self, inputs: torch.Tensor) -> Any:
        with torch.inference_mode(), autocast(self.device, self.dtype):
            if self.memory.enabled:
                try:
                    return self.model(self.memory.input(inputs))
                except RuntimeError as exc:
                    if is_device_failure(exc):
                        raise
                    self.memory.disable()
            return self.model(inputs)


def scorecam_weights(
    run: MaskedForward,
    images: torch.Tensor,
    acts: torch.Tensor,
    request: TargetRequest,
    classes: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    """Score-CAM channel weights ``[B, K, C]``: softmax over channels of masked-input scores."""
    batch, channels, height, width = acts.shape
    flat = acts.reshape(batch * channels, height, width)
    scores = torch.empty(batch * channels, classes.shape[1], device=acts.device)
    dead = flat.abs().amax(dim=(1, 2)) == 0
    pending = torch.arange(batch * channels, device=acts.device)
    if bool(dead.any()):
        zero_output = run(torch.zeros_like(images[:1]))
        if isinstance(zero_output, torch.Tensor):
            index = dead.nonzero().squeeze(1)
            expanded = zero_output.expand(index.numel(), *zero_output.shape[1:])
            scores[index] = score_rows(request, classes, expanded, index // channels)
            pending = (~dead).nonzero().squeeze(1)
    size = images.shape[-2:]
    for chunk in pending.split(batch_size):
        rows = chunk // channels
        upsampled = F.interpolate(flat[chunk][:, None], size=size, mode="bilinear", align_corners=True)
        low = upsampled.amin(dim=(2, 3), keepdim=True)
        high = upsampled.amax(dim=(2, 3), keepdim=True)
        masks = (upsampled - low) / (high - low + 1e-8)
        scores[chunk] = score_rows(request, classes, run(images[rows] * masks), rows)
    return torch.softmax(scores.view(batch, channels, -1).transpose(1, 2), dim=-1)


class AblationRunner:
    """Runs ablated forwards of one layer, sharing the pre-layer computation when it can."""

    def __init__(self, run: MaskedForward, layer: nn.Module, broadcast: bool):
        self.run = run
        self.layer = layer
        self.broadcast = broadcast

    def __call__(self, image: torch.Tensor, ablated: torch.Tensor) -> Any:
        count = ablated.shape[0]
        with replace_output(self.layer, lambda output: ablated.to(output.dtype)):
            if self.broadcast:
                try:
                    output = self.run(image)
                except RuntimeError as exc:
                    if is_device_failure(exc):
                        raise
                    output = None
                if isinstance(output, torch.Tensor) and output.dim() > 0 and output.shape[0] == count:
                    return output
                self.broadcast = False
            return self.run(image.expand(count, *image.shape[1:]))


def ablation_weights(
    runner: AblationRunner,
    images: torch.Tensor,
    captured: torch.Tensor,
    layout: Layout,
    base_scores: torch.Tensor,
    request: TargetRequest,
    classes: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    """Ablation-CAM channel weights ``[B, K, C]``: relative score drop when a channel is ablated.

    A channel is ablated to 0 when the image's layer minimum is 0 (post-ReLU features), else to
    ``minimum - 1e7``.
    """
    axis = channel_axis(layout, captured)
    raw = captured.detach()
    channels = raw.shape[axis]
    base = base_scores.detach()
    ablated_scores = base[:, :, None].repeat(1, 1, channels)
    for index in range(raw.shape[0]):
        moved = raw[index : index + 1].movedim(axis, 1)
        low = moved.amin()
        value = torch.where(low == 0, torch.zeros_like(low), low - ABLATION_OFFSET)
        live = (moved[0] != value).reshape(channels, -1).any(dim=1).nonzero().squeeze(1)
        rows = torch.full((batch_size,), index, device=classes.device)
        for chunk in live.split(batch_size):
            count = chunk.numel()
            batch = moved.expand(count, *moved.shape[1:]).clone()
            batch[torch.arange(count, device=batch.device), chunk] = value
            output = runner(images[index : index + 1], batch.movedim(1, axis))
            ablated_scores[index, :, chunk] = score_rows(request, classes, output, rows[:count]).T
    return (base[:, :, None] - ablated_scores) / base[:, :, None]
