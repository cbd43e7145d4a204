"""Which output each map explains, and that output's score.

A request is parsed before the forward (so a bad spec fails without spending a forward) and
resolved against the model output after it. Class targets read logits; a callable target maps
the whole output to one scalar per image, which covers single-logit, sigmoid multi-label,
regression and detection heads alike.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from workers.cam.errors import CamConfigError

ScoreFn = Callable[[Any], torch.Tensor]
TargetSpec = None | torch.Tensor | Sequence[int] | Sequence[Sequence[int]] | str | ScoreFn

_TOPK = re.compile(r"topk:(\d+)")
_SPEC_HELP = (
    "use None (top-1 prediction), 'all', 'topk:N' (e.g. 'topk:3'), an int64 tensor [B] or [B, K] "
    "of class indices, or a callable mapping the model output to one score per image [B]"
)


@dataclass(frozen=True)
class TargetRequest:
    """A parsed target spec; exactly one of the fields after ``kind`` is meaningful."""

    kind: str  # "top1" | "explicit" | "topk" | "all" | "callable"
    classes: torch.Tensor | None = None
    k: int = 1
    fn: ScoreFn | None = None
    # (min, max) of ``classes``, read while they were on the CPU: checking them against the
    # model's classes after the forward then needs no read back from the device
    bounds: tuple[int, int] | None = None

    @property
    def is_callable(self) -> bool:
        return self.kind == "callable"


def parse_targets(spec: TargetSpec, batch: int) -> TargetRequest:
    """Validate ``spec`` for a batch of ``batch`` images."""
    if spec is None:
        return TargetRequest("top1")
    if isinstance(spec, str):
        if spec == "all":
            return TargetRequest("all")
        match = _TOPK.fullmatch(spec)
        if match and int(match.group(1)) >= 1:
            return TargetRequest("topk", k=int(match.group(1)))
        raise CamConfigError(f"unknown target spec {spec!r}; {_SPEC_HELP}")
    if callable(spec) and not isinstance(spec, torch.Tensor):
        return TargetRequest("callable", fn=spec)
    classes = spec if isinstance(spec, torch.Tensor) else torch.as_tensor(spec)
    if classes.dtype.is_floating_point or classes.dtype.is_complex or classes.dtype == torch.bool:
        raise CamConfigError(
            f"class targets must be an integer tensor, got dtype {classes.dtype}; {_SPEC_HELP}"
        )
    if classes.dim() == 1:
        classes = classes[:, None]
    if classes.dim() != 2:
        raise CamConfigError(f"class targets must be shaped [B] or [B, K], got {tuple(classes.shape)}")
    if classes.shape[0] != batch:
        raise CamConfigError(
            f"got targets for {classes.shape[0]} images but the batch has {batch}; give exactly one row "
            "of targets per image (targets are never truncated or repeated to fit)"
        )
    if classes.shape[1] == 0:
        raise CamConfigError("class targets have K=0 columns; give at least one class per image")
    # A tensor made under inference_mode cannot be saved by the autograd graph (gather saves it).
    classes = classes.clone() if classes.is_inference() else classes
    bounds = (int(classes.min()), int(classes.max())) if classes.device.type == "cpu" else None
    return TargetRequest("explicit", classes=classes.long(), bounds=bounds)


@dataclass(frozen=True)
class ResolvedTargets:
    """``classes`` int64 [B, K] (-1 for a callable) and ``scores`` float32 [B, K].

    ``scores`` stays attached to the autograd graph when the forward recorded one.
    """

    classes: torch.Tensor
    scores: torch.Tensor


def _logits(output: Any) -> torch.Tensor:
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise CamConfigError(
            f"class targets need the model to return logits [B, num_classes], got {shape}; "
            "pass a callable target that maps the output to one score per image"
        )
    return output


def class_indices(request: TargetRequest, output: Any) -> torch.Tensor:
    """int64 [B, K] class indices for a class request, on the output's device."""
    logits = _logits(output)
    num_classes = logits.shape[1]
    if request.kind == "top1":
        return logits.detach().argmax(dim=1, keepdim=True)
    if request.kind == "topk":
        if request.k > num_classes:
            raise CamConfigError(
                f"'topk:{request.k}' asks for more classes than the model has ({num_classes})"
            )
        return logits.detach().topk(request.k, dim=1).indices
    if request.kind == "all":
        return torch.arange(num_classes, device=logits.device).expand(logits.shape[0], num_classes)
    assert request.classes is not None
    classes = request.classes.to(logits.device, non_blocking=True)
    low, high = request.bounds or (int(classes.min()), int(classes.max()))
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise CamConfigError(
            f"class target {bad} is out of range: the model has classes 0..{num_classes - 1}"
        )
    return classes


def callable_scores(fn: ScoreFn, output: Any, rows: int) -> torch.Tensor:
    """float32 [rows, 1] scores from a callable target, checked for shape."""
    scores = fn(output)
    if not isinstance(scores, torch.Tensor) or scores.dim() not in (1, 2) or scores.shape[0] != rows:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise CamConfigError(
            f"a callable target must return one score per image, shape [{rows}], got {shape}"
        )
    if scores.dim() == 2 and scores.shape[1] != 1:
        raise CamConfigError(f"a callable target must return one score per image, got {tuple(scores.shape)}")
    return scores.reshape(rows, 1).float()


def resolve_targets(request: TargetRequest, output: Any, batch: int) -> ResolvedTargets:
    """Classes and (graph-attached) scores for the main forward's output."""
    if request.is_callable:
        assert request.fn is not None
        scores = callable_scores(request.fn, output, batch)
        classes = torch.full((batch, 1), -1, dtype=torch.long, device=scores.device)
        return ResolvedTargets(classes, scores)
    classes = class_indices(request, output)
    return ResolvedTargets(classes, _logits(output).gather(1, classes).float())


def score_rows(
    request: TargetRequest, classes: torch.Tensor, output: Any, rows: torch.Tensor
) -> torch.Tensor:
    """Scores [n, K] of a perturbed forward whose row i shows image ``rows[i]``."""
    if request.is_callable:
        assert request.fn is not None
        return callable_scores(request.fn, output, rows.shape[0])
    return _logits(output).gather(1, classes[rows]).float()
