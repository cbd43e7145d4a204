"""Which output each map explains, and that output's score.

A request is parsed before the forward (so a bad spec fails without spending a forward) and
resolved against the model output after it. Class targets read logits; ``"positive"`` is the one
logit of a binary (single-logit) head; ``"above:T"`` picks, per image, the classes of a sigmoid
multi-label head whose probability passes ``T``; a callable target maps the whole output to one
scalar per image (regression outputs, a detection score).

Images may have different numbers of targets (multi-label heads, ground-truth label lists).
Their rows are padded to the batch's widest: a padded entry repeats a real class of its image
(so every map is computed as usual) and is marked invalid in ``valid``; callers drop it.
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
_ABOVE = re.compile(r"above:([^:]*)(?::(\d+))?")
PAD = -1  # an explicit class entry that only pads a shorter row
_SPEC_HELP = (
    "use None (top-1 prediction), 'all', 'topk:N' (e.g. 'topk:3'), 'positive' (a single-logit "
    "binary head), 'above:T' or 'above:T:N' (sigmoid multi-label: every class with probability > T, "
    "at most N), an int64 tensor [B] or [B, K] of class indices (-1 pads shorter rows) or a list of "
    "per-image class lists, or a callable mapping the model output to one score per image [B]"
)


@dataclass(frozen=True)
class TargetRequest:
    """A parsed target spec; exactly one of the fields after ``kind`` is meaningful."""

    kind: str  # "top1" | "explicit" | "topk" | "all" | "positive" | "above" | "callable"
    classes: torch.Tensor | None = None
    k: int = 1  # topk: how many; above: the most per image (0 = no limit)
    fn: ScoreFn | None = None
    # (min, max) of ``classes`` without padding, read while they were on the CPU: checking them
    # against the model's classes after the forward then needs no read back from the device
    bounds: tuple[int, int] | None = None
    threshold: float = 0.5

    @property
    def is_callable(self) -> bool:
        return self.kind == "callable"


def parse_targets(spec: TargetSpec, batch: int) -> TargetRequest:
    """Validate ``spec`` for a batch of ``batch`` images."""
    if spec is None:
        return TargetRequest("top1")
    if isinstance(spec, str):
        if spec in ("all", "positive"):
            return TargetRequest(spec)
        match = _TOPK.fullmatch(spec)
        if match and int(match.group(1)) >= 1:
            return TargetRequest("topk", k=int(match.group(1)))
        match = _ABOVE.fullmatch(spec)
        if match:
            return TargetRequest(
                "above", threshold=parse_threshold(match.group(1)), k=int(match.group(2) or 0)
            )
        raise CamConfigError(f"unknown target spec {spec!r}; {_SPEC_HELP}")
    if callable(spec) and not isinstance(spec, torch.Tensor):
        return TargetRequest("callable", fn=spec)
    classes = spec if isinstance(spec, torch.Tensor) else _class_table(spec)
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
    empty = (classes == PAD).all(dim=1)
    if bool(empty.any()):
        raise CamConfigError(
            f"image {int(empty.nonzero()[0])} of the batch has no class target (only -1 padding); "
            "give at least one class per image"
        )
    # A tensor made under inference_mode cannot be saved by the autograd graph (gather saves it).
    classes = classes.clone() if classes.is_inference() else classes
    if classes.device.type == "cpu":
        real = classes[classes != PAD]
        bounds: tuple[int, int] | None = (int(real.min()), int(real.max()))
    else:
        bounds = None
    return TargetRequest("explicit", classes=classes.long(), bounds=bounds)


def parse_threshold(text: str) -> float:
    """A probability threshold strictly between 0 and 1, from the text after ``above:``."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1:
        raise CamConfigError(
            f"'above:{text}' needs a probability threshold strictly between 0 and 1, e.g. 'above:0.5'"
        )
    return value


