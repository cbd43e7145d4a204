"""Engine behaviour: layer choice, layouts, multi-view, mixed precision, errors and hygiene."""

from __future__ import annotations

import gc
import os
import tracemalloc

import numpy as np
import pytest
import torch
import torchvision
from pytorch_grad_cam import AblationCAM, GradCAM
from torch import nn

from tests.test_cam_support import TinyNet, assert_maps_match, class_targets, pearson, seeded, small_vit
from workers.cam import METHODS, CamConfigError, CamEngine, CamResult


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    seeded(0)
    return torchvision.models.resnet18(weights=None).eval()


def _images(batch: int, size: int, seed: int = 1) -> torch.Tensor:
    seeded(seed)
    return torch.randn(batch, 3, size, size)


def _hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()
    )


# --- layer choice and layouts -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("builder", "expected"),
    [
        (lambda: torchvision.models.resnet18(weights=None), "layer4"),
        (lambda: torchvision.models.mobilenet_v3_small(weights=None), "features"),
        (lambda: torchvision.models.vgg11_bn(weights=None), "features"),  # its adaptive pool is skipped
        (small_vit, "encoder.layers.encoder_layer_1.ln_1"),
    ],
)
def test_default_layer_is_the_last_spatial_feature_map(builder, expected: str) -> None:
    seeded(0)
    model = builder().eval()
    size = 32 if expected.startswith("encoder") else 64
    result = CamEngine(model, methods=["gradcam"])(_images(2, size))
    assert result.layers == [expected]
    assert result.maps["gradcam"].shape == (2, 1, size, size)


def test_unknown_layer_lists_closest_names(resnet: nn.Module) -> None:
    with pytest.raises(CamConfigError, match=r"unknown layer 'layer5'; closest valid: .*'layer4'"):
        CamEngine(resnet, layers=["layer5"])
    with pytest.raises(CamConfigError, match=r"unknown layer 'layer4.1.conv3'.*'layer4.1.conv2'"):
        CamEngine(resnet, layers=["layer4.1.conv3"])


def test_unknown_method_lists_closest_names(resnet: nn.Module) -> None:
    with pytest.raises(CamConfigError, match=r"unknown method 'gradcam\+'; closest valid: 'gradcam\+\+'"):
        CamEngine(resnet, methods=["gradcam+"])
    with pytest.raises(CamConfigError, match=r"unknown method 'score-cam'.*'scorecam'"):
        CamEngine(resnet, methods=["score-cam"])
    assert set(METHODS) == {
        "cam",
        "gradcam",
        "gradcam++",
        "xgradcam",
        "hirescam",
        "gradcam-elementwise",
        "layercam",
        "eigencam",
        "eigengradcam",
        "scorecam",
        "ablationcam",
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"amp": "int8"}, r"unknown amp setting 'int8'"),
        ({"score_batch_size": 0}, r"score_batch_size must be a positive int"),
        ({"layers": []}, r"layers is empty"),
        ({"methods": []}, r"no methods given"),
    ],
)
def test_bad_settings_fail_at_construction(resnet: nn.Module, kwargs: dict, message: str) -> None:
    with pytest.raises(CamConfigError, match=message):
        CamEngine(resnet, **kwargs)


def test_cam_needs_gap_linear_head_directly_after_the_layer(resnet: nn.Module) -> None:
    images = _images(2, 64)
    with pytest.raises(CamConfigError, match=r"layer 'layer3' to feed global average pooling"):
        CamEngine(resnet, layers=["layer3"], methods=["cam"])(images)
    seeded(0)
    mobilenet = torchvision.models.mobilenet_v3_small(weights=None).eval()  # Linear-Hardswish-Linear head
    with pytest.raises(CamConfigError, match=r"cam needs layer 'features'.*use 'gradcam'"):
        CamEngine(mobilenet, layers=["features"], methods=["cam"])(images)


