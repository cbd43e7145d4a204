"""The first-principal-component projection behind Eigen-CAM, on every algorithm the device may use."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.cam.eigen import first_component, top_eigenvector


def _features(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scale = torch.rand(shape[0], shape[1], 1, 1, generator=generator)
    return torch.relu(torch.randn(*shape, generator=generator)) * scale


@pytest.mark.parametrize("shape", [(6, 512, 7, 7), (3, 32, 12, 12), (2, 16, 3, 3)])
def test_projection_matches_a_full_svd_up_to_sign(shape: tuple[int, ...]) -> None:
    features = _features(shape, seed=shape[1])
    for algorithm in ("eigh", "squaring"):
        ours = first_component(features, algorithm).numpy()
        for index, image in enumerate(features.numpy()):
            matrix = image.reshape(shape[1], -1).T.astype(np.float64)
            matrix = matrix - matrix.mean(axis=0)
            expected = (matrix @ np.linalg.svd(matrix)[2][0]).reshape(shape[2:])
            sign = 1.0 if float((ours[index] * expected).sum()) >= 0 else -1.0
            np.testing.assert_allclose(
                ours[index], sign * expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max()
            )


def test_sign_follows_the_mean_activation() -> None:
    features = _features((4, 64, 6, 6), seed=1)
    for algorithm in ("eigh", "squaring"):
        for flipped in (features, -features):
            projection = first_component(flipped, algorithm)
            mean_map = flipped.mean(dim=1)
            centred = mean_map - mean_map.mean(dim=(1, 2), keepdim=True)
            assert bool(((projection * centred).sum(dim=(1, 2)) >= 0).all())


def test_squaring_agrees_with_eigh_and_handles_zero() -> None:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(8, 49, 256, dtype=torch.float64, generator=generator)
    gram = x @ x.transpose(1, 2)
    by_eigh, by_squaring = top_eigenvector(gram, "eigh"), top_eigenvector(gram, "squaring")
    torch.testing.assert_close((by_eigh * by_squaring).sum(dim=-1).abs(), torch.ones(8, dtype=torch.float64))
    zeros = torch.zeros(2, 3, 8, 8)
    for algorithm in ("eigh", "squaring"):
        assert torch.equal(first_component(zeros, algorithm), torch.zeros(2, 8, 8))
