"""What a lower-precision run changes, measured against a float32 run of the same inputs.

Map correlation alone hides what an audit reads: the explained class (top-1), its score, the
raw-map magnitudes (patch scores and drift compare them across runs) and which patches rank
highest. Each figure here is one of those, per map or per image.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def tf32_off() -> Iterator[None]:
    """True float32 matmuls and convolutions on CUDA (cuDNN allows TF32 by default), restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-map Pearson r of ``[N, ...]`` batches; 1.0 where both maps are constant."""
    a = a.flatten(1).double()
    b = b.flatten(1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    norms = a.norm(dim=1) * b.norm(dim=1)
    both_flat = (a.norm(dim=1) < 1e-12) & (b.norm(dim=1) < 1e-12)
    r = (a * b).sum(1) / norms.clamp_min(1e-12)
    return torch.where(both_flat, torch.ones_like(r), r)


def top1_flips(reference_logits: torch.Tensor, logits: torch.Tensor) -> int:
    """Images whose predicted class differs from the reference's."""
    return int((reference_logits.argmax(dim=1) != logits.argmax(dim=1)).sum())


def target_score_error(reference: torch.Tensor, scores: torch.Tensor) -> float:
    """Largest relative error of the explained classes' scores, ``|s - s_ref| / max(|s_ref|, 1e-6)``."""
    reference = reference.double()
    error = (scores.double() - reference).abs() / reference.abs().clamp_min(1e-6)
    return float(error.max())


def raw_scale(reference_raw: torch.Tensor, raw: torch.Tensor) -> tuple[float, float]:
    """Range (min, max) over maps of ``max(raw) / max(reference raw)``; maps zero in both count as 1."""
    ref_max = reference_raw.flatten(1).amax(dim=1).double()
    max_ = raw.flatten(1).amax(dim=1).double()
    ratio = max_ / ref_max.clamp_min(1e-12)
    ratio = torch.where((ref_max <= 1e-12) & (max_ <= 1e-12), torch.ones_like(ratio), ratio)
    return float(ratio.min()), float(ratio.max())


def top_cell_agreement(reference_raw: torch.Tensor, raw: torch.Tensor, k: int) -> float:
    """Mean share of the reference's k highest cells that are also among the k highest here.

    Cells of the raw map are what the top patches are ranked from, so this is the agreement of
    the top-k patch sets at one patch per feature cell.
    """
    ref = reference_raw.flatten(1)
    out = raw.flatten(1)
    k = min(k, ref.shape[1])
    ref_top = ref.topk(k, dim=1).indices
    out_top = out.topk(k, dim=1).indices
    shared = (ref_top[:, :, None] == out_top[:, None, :]).any(dim=2).sum(dim=1)
    return float(shared.double().mean() / k)
