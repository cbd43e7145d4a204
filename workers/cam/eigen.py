"""First-principal-component projection of a feature grid (Eigen-CAM, Eigen-Grad-CAM).

The reference computes a full SVD per image of the centred ``[h*w, C]`` matrix on the CPU.
Only the first component is needed, and ``X v1 = u1 * s1``: the top eigenvector of the small
Gram matrix ``X X^T`` (``h*w`` square) — or of ``X^T X`` when channels are fewer than positions —
gives the same projection, batched over images, on the device, in float64 so the squared
condition number costs no accuracy.

The top eigenvector comes from LAPACK's ``eigh`` on the CPU. On GPUs a batched ``eigh`` of
these sizes runs one solver call per matrix, slower than the whole forward; repeated squaring
(``G -> G^2``, normalised, 20 times: the power method with exponent 2^20) is a handful of batched
matmuls and reaches the same vector unless the top two eigenvalues agree to ~1e-5, where the
component is not determined anyway.

The component's sign is arbitrary (LAPACK picks one); it is fixed so the projection correlates
positively with the channel-mean activation, which makes maps reproducible across devices.
"""

from __future__ import annotations

from typing import Literal

import torch

_SQUARINGS = 20
_SQUARING_MAX_SIZE = 1024


def _float_dtype(device: torch.device) -> torch.dtype:
    return torch.float64 if device.type in ("cpu", "cuda") else torch.float32


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(vectors.dtype).tiny)


def top_eigenvector(
    matrices: torch.Tensor, algorithm: Literal["auto", "eigh", "squaring"] = "auto"
) -> torch.Tensor:
    """Unit eigenvector of the largest eigenvalue of symmetric PSD matrices ``[N, n, n]``."""
    size = matrices.shape[-1]
    if algorithm == "auto":
        on_cpu = matrices.device.type == "cpu"
        algorithm = "eigh" if on_cpu or size > _SQUARING_MAX_SIZE else "squaring"
    if algorithm == "eigh":
        return torch.linalg.eigh(matrices)[1][..., -1]
    tiny = torch.finfo(matrices.dtype).tiny
    power = matrices
    for _ in range(_SQUARINGS):
        power = power / power.norm(dim=(-2, -1), keepdim=True).clamp_min(tiny)
        power = power @ power
    # The limit is (a multiple of) v v^T: its largest column is parallel to v.
    column = power.norm(dim=-2).argmax(dim=-1)
    vector = _unit(power.gather(-1, column[:, None, None].expand(-1, size, 1)).squeeze(-1))
    return _unit((matrices @ vector[..., None]).squeeze(-1))  # one plain power step polishes it


def first_component(
    features: torch.Tensor, algorithm: Literal["auto", "eigh", "squaring"] = "auto"
) -> torch.Tensor:
    """Project ``[N, C, h, w]`` features on their first principal component: ``[N, h, w]``."""
    n, c, h, w = features.shape
    x = torch.nan_to_num(features.float(), nan=0.0, posinf=torch.inf, neginf=-torch.inf)
    x = x.reshape(n, c, h * w).transpose(1, 2)  # [N, P, C]
    centred = (x - x.mean(dim=1, keepdim=True)).to(_float_dtype(features.device))
    if h * w <= c:
        gram = centred @ centred.transpose(1, 2)
        left = top_eigenvector(gram, algorithm)  # u1, so X v1 = u1 * s1 with s1^2 = u1^T G u1
        value = (left[:, None, :] @ gram @ left[:, :, None]).reshape(n, 1)
        projection = left * value.clamp_min(0).sqrt()
    else:
        right = top_eigenvector(centred.transpose(1, 2) @ centred, algorithm)
        projection = (centred @ right[..., None]).squeeze(-1)
    mean_map = x.mean(dim=2).to(projection.dtype)
    agreement = (projection * (mean_map - mean_map.mean(dim=1, keepdim=True))).sum(dim=1, keepdim=True)
    projection = torch.where(agreement < 0, -projection, projection)
    return projection.to(torch.float32).reshape(n, h, w)