def test_layer_running_twice_or_returning_a_tuple_is_rejected(resnet: nn.Module) -> None:
    images = _images(2, 64)
    with pytest.raises(CamConfigError, match=r"'layer4.1.relu' runs more than once"):
        CamEngine(resnet, layers=["layer4.1.relu"])(images)
    model = small_vit()
    with pytest.raises(CamConfigError, match=r"returns tuple, not a tensor"):
        CamEngine(model, layers=["encoder.layers.encoder_layer_1.self_attention"])(_images(2, 32))


class TokenNet(nn.Module):
    """Emits a [B, h*w, C] token sequence with no class token: needs a user reshape."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.mix = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.mix(self.embed(x).flatten(2).transpose(1, 2))
        return self.head(tokens.mean(dim=1))


def _tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:
    side = int(tokens.shape[1] ** 0.5)
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


def test_user_reshape_matches_reference() -> None:
    seeded(2)
    model = TokenNet().eval()
    images = _images(4, 24)
    result = CamEngine(model, layers=["mix"], methods=["gradcam", "ablationcam"], reshape=_tokens_to_grid)(
        images
    )
    assert result.raw["gradcam"]["mix"].shape == (4, 1, 6, 6)
    with GradCAM(model, [model.mix], reshape_transform=_tokens_to_grid) as cam:
        reference = cam(images, targets=class_targets(result.targets))
    assert_maps_match(result.maps["gradcam"][:, 0].numpy(), reference)
    from pytorch_grad_cam.ablation_layer import AblationLayerVit

    with AblationCAM(
        model, [model.mix], reshape_transform=_tokens_to_grid, ablation_layer=AblationLayerVit()
    ) as cam:
        reference = cam(images, targets=class_targets(result.targets))
    assert_maps_match(result.maps["ablationcam"][:, 0].numpy(), reference)


class MultiView(nn.Module):
    """Several views of one case: a shared backbone per view, view logits averaged."""

    def __init__(self) -> None:
        super().__init__()
        self.single = TinyNet(classes=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, views = x.shape[:2]
        return self.single(x.flatten(0, 1)).view(batch, views, -1).mean(dim=1)


def test_multi_view_input_gives_one_map_per_view() -> None:
    seeded(6)
    model = MultiView().eval()
    seeded(7)
    images = torch.randn(2, 3, 3, 12, 12)  # [B, V, C, H, W]
    methods = ["gradcam", "layercam", "eigencam"]
    result = CamEngine(model, layers=["single.features"], methods=methods)(images, targets="topk:2")
    assert result.views == 3
    assert result.maps["gradcam"].shape == (2, 3, 2, 12, 12)
    assert result.raw["gradcam"]["single.features"].shape == (2, 3, 2, 6, 6)
    assert result.targets.shape == (2, 2)
    # The averaged logit is linear in each view's logit, so a view's normalised map is the
    # single-view model's map of that view for the same class.
    per_view = CamEngine(model.single, layers=["features"], methods=methods)
    for view in range(3):
        single = per_view(images[:, view], targets=result.targets)
        for name in methods:
            torch.testing.assert_close(result.maps[name][:, view], single.maps[name], atol=1e-5, rtol=1e-4)


def test_multi_view_rejects_perturbation_methods() -> None:
    model = MultiView().eval()
    with pytest.raises(CamConfigError, match="multi-view"):
        CamEngine(model, layers=["single.features"], methods=["scorecam"])(torch.randn(1, 2, 3, 12, 12))


# --- numbers: raw scale, mixed precision --------------------------------------------------------


def test_raw_maps_keep_magnitude_while_maps_are_normalised() -> None:
    seeded(8)
    model = TinyNet(classes=3, bias=False).eval()  # positively homogeneous: features scale with input
    images = torch.rand(2, 3, 12, 12)
    engine = CamEngine(model, layers=["features"], methods=["cam", "gradcam"])
    faint = engine(images, targets=torch.tensor([0, 1]))
    strong = engine(3 * images, targets=torch.tensor([0, 1]))
    torch.testing.assert_close(strong.raw["cam"]["features"], 3 * faint.raw["cam"]["features"])
    torch.testing.assert_close(strong.maps["cam"], faint.maps["cam"])
    cam, gradcam = faint.raw["cam"]["features"], faint.raw["gradcam"]["features"]
    torch.testing.assert_close(gradcam * cam.shape[-1] * cam.shape[-2], cam)
    # Without biases, the spatial mean of the pre-ReLU CAM is the logit; ReLU only adds mass.
    assert bool((cam.mean(dim=(2, 3)) >= faint.scores - 1e-5).all())
    with torch.no_grad():
        weights, features = model.fc.weight[[0, 1]], model.features(images)
    torch.testing.assert_close(cam[:, 0], torch.einsum("nc,nchw->nhw", weights, features).clamp_min(0))


def test_bf16_autocast_on_cpu_keeps_maps(resnet: nn.Module) -> None:
    images = _images(4, 64)
    methods = ["gradcam", "gradcam++", "layercam", "eigencam", "cam"]
    exact = CamEngine(resnet, layers=["layer4"], methods=methods, amp=False)(images)
    mixed = CamEngine(resnet, layers=["layer4"], methods=methods, amp="bf16")(images, targets=exact.targets)
    assert not torch.equal(mixed.logits, exact.logits)  # the forward really ran in bf16
    off_by_default = CamEngine(resnet, layers=["layer4"], methods=methods)(images, targets=exact.targets)
    assert torch.equal(off_by_default.logits, exact.logits)  # amp=None: no autocast on CPU
    for name in methods:
        assert mixed.maps[name].dtype == torch.float32
        assert mixed.raw[name]["layer4"].dtype == torch.float32
        for ours, ref in zip(mixed.maps[name][:, 0].numpy(), exact.maps[name][:, 0].numpy(), strict=True):
            assert pearson(ours, ref) >= 0.99, name


# --- hygiene: hooks, grads, modes, memory -------------------------------------------------------


def test_model_state_is_restored_and_no_grads_are_left(resnet: nn.Module) -> None:
    model = resnet
    model.train()
    model.layer2.eval()
    model.fc.weight.requires_grad_(False)
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    storage = {name: (p.data_ptr(), p.stride()) for name, p in model.named_parameters()}
    hooks = _hook_count(model)
    try:
        methods = ["gradcam", "ablationcam", "scorecam"]
        with torch.no_grad():  # as worker code calls it
            CamEngine(model, layers=["layer3", "layer4"], methods=methods)(_images(1, 32))
        assert torch.is_grad_enabled()
        assert {name: m.training for name, m in model.named_modules()} == modes
        assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
        assert {name: (p.data_ptr(), p.stride()) for name, p in model.named_parameters()} == storage
        assert all(p.grad is None for p in model.parameters())
        assert _hook_count(model) == hooks
    finally:
        model.fc.weight.requires_grad_(True)
        model.eval()


def test_hooks_are_removed_and_state_restored_after_exceptions(resnet: nn.Module) -> None:
    model = resnet
    model.train()

    def broken_target(output: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("target failed")

    engine = CamEngine(model, layers=["layer4"], methods=["gradcam"])
    with pytest.raises(RuntimeError, match="target failed"):
        engine(_images(2, 32), targets=broken_target)
    with pytest.raises(CamConfigError):
        CamEngine(model, layers=["layer4.0.relu"])(_images(2, 32))
    with pytest.raises(RuntimeError):
        engine(torch.randn(2, 5, 32, 32))  # wrong channel count fails inside the forward
    assert _hook_count(model) == 0
    assert all(m.training for m in model.modules())
    assert torch.is_grad_enabled()
    assert all(p.grad is None for p in model.parameters())
    model.eval()


class FlattenByView(TinyNet):
    """Flattens conv features with ``.view``, which fails on channels-last tensors."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        flat = features.view(features.shape[0], -1)
        pooled = flat.reshape(features.shape[0], features.shape[1], -1).mean(dim=2)
        return self.fc(pooled)