def _class_table(spec: Sequence[int] | Sequence[Sequence[int]]) -> torch.Tensor:
    """Class indices as a tensor; per-image lists of different lengths are padded with -1."""
    rows = list(spec)
    if rows and all(isinstance(row, Sequence) and not isinstance(row, str) for row in rows):
        width = max((len(row) for row in rows), default=0)
        return torch.tensor([list(row) + [PAD] * (width - len(row)) for row in rows], dtype=torch.long)
    try:
        return torch.as_tensor(spec)
    except (TypeError, ValueError, RuntimeError) as error:
        raise CamConfigError(f"cannot read class targets {spec!r}: {error}; {_SPEC_HELP}") from None


@dataclass(frozen=True)
class ResolvedTargets:
    """``classes`` int64 [B, K] (-1 for a callable), ``scores`` float32 [B, K], ``valid`` bool [B, K].

    ``scores`` stays attached to the autograd graph when the forward recorded one. ``valid`` is
    False where a row was only padded (its class repeats a real one of the same image).
    """

    classes: torch.Tensor
    scores: torch.Tensor
    valid: torch.Tensor


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor) and output.dim() == 1:
        return output[:, None]  # one logit per image, squeezed
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise CamConfigError(
            f"class targets need the model to return logits [B, num_classes], got {shape}; "
            "pass a callable target that maps the output to one score per image"
        )
    return output


def _above(request: TargetRequest, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the classes whose sigmoid passes the threshold, most probable first, capped."""
    probs = torch.sigmoid(logits.detach().float())
    order = probs.argsort(dim=1, descending=True)
    passing = probs.gather(1, order) > request.threshold
    counts = passing.sum(dim=1)
    if request.k:
        counts = counts.clamp_max(request.k)
    width = max(int(counts.max()), 1)
    valid = torch.arange(width, device=logits.device)[None, :] < counts[:, None]
    classes = torch.where(valid, order[:, :width], order[:, :1])
    return classes, valid


def _pad_with_first(classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit classes with -1 padding -> (classes with padding set to a real class, valid)."""
    valid = classes != PAD
    first = classes.gather(1, valid.long().argmax(dim=1, keepdim=True))
    return torch.where(valid, classes, first), valid


def class_indices(request: TargetRequest, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 [B, K] class indices for a class request and which of them are real, on the output's device."""
    logits = _logits(output)
    num_classes = logits.shape[1]
    everywhere = torch.ones(logits.shape[0], 1, dtype=torch.bool, device=logits.device)
    if request.kind == "top1":
        return logits.detach().argmax(dim=1, keepdim=True), everywhere
    if request.kind == "positive":
        if num_classes != 1:
            raise CamConfigError(
                f"'positive' explains the single logit of a binary head, but the model has {num_classes} "
                "outputs; use top1, topk:N, above:T (sigmoid multi-label) or class indices"
            )
        return torch.zeros_like(everywhere, dtype=torch.long), everywhere
    if request.kind == "above":
        return _above(request, logits)
    if request.kind == "topk":
        if request.k > num_classes:
            raise CamConfigError(
                f"'topk:{request.k}' asks for more classes than the model has ({num_classes})"
            )
        indices = logits.detach().topk(request.k, dim=1).indices
        return indices, torch.ones_like(indices, dtype=torch.bool)
    if request.kind == "all":
        indices = torch.arange(num_classes, device=logits.device).expand(logits.shape[0], num_classes)
        return indices, torch.ones_like(indices, dtype=torch.bool)
    assert request.classes is not None
    classes, valid = _pad_with_first(request.classes.to(logits.device, non_blocking=True))
    low, high = request.bounds or (int(classes.min()), int(classes.max()))
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise CamConfigError(
            f"class target {bad} is out of range: the model has classes 0..{num_classes - 1}"
        )
    return classes, valid


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
        return ResolvedTargets(classes, scores, torch.ones_like(classes, dtype=torch.bool))
    classes, valid = class_indices(request, output)
    return ResolvedTargets(classes, _logits(output).gather(1, classes).float(), valid)


def score_rows(
    request: TargetRequest, classes: torch.Tensor, output: Any, rows: torch.Tensor
) -> torch.Tensor:
    """Scores [n, K] of a perturbed forward whose row i shows image ``rows[i]``."""
    if request.is_callable:
        assert request.fn is not None
        return callable_scores(request.fn, output, rows.shape[0])
    return _logits(output).gather(1, classes[rows]).float()
