"""Score-CAM and Ablation-CAM: channel weights from extra forwards of the model.

Both cost one forward per (image, channel) in the reference, run one image at a time. Here
the forwards are batched across images and channels under ``inference_mode``, and work whose
result is known in advance is skipped without changing any number:

* Score-CAM: a channel that is zero everywhere yields an all-zero mask, so its masked input is
  the zero image whatever the image; its score comes from one zero-image forward.
* Ablation-CAM: a channel already equal to the ablation value everywhere cannot change the
  score, and its activation contributes nothing to the map either; it is not re-run.
* Ablation-CAM replaces the layer's output, so the part of the network before the layer need
  not see N copies of the image: it runs on the distinct images of a chunk, or on one copy per
  image, and the layer emits the N ablated versions (see :class:`AblationRunner`). Models that
  cannot take that fall back to N copies, detected from an exception or a wrong output batch
  size.
"""

from __future__ import annotations

from collections.abc import Callable
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


ScoreFn = Callable[[Any, torch.Tensor], torch.Tensor]


class AblationRunner:
    """Runs and scores ablated forwards of one layer, sharing the pre-layer computation when it can.

    The layer's output is replaced by the ablated rows, so what runs before the layer need not
    see one image per row. Three ways, tried in this order; the first that fails (an exception
    or an output without one row per ablated row) is not tried again for this layer:

    * ``mixed``: each distinct image of the chunk runs once and the layer emits the chunk's rows.
      This only works where nothing after the layer reads what came before it (else its batch
      of distinct images could not meet the layer's rows), and then the images are irrelevant.
    * ``broadcast``: one forward per image of the chunk, the layer emitting that image's rows
      (everything downstream broadcasts one image to its rows).
    * ``copies``: every ablated row gets its own copy of its image, as in the reference.
    """

    MODES = ("mixed", "broadcast", "copies")

    def __init__(self, run: MaskedForward, layer: nn.Module, mode: str = "mixed"):
        if mode not in self.MODES:
            raise ValueError(f"unknown ablation mode {mode!r}; use one of {self.MODES}")
        self.run = run
        self.layer = layer
        self.mode = mode

    def _try(self, inputs: torch.Tensor, ablated: torch.Tensor, rows: torch.Tensor, score: ScoreFn):
        """Scores of ``ablated`` with ``inputs`` before the layer, or None where that does not work."""
        with replace_output(self.layer, lambda output: ablated.to(output.dtype)):
            try:
                output = self.run(inputs)
            except RuntimeError as exc:
                if is_device_failure(exc):
                    raise
                return None
        if isinstance(output, torch.Tensor) and output.dim() > 0 and output.shape[0] == ablated.shape[0]:
            return score(output, rows)
        return None

    def scores(
        self, images: torch.Tensor, rows: torch.Tensor, ablated: torch.Tensor, score: ScoreFn
    ) -> torch.Tensor:
        """Scores ``[n, K]`` of the ablated rows; ``rows`` (host, ascending) says whose image each is."""
        device = images.device
        sources, counts = torch.unique_consecutive(rows, return_counts=True)
        if self.mode == "mixed":
            result = self._try(images[sources.to(device)], ablated, rows, score)
            if result is not None:
                return result
            self.mode = "broadcast"
        if self.mode == "broadcast":
            parts = []
            start = 0
            for image, count in zip(sources.tolist(), counts.tolist(), strict=True):
                part = self._try(
                    images[image : image + 1],
                    ablated[start : start + count],
                    rows[start : start + count],
                    score,
                )
                if part is None:
                    self.mode = "copies"
                    break
                parts.append(part)
                start += count
            else:
                return torch.cat(parts)
        with replace_output(self.layer, lambda output: ablated.to(output.dtype)):
            output = self.run(images[rows.to(device)])
        return score(output, rows)


def ablation_weights(
    runner: AblationRunner,
    images: torch.Tensor,
    captured: torch.Tensor,
    layout: Layout,
    base_scores: torch.Tensor | None,
    request: TargetRequest,
    classes: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    """Ablation-CAM channel weights ``[B, K, C]``: relative score drop when a channel is ablated.

    A channel is ablated to 0 when the image's layer minimum is 0 (post-ReLU features), else to
    ``minimum - 1e7``. The (image, channel) pairs that can change a score are found for the
    whole batch at once (one read back from the device per layer) and run in chunks of
    ``batch_size`` rows that span images. ``base_scores`` None: the unablated scores are those
    of the runner's own forward from the captured activations (its precision, not the pass's
    that captured them).
    """
    axis = channel_axis(layout, captured)
    moved = captured.detach().movedim(axis, 1)
    images_n, channels = moved.shape[:2]
    low = moved.reshape(images_n, -1).amin(dim=1)
    value = torch.where(low == 0, torch.zeros_like(low), low - ABLATION_OFFSET)
    at_value = value.view(images_n, *([1] * (moved.dim() - 1)))
    live = (moved != at_value).reshape(images_n, channels, -1).any(dim=2)
    pairs = live.nonzero().cpu()

    def score(output: Any, rows: torch.Tensor) -> torch.Tensor:
        return score_rows(request, classes, output, rows.to(classes.device))

    if base_scores is None:
        whole = torch.arange(images_n)
        base_scores = torch.cat(
            [
                runner.scores(images, part, moved[part.to(moved.device)].movedim(1, axis), score)
                for part in whole.split(batch_size)
            ]
        )
    base = base_scores.detach()
    ablated_scores = base[:, :, None].repeat(1, 1, channels)
    for chunk in pairs.split(batch_size):
        rows = chunk[:, 0]
        on_device = chunk.to(moved.device, non_blocking=True)
        batch = moved[on_device[:, 0]].clone()
        fill = value[on_device[:, 0]].to(batch.dtype).view(-1, *([1] * (batch.dim() - 2)))
        batch[torch.arange(chunk.shape[0], device=batch.device), on_device[:, 1]] = fill
        ablated_scores[on_device[:, 0], :, on_device[:, 1]] = runner.scores(
            images, rows, batch.movedim(1, axis), score
        )
    return (base[:, :, None] - ablated_scores) / base[:, :, None]