def test_extra_forwards_fall_back_to_contiguous_memory() -> None:
    seeded(10)
    model = FlattenByView(classes=4).eval()
    images = torch.randn(3, 3, 12, 12)
    with pytest.raises(RuntimeError, match="view"):
        model(images.contiguous(memory_format=torch.channels_last))
    storage = {name: (p.data_ptr(), p.stride()) for name, p in model.named_parameters()}
    engine = CamEngine(model, layers=["features"], methods=["scorecam", "ablationcam"])
    result = engine(images)
    assert {name: (p.data_ptr(), p.stride()) for name, p in model.named_parameters()} == storage
    with pytest.raises(RuntimeError, match="view"):  # the caller's model is as it was
        model(images.contiguous(memory_format=torch.channels_last))
    from pytorch_grad_cam import ScoreCAM

    scorecam = ScoreCAM(model, [model.features])
    try:
        reference = scorecam(images, targets=class_targets(result.targets))
    finally:
        scorecam.activations_and_grads.release()
    assert_maps_match(result.maps["scorecam"][:, 0].numpy(), reference)
    with AblationCAM(model, [model.features]) as cam:
        reference = cam(images, targets=class_targets(result.targets))
    assert_maps_match(result.maps["ablationcam"][:, 0].numpy(), reference)


