"""Each CAM method and map step on small hand-made tensors against pytorch-grad-cam's own code.

No model is involved: the reference's map arithmetic (``get_cam_image`` of each method class,
``scale_cam_image``, ``aggregate_multi_layers``) is called directly on the same activations
and gradients in float64, so the maps must agree to rounding, not just correlate. The inputs
are chosen where a wrong constant shows: non-square grids, exact zero and one gradients,
activation sums of order one, and maps whose range is close to the reference's epsilon.
These tests take milliseconds, so mutation testing of the methods runs them for every mutant.
"""

from __future__ import annotations

import types
from typing import Any

import numpy as np
import pytest
import torch
from pytorch_grad_cam import (
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    XGradCAM,
)
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

from workers.cam.errors import CamConfigError
from workers.cam.maps import fuse, min_max, upsample
from workers.cam.methods import METHODS, Kind, get_method, parse_methods

REFERENCES = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "xgradcam": XGradCAM,
    "hirescam": HiResCAM,
    "gradcam-elementwise": GradCAMElementWise,
    "layercam": LayerCAM,
}


def activations_and_gradients(seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """``[2, 3, 4, 5]`` float64: ReLU-like activations (some zero), gradients of both signs.

    A few gradients are exactly 0 and exactly 1, where Grad-CAM++ masks and where a shifted
    mask constant would show.
    """
    rng = np.random.default_rng(seed)
    acts = np.maximum(rng.normal(0.3, 0.5, (2, 3, 4, 5)), 0.0)
    grads = rng.normal(0.0, 0.7, (2, 3, 4, 5))
    grads[0, 0, 0, :2] = 0.0
    grads[1, 2, 3, 4] = 0.0
    grads[0, 1, 2, 3] = 1.0
    grads[1, 0, 1, 1] = 1.0
    return acts, grads


def without_model(cls: type) -> Any:
    """A reference object for its map arithmetic only: no model, no hooks to release."""
    cam = cls.__new__(cls)
    cam.activations_and_grads = types.SimpleNamespace(release=lambda: None)
    return cam


def reference_map(name: str, acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """The reference class's raw map, from its own ``get_cam_image`` (no model, no hooks)."""
    cls = REFERENCES[name]
    cam = without_model(cls)
    return cam.get_cam_image(None, None, None, acts, grads, False)


@pytest.mark.parametrize("name", list(REFERENCES))
def test_every_gradient_method_computes_the_reference_map(name: str) -> None:
    acts, grads = activations_and_gradients()
    method = get_method(name)
    assert method.kind is Kind.GRADIENT and method.gradient is not None
    ours = method.gradient(torch.from_numpy(acts), torch.from_numpy(grads)).numpy()
    expected = reference_map(name, acts, grads)
    assert ours.shape == expected.shape == (2, 4, 5)
    np.testing.assert_allclose(ours, expected, rtol=1e-10, atol=1e-12)


def test_gradcam_plus_plus_ignores_cells_without_gradient() -> None:
    """Where the gradient is exactly 0 the weight is 0, whatever the other terms are."""
    acts = np.ones((1, 1, 2, 2))
    grads = np.array([[[[0.0, 1.0], [1.0, 0.0]]]])
    # alpha = 1 / (2 + 4 + 1e-6) at the two cells with gradient 1, weight = 2 * alpha
    expected = np.full((1, 2, 2), 2 / (6 + 1e-6))
    ours = get_method("gradcam++").gradient(torch.from_numpy(acts), torch.from_numpy(grads))
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(reference_map("gradcam++", acts, grads), expected, rtol=1e-12)


@pytest.mark.parametrize("name", ["eigencam", "eigengradcam"])
def test_eigen_methods_project_on_the_first_component(name: str) -> None:
    """The reference's SVD projection, up to the sign the SVD leaves open."""
    acts, grads = activations_and_gradients(seed=5)
    method = get_method(name)
    features = acts if name == "eigencam" else acts * grads
    if name == "eigencam":
        assert method.kind is Kind.ACTIVATION and method.activation is not None
        ours = method.activation(torch.from_numpy(acts)).numpy()
    else:
        assert method.kind is Kind.GRADIENT and method.gradient is not None
        ours = method.gradient(torch.from_numpy(acts), torch.from_numpy(grads)).numpy()
    expected = get_2d_projection(features)
    assert ours.shape == expected.shape == (2, 4, 5)
    for mine, theirs in zip(ours, expected, strict=True):
        sign = 1.0 if float((mine * theirs).sum()) >= 0 else -1.0
        np.testing.assert_allclose(mine, sign * theirs, rtol=0, atol=1e-5)


def reference_layer(raw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The reference's per-layer step: ReLU, min-max, resize with OpenCV (which takes (W, H))."""
    return scale_cam_image(np.maximum(raw, 0), (size[1], size[0]))


def test_upsample_is_relu_min_max_and_bilinear_resize() -> None:
    # three maps (an odd count: no pairing of maps into channels) on a non-square grid
    raw = np.random.default_rng(11).normal(size=(3, 3, 4)).astype(np.float32)
    ours = upsample(torch.from_numpy(raw), (9, 12)).numpy()
    assert ours.shape == (3, 9, 12)
    np.testing.assert_allclose(ours, reference_layer(raw, (9, 12)), rtol=0, atol=1e-6)
    # every map spans [0, 1]; a threefold resize keeps both ends (it samples every cell centre)
    assert np.allclose(ours.min(axis=(1, 2)), 0.0, atol=1e-6)
    assert np.allclose(ours.max(axis=(1, 2)), 1.0, atol=1e-6)


def test_upsample_keeps_leading_dimensions_and_the_size_it_already_has() -> None:
    raw = np.random.default_rng(12).normal(size=(2, 3, 4, 5)).astype(np.float32)
    ours = upsample(torch.from_numpy(raw), (4, 5)).numpy()
    assert ours.shape == (2, 3, 4, 5)
    flat = raw.reshape(6, 4, 5)
    np.testing.assert_allclose(ours.reshape(6, 4, 5), reference_layer(flat, (4, 5)), rtol=0, atol=1e-6)
    bigger = upsample(torch.from_numpy(raw), (8, 10)).numpy()
    np.testing.assert_allclose(bigger.reshape(6, 8, 10), reference_layer(flat, (8, 10)), rtol=0, atol=1e-6)


def test_min_max_divides_by_the_range_plus_the_reference_epsilon() -> None:
    """A map whose range is 1e-6: the epsilon 1e-7 makes its peak 1 / 1.1, as in the reference."""
    small = np.array([[[0.0, 0.5e-6, 1e-6], [0.25e-6, 0.0, 0.75e-6]]], dtype=np.float64) + 2.0e-6
    ours = min_max(torch.from_numpy(small)).numpy()
    np.testing.assert_allclose(ours, scale_cam_image(small), rtol=1e-5)
    assert ours.max() == pytest.approx(1e-6 / (1e-6 + 1e-7), rel=1e-6)
    # four-dimensional input: every [h, w] map normalised on its own
    maps = np.random.default_rng(13).normal(size=(2, 3, 4, 5))
    expected = np.stack([scale_cam_image(m) for m in maps])
    np.testing.assert_allclose(min_max(torch.from_numpy(maps)).numpy(), expected, rtol=1e-6, atol=1e-7)


def test_fuse_averages_layers_and_normalises_again_as_the_reference_does() -> None:
    rng = np.random.default_rng(14)
    layers = [rng.random((2, 6, 7)).astype(np.float32) * scale for scale in (1.0, 0.3, 2.0)]
    reference = without_model(GradCAM)
    for count in (1, 2, 3):
        ours = fuse([torch.from_numpy(x) for x in layers[:count]]).numpy()
        expected = reference.aggregate_multi_layers([x[:, None] for x in layers[:count]])
        assert ours.shape == expected.shape == (2, 6, 7)
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)


def test_methods_are_looked_up_by_name_with_the_closest_names_on_a_typo() -> None:
    assert [m.name for m in parse_methods("gradcam")] == ["gradcam"]
    assert [m.name for m in parse_methods(("layercam", "cam", "layercam", "eigencam"))] == [
        "layercam",
        "cam",
        "eigencam",
    ]
    assert get_method("scorecam").kind is Kind.PERTURBATION and get_method("cam").kind is Kind.HEAD
    with pytest.raises(CamConfigError, match=r"^unknown method 'gradcam\+'; closest valid: 'gradcam\+\+'"):
        get_method("gradcam+")
    with pytest.raises(CamConfigError, match=r"^unknown method '7'; valid: 'cam', 'gradcam'"):
        get_method(7)  # type: ignore[arg-type]
    with pytest.raises(CamConfigError, match=r"^unknown method 'hirescam '"):
        parse_methods(["gradcam", "hirescam "])
    with pytest.raises(CamConfigError) as empty:
        parse_methods([])
    assert str(empty.value) == "no methods given; choose from " + ", ".join(METHODS)
