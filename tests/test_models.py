"""Model references: every kind loads to the right weights, and every mistake says how to fix it."""

from __future__ import annotations

import hashlib
import shutil
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from workers.demo.net import DemoNet
from workers.models import (
    DEMO_CHECKPOINT,
    LoadedModel,
    ModelLoadError,
    Preprocess,
    clear_model_cache,
    file_sha256,
    load_model,
    load_model_cached,
    resolve_layer,
)
from workers.synth import CLASS_NAMES


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _probe(size: int = 64) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    path = tmp_path_factory.mktemp("resnet") / "resnet18_3.pt"
    torch.save(model.state_dict(), path)
    return path, model


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


@pytest.fixture()
def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A throwaway importable module with model factories (unique name per test)."""
    name = f"camaudit_factories_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def build(num_classes=4):
                return nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                     nn.Flatten(), nn.Linear(5, num_classes))

            def build_fixed():
                return nn.Linear(2, 2)

            def not_a_model():
                return 42
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


# --- demo -------------------------------------------------------------------------------------


def test_demo_loads_the_shipped_checkpoint() -> None:
    loaded = load_model("demo")
    assert isinstance(loaded, LoadedModel)
    assert loaded.ref == "demo"
    assert loaded.checkpoint_sha256 == _sha(DEMO_CHECKPOINT) == file_sha256(DEMO_CHECKPOINT)
    assert loaded.class_names == list(CLASS_NAMES)
    assert loaded.num_classes == len(CLASS_NAMES)
    assert loaded.preprocess.size == (128, 128)
    assert loaded.preprocess.resize == "stretch"
    assert all(0 < s < 1 for s in loaded.preprocess.std)
    assert loaded.default_layer == "features"
    assert resolve_layer(loaded.model, "features") is loaded.model.features
    assert not loaded.model.training
    assert next(loaded.model.parameters()).device.type == "cpu"
    with torch.no_grad():
        assert loaded.model(_probe(128)).shape == (2, len(CLASS_NAMES))
    assert DEMO_CHECKPOINT.stat().st_size <= 2 * 1024 * 1024


def test_demo_accepts_another_demo_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = DemoNet(3).eval()
    path = tmp_path / "mine.pt"
    checkpoint = {
        "arch": "demo",
        "state_dict": net.state_dict(),
        "class_names": ["a", "b", "c"],
        "input_size": [96, 64],
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "version": 1,
    }
    torch.save(checkpoint, path)
    loaded = load_model("demo", path)
    assert loaded.class_names == ["a", "b", "c"] and loaded.num_classes == 3
    assert loaded.preprocess == Preprocess(size=(96, 64), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert loaded.checkpoint_sha256 == _sha(path)
    x = _probe(64)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), net(x))
    assert load_model("demo", path, input_size=(128, 128)).preprocess.size == (128, 128)

    checkpoint["arch"] = "resnet"
    torch.save(checkpoint, path)
    with pytest.raises(ModelLoadError, match="not a demo checkpoint"):
        load_model("demo", path)


# --- torchvision ------------------------------------------------------------------------------


@pytest.mark.parametrize("ref", ["resnet18", "torchvision:resnet18"])
def test_torchvision_state_dict_infers_classes_and_reproduces_outputs(
    ref: str, resnet_file: tuple[Path, nn.Module]
) -> None:
    path, original = resnet_file
    loaded = load_model(ref, path)
    assert loaded.ref == "torchvision:resnet18"
    assert loaded.num_classes == 3
    assert loaded.checkpoint_sha256 == _sha(path)
    assert loaded.default_layer == "layer4"
    assert loaded.preprocess.as_dict() == {
        "size": [224, 224],
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "resize": "stretch",
        "interpolation": "bilinear",
        "resize_to": [224, 224],
        "crop_pct": 1.0,
        "fill": [0, 0, 0],
        "crop_rounding": "round",
    }
    x = _probe()
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), original(x), atol=1e-5)


def test_torchvision_wrapped_checkpoint_with_prefixes_and_metadata(
    tmp_path: Path, resnet_file: tuple[Path, nn.Module]
) -> None:
    _, original = resnet_file
    wrapped = {f"module.{k}": v for k, v in original.state_dict().items()}
    path = tmp_path / "wrapped.pt"
    torch.save({"model": wrapped, "class_names": ["cat", "dog", "eel"], "input_size": [160, 160]}, path)
    loaded = load_model("resnet18", path, input_size=(96, 128))
    assert loaded.class_names == ["cat", "dog", "eel"]
    assert loaded.preprocess.size == (96, 128)
    x = _probe()
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), original(x), atol=1e-5)


def test_torchvision_without_checkpoint_uses_defaults() -> None:
    loaded = load_model("mobilenet_v3_small")
    assert loaded.checkpoint_sha256 is None
    assert loaded.num_classes == 1000
    assert loaded.default_layer == "features"
    assert loaded.preprocess.size == (224, 224)
    assert load_model("resnet18", num_classes=7).num_classes == 7


def test_unknown_torchvision_name_lists_the_closest() -> None:
    with pytest.raises(ModelLoadError, match="closest: resnet18") as info:
        load_model("resnet181")
    assert "torchscript" in str(info.value)
    with pytest.raises(ModelLoadError, match="did you mean torchvision"):
        load_model("torchvison:resnet18")


def test_checkpoint_that_does_not_fit_names_the_keys(resnet_file: tuple[Path, nn.Module]) -> None:
    path, _ = resnet_file
    with pytest.raises(ModelLoadError, match=r"missing keys \[layer1\.2\.") as info:
        load_model("resnet34", path)
    assert str(path) in str(info.value)
    with pytest.raises(ModelLoadError, match=r"fc\.weight: checkpoint \(3, 512\) vs model \(5, 512\)"):
        load_model("resnet18", path, num_classes=5)


def test_missing_and_unreadable_checkpoints(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(ModelLoadError, match="not found") as info:
        load_model("resnet18", missing)
    assert str(missing) in str(info.value)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ModelLoadError, match="cannot read checkpoint"):
        load_model("resnet18", garbage)
    not_weights = tmp_path / "not_weights.pt"
    torch.save({"epoch": 3, "lr": 0.1}, not_weights)
    with pytest.raises(ModelLoadError, match="not a state_dict"):
        load_model("resnet18", not_weights)


# --- torchscript ------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_file_loads_in_both_spellings(tmp_path: Path) -> None:
    torch.manual_seed(2)
    net = TinyNet().eval()
    path = tmp_path / "tiny.ts"
    torch.jit.save(torch.jit.trace(net, _probe(32)), str(path))
    by_ref = load_model(f"torchscript:{path}", input_size=(32, 32))
    by_checkpoint = load_model("torchscript", path)
    assert by_ref.ref == by_checkpoint.ref == f"torchscript:{path.resolve()}"
    assert by_ref.checkpoint_sha256 == by_checkpoint.checkpoint_sha256 == _sha(path)
    assert by_ref.preprocess.size == (32, 32) and by_checkpoint.preprocess.size == (224, 224)
    assert by_ref.default_layer is None
    x = _probe(32)
    with torch.no_grad():
        assert torch.allclose(by_ref.model(x), net(x), atol=1e-6)
    assert isinstance(resolve_layer(by_ref.model, "body.0"), torch.jit.ScriptModule)


def test_torchscript_errors(tmp_path: Path, resnet_file: tuple[Path, nn.Module]) -> None:
    with pytest.raises(ModelLoadError, match="needs checkpoint=PATH"):
        load_model("torchscript")
    with pytest.raises(ModelLoadError, match="TorchScript file not found"):
        load_model(f"torchscript:{tmp_path / 'missing.ts'}")
    state_dict_file, _ = resnet_file
    with pytest.raises(ModelLoadError, match="not a TorchScript archive"):
        load_model(f"torchscript:{state_dict_file}")
    with pytest.raises(ModelLoadError, match="not both"):
        load_model(f"torchscript:{state_dict_file}", state_dict_file)


# --- python factories -------------------------------------------------------------------------


def test_python_factory_with_and_without_checkpoint(tmp_path: Path, factory_module: str) -> None:
    loaded = load_model(f"python:{factory_module}:build")
    assert loaded.ref == f"python:{factory_module}:build"
    assert loaded.checkpoint_sha256 is None and loaded.num_classes is None
    assert not loaded.model.training

    assert load_model(f"python:{factory_module}:build", num_classes=2).model[-1].out_features == 2

    torch.manual_seed(3)
    source = load_model(f"python:{factory_module}:build", num_classes=6).model
    nn.init.normal_(source[0].weight)
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": source.state_dict(), "class_names": list("abcdef")}, path)
    reloaded = load_model(f"python:{factory_module}:build", path, num_classes=6)
    assert reloaded.checkpoint_sha256 == _sha(path)
    assert reloaded.class_names == list("abcdef") and reloaded.num_classes == 6
    x = _probe(16)
    with torch.no_grad():
        assert torch.allclose(reloaded.model(x), source(x))


def test_python_factory_errors(factory_module: str) -> None:
    with pytest.raises(ModelLoadError, match="closest: build"):
        load_model(f"python:{factory_module}:biuld")
    with pytest.raises(ModelLoadError, match="returned a int"):
        load_model(f"python:{factory_module}:not_a_model")
    with pytest.raises(ModelLoadError, match="does not accept num_classes"):
        load_model(f"python:{factory_module}:build_fixed", num_classes=3)
    with pytest.raises(ModelLoadError, match="PYTHONPATH"):
        load_model("python:camaudit_no_such_module:build")
    with pytest.raises(ModelLoadError, match=r"python:package\.module:factory"):
        load_model(f"python:{factory_module}")


# --- layers, devices, cache -------------------------------------------------------------------


def test_resolve_layer_dotted_negative_and_unknown() -> None:
    model = torchvision.models.resnet18(weights=None)
    assert resolve_layer(model, "layer4") is model.layer4
    assert resolve_layer(model, "layer4.1.conv2") is model.layer4[1].conv2
    assert resolve_layer(model, "layer4.-1") is model.layer4[1]
    with pytest.raises(ModelLoadError, match="closest: layer4") as info:
        resolve_layer(model, "layer5")
    assert "'layer5'" in str(info.value)
    with pytest.raises(ModelLoadError, match="non-empty"):
        resolve_layer(model, "")
    with pytest.raises(ModelLoadError):
        resolve_layer(model, "layer4.7")


def test_bad_devices_and_options_fail_before_loading() -> None:
    with pytest.raises(ModelLoadError, match="'cpu', 'cuda'"):
        load_model("demo", device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            load_model("demo", device="cuda")
    with pytest.raises(ModelLoadError, match="num_classes"):
        load_model("resnet18", num_classes=0)
    with pytest.raises(ModelLoadError, match="input_size"):
        load_model("demo", input_size=(128, -1))
    assert load_model("demo", device="auto").model is not None


def test_cache_reuses_models_until_the_checkpoint_changes(tmp_path: Path) -> None:
    clear_model_cache()
    path = tmp_path / "demo_copy.pt"
    shutil.copyfile(DEMO_CHECKPOINT, path)
    first = load_model_cached("demo", path)
    assert load_model_cached("demo", path) is first
    assert load_model_cached("demo", str(path), device="cpu") is first

    # Same path, new content: a fresh model with the new hash.
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["state_dict"] = {k: v.clone() for k, v in checkpoint["state_dict"].items()}
    checkpoint["state_dict"]["fc.bias"] += 1.0
    torch.save(checkpoint, path)
    second = load_model_cached("demo", path)
    assert second is not first
    assert second.checkpoint_sha256 == _sha(path) != first.checkpoint_sha256
    assert torch.allclose(second.model.fc.bias, first.model.fc.bias + 1.0)
    clear_model_cache()


def test_checkpoint_metadata_names_its_training_preprocessing(
    tmp_path: Path, resnet_file: tuple[Path, nn.Module]
) -> None:
    path, _ = resnet_file
    state = torch.load(path, weights_only=True)
    with_meta = tmp_path / "meta.pt"
    torch.save(
        {"state_dict": state, "resize": "center-crop", "crop_pct": 0.875, "interpolation": "bicubic"},
        with_meta,
    )
    pre = load_model("torchvision:resnet18", with_meta).preprocess
    assert (pre.resize, pre.size, pre.fit, pre.interpolation) == (
        "center-crop",
        (224, 224),
        (256, 256),
        "bicubic",
    )
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": state, "resize": "centre-crap"}, bad)
    with pytest.raises(ModelLoadError, match="did you mean center-crop"):
        load_model("torchvision:resnet18", bad)