class BatchNormNet(TinyNet):
    """Conv -> batch norm -> ReLU: Score-CAM runs a copy with the batch norm folded in."""

    def __init__(self) -> None:
        super().__init__(classes=4)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
        )


def test_scorecam_follows_weights_changed_between_calls() -> None:
    seeded(11)
    model = BatchNormNet().eval()
    with torch.no_grad():
        model.features[1].running_var.uniform_(0.5, 2.0)
    images = torch.randn(2, 3, 8, 8)
    engine = CamEngine(model, layers=["features"], methods=["scorecam"])
    targets = torch.tensor([0, 1])
    before = engine(images, targets=targets).raw["scorecam"]["features"]
    with torch.no_grad():  # a training step between batches, in place
        model.features[0].weight.mul_(-1.5)
        model.features[1].running_mean.add_(0.3)
    after = engine(images, targets=targets).raw["scorecam"]["features"]
    fresh = CamEngine(model, layers=["features"], methods=["scorecam"])(images, targets=targets)
    torch.testing.assert_close(after, fresh.raw["scorecam"]["features"])
    assert not torch.allclose(before, after)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# A leak is growth that every call adds. The first traced calls still fill caches once (a few
# KiB when tracing starts), so growth is measured after a first window has absorbed them, in
# three windows one after the other, and the smallest counts: a leak grows every window by the
# same amount, while a one-off (a dict resizing, or another thread of the test process
# allocating while the calls run, which tracemalloc counts too) lands in one window only. The
# bounds per call are those a 1,000-call run had (64 KiB of Python heap, 200 objects, 16 MiB of
# RSS over 1,000 calls), so a leak of that size fails here as it did there.
SETTLE_CALLS = 100
WINDOW_CALLS = 50
WINDOWS = 3
HEAP_BYTES_PER_CALL = 64 * 1024 / 1000
OBJECTS_PER_CALL = 200 / 1000
RSS_BYTES_PER_CALL = 16 * 1024 * 1024 / 1000


