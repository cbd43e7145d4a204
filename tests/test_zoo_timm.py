"""``timm:NAME[.TAG]``: timm's registry and preprocessing, weights from its cache or a checkpoint."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch

from tests.zoo_support import plant_hf_cache, run_zoo_model
from workers.cam import CamEngine
from workers.models import ModelLoadError, file_sha256, load_model
from workers.synth import make_dataset


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_a_bare_name_is_pinned_to_its_default_weights_from_timms_cache(hf_cache: Path) -> None:
    torch.manual_seed(0)
    planted = timm.create_model("resnet18", pretrained=False).eval()
    path = plant_hf_cache(hf_cache, "timm/resnet18.a1_in1k", planted.state_dict())
    loaded = load_model("timm:resnet18")
    assert loaded.ref == "timm:resnet18.a1_in1k"
    assert loaded.weights is not None and loaded.weights["file"] == str(path)
    assert loaded.checkpoint_sha256 == file_sha256(path) == loaded.weights["sha256"]
    pre = loaded.preprocess  # a1_in1k: bicubic, crop_pct 0.95
    assert (pre.resize, pre.size, pre.fit, pre.interpolation) == (
        "center-crop",
        (224, 224),
        (235, 235),
        "bicubic",
    )
    assert loaded.class_names is not None and loaded.class_names[207] == "golden retriever"
    assert loaded.default_layer == "layer4"
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), planted(x))


def test_a_checkpoint_gives_the_weights_and_its_head_size(tmp_path: Path) -> None:
    torch.manual_seed(1)
    trained = timm.create_model("resnet18", pretrained=False, num_classes=3).eval()
    checkpoint = tmp_path / "r18.pt"
    torch.save({"state_dict": trained.state_dict(), "class_names": ["a", "b", "c"]}, checkpoint)
    loaded = load_model("timm:resnet18.a1_in1k", checkpoint)
    assert loaded.num_classes == 3 and loaded.class_names == ["a", "b", "c"]
    assert loaded.preprocess.interpolation == "bicubic" and loaded.weights is None
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), trained(x))


def test_a_timm_vit_is_explained_at_its_last_block_on_the_patch_grid(tmp_path: Path) -> None:
    torch.manual_seed(2)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4).eval()
    checkpoint = tmp_path / "vit.pt"
    torch.save(vit.state_dict(), checkpoint)
    loaded = load_model("timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k", checkpoint)
    assert loaded.default_layer == "blocks.11.norm1" and loaded.preprocess.fit == (248, 248)
    engine = CamEngine(
        loaded.model, layers=[loaded.default_layer], methods=["gradcam"], reshape=loaded.reshape
    )
    result = engine(torch.randn(2, 3, 224, 224), targets=None)
    raw = result.raw["gradcam"][loaded.default_layer]
    assert raw.shape == (2, 1, 14, 14) and bool((raw.amax(dim=(-1, -2)) > 0).all())


def test_wrong_names_and_missing_weights_fail_with_what_would_be_right(hf_cache: Path) -> None:
    with pytest.raises(ModelLoadError, match="unknown timm architecture 'resnt18'; closest: resnet18"):
        load_model("timm:resnt18")
    with pytest.raises(
        ModelLoadError, match=r"no pretrained weights 'resnet18\.a1_in2k'; closest: resnet18\.a1_in1k"
    ):
        load_model("timm:resnet18.a1_in2k")
    expected = hf_cache / "models--timm--resnet50.a1_in1k"
    with pytest.raises(ModelLoadError, match=f"looked at {expected}/snapshots/.*never downloads"):
        load_model("timm:resnet50.a1_in1k")
    assert not expected.exists()


def test_a_timm_backbone_wrapped_in_a_user_module_works_through_python(tmp_path: Path) -> None:
    package = tmp_path / "userpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "screening.py").write_text(
        "import timm\n"
        "from torch import nn\n\n\n"
        "class Screening(nn.Module):\n"
        "    def __init__(self, num_classes: int = 2) -> None:\n"
        "        super().__init__()\n"
        "        self.backbone = timm.create_model('resnet18', pretrained=False, num_classes=0)\n"
        "        self.head = nn.Linear(self.backbone.num_features, num_classes)\n\n"
        "    def forward(self, x):\n"
        "        return self.head(self.backbone(x))\n\n\n"
        "def build(num_classes: int = 2) -> nn.Module:\n"
        "    return Screening(num_classes)\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        torch.manual_seed(3)
        from userpkg.screening import build  # type: ignore[import-not-found]

        model = build().eval()
        checkpoint = tmp_path / "screening.pt"
        torch.save({"state_dict": model.state_dict(), "class_names": ["normal", "finding"]}, checkpoint)
        loaded = load_model("python:userpkg.screening:build", checkpoint)
        engine = CamEngine(loaded.model, layers=["backbone.layer4"], methods=["gradcam", "cam"])
        result = engine(torch.randn(2, 3, 128, 128), targets=None)
        assert result.raw["cam"]["backbone.layer4"].shape == (2, 1, 4, 4)
        assert loaded.class_names == ["normal", "finding"]
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m.startswith("userpkg")]:
            del sys.modules[name]


def test_a_run_of_a_timm_model_records_its_weights_and_preprocessing(tmp_path: Path) -> None:
    cache = tmp_path / "hf-cache"
    torch.manual_seed(4)
    path = plant_hf_cache(cache, "timm/resnet18.a1_in1k", timm.create_model("resnet18").state_dict())
    manifest = make_dataset(tmp_path / "data", 3, seed=5)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    _, run = run_zoo_model(tmp_path, manifest, "timm:resnet18", "--methods", "gradcam,cam", env=env, done=3)
    assert run.model_ref == "timm:resnet18.a1_in1k" and run.checkpoint_sha256 == file_sha256(path)
    assert run.layers == ["layer4"]
    assert run.preprocess["interpolation"] == "bicubic" and run.preprocess["resize_to"] == [235, 235]
    assert run.config["weights"]["zoo"] == "timm"