def test_repeated_calls_do_not_grow_memory() -> None:
    seeded(9)
    model = TinyNet(classes=4, width=4).eval()
    engine = CamEngine(
        model, layers=["features"], methods=["gradcam", "cam", "eigencam", "scorecam", "ablationcam"]
    )
    images = torch.randn(2, 3, 8, 8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread hand-offs would dominate on a busy machine
    heap: list[int] = []
    objects: list[int] = []
    try:
        for _ in range(50):
            engine(images, targets="topk:2")
        tracemalloc.start()
        for _ in range(SETTLE_CALLS):
            engine(images, targets="topk:2")
        gc.collect()
        len(gc.get_objects())  # its list of every object, once, before the RSS it would raise
        rss = _rss_bytes()
        for _ in range(WINDOWS):
            heap_before, objects_before = tracemalloc.get_traced_memory()[0], len(gc.get_objects())
            for _ in range(WINDOW_CALLS):
                engine(images, targets="topk:2")
            gc.collect()
            heap.append(tracemalloc.get_traced_memory()[0] - heap_before)
            objects.append(len(gc.get_objects()) - objects_before)
        tracemalloc.stop()
    finally:
        torch.set_num_threads(threads)
    assert min(heap) < HEAP_BYTES_PER_CALL * WINDOW_CALLS, f"python heap grew by {heap} bytes a window"
    assert min(objects) < OBJECTS_PER_CALL * WINDOW_CALLS, f"{objects} more objects a window"
    assert _rss_bytes() - rss < RSS_BYTES_PER_CALL * WINDOW_CALLS * WINDOWS
    assert _hook_count(model) == 0


def test_maps_are_deterministic_across_calls(resnet: nn.Module) -> None:
    images = _images(2, 64)
    engine = CamEngine(resnet, layers=["layer4"], methods=["eigencam", "eigengradcam"])
    first, second = engine(images), engine(images)
    for name in ("eigencam", "eigengradcam"):
        assert np.array_equal(first.maps[name].numpy(), second.maps[name].numpy())


def _numbered(*shape: int) -> torch.Tensor:
    return torch.arange(float(np.prod(shape))).reshape(shape)


def test_select_images_keeps_every_output_of_the_chosen_rows() -> None:
    b, k = 3, 2
    result = CamResult(
        maps={"gradcam": _numbered(b, k, 4, 4)},
        layer_maps={"gradcam": {"a": _numbered(b, k, 4, 4) + 1, "b": _numbered(b, k, 4, 4) + 2}},
        raw={"gradcam": {"a": _numbered(b, k, 2, 2), "b": _numbered(b, k, 2, 2) + 3}},
        unrectified={"gradcam": {"a": -_numbered(b, k, 2, 2), "b": -_numbered(b, k, 2, 2)}},
        targets=torch.tensor([[0, 1], [2, 3], [4, 5]]),
        scores=_numbered(b, k),
        valid=torch.tensor([[True, False], [True, True], [False, True]]),
        logits=_numbered(b, 6),
        layers=["a", "b"],
    )
    keep = [2, 0, 2]
    picked = result.select_images(keep)
    assert torch.equal(picked.maps["gradcam"], result.maps["gradcam"][keep])
    for name in ("a", "b"):
        for field in ("layer_maps", "raw", "unrectified"):
            assert torch.equal(
                getattr(picked, field)["gradcam"][name], getattr(result, field)["gradcam"][name][keep]
            )
    for field in ("targets", "scores", "valid", "logits"):
        assert torch.equal(getattr(picked, field), getattr(result, field)[keep])
    assert picked.layers == ["a", "b"] and picked.views is None
    with pytest.raises(ValueError, match="no views"):
        result.select_images([0], views_of=[0])


def test_select_images_of_a_multi_view_result_takes_each_rows_own_view() -> None:
    cases, views, k = 2, 3, 1
    result = CamResult(
        maps={"cam": _numbered(cases, views, k, 4, 4)},
        layer_maps={"cam": {"f": _numbered(cases, views, k, 4, 4)}},
        raw={"cam": {"f": _numbered(cases, views, k, 2, 2)}},
        unrectified={"cam": {"f": _numbered(cases, views, k, 2, 2) - 5}},
        targets=torch.tensor([[1], [0]]),
        scores=torch.tensor([[0.5], [0.25]]),
        valid=torch.ones(cases, k, dtype=torch.bool),
        logits=_numbered(cases, 2),
        layers=["f"],
        views=views,
    )
    rows = [(1, 2), (0, 0), (1, 0)]  # (case, view) of each item
    picked = result.select_images([c for c, _ in rows], views_of=[v for _, v in rows])
    assert picked.views is None
    for n, (case, view) in enumerate(rows):
        assert torch.equal(picked.maps["cam"][n], result.maps["cam"][case, view])
        assert torch.equal(picked.raw["cam"]["f"][n], result.raw["cam"]["f"][case, view])
        assert torch.equal(picked.unrectified["cam"]["f"][n], result.unrectified["cam"]["f"][case, view])
        assert torch.equal(picked.targets[n], result.targets[case])
        assert torch.equal(picked.logits[n], result.logits[case])
