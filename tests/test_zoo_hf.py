"""``hf:PATH_OR_NAME``: transformers image classifiers saved with save_pretrained, never downloaded."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from tests.test_e2e_embedded import run_cli
from tests.zoo_support import hf_snapshot, run_zoo_model
from workers.cam import CamEngine
from workers.images import decode_pixels, normalise_batch, stack_pixels
from workers.models import ModelLoadError, file_sha256, load_model
from workers.synth import make_dataset

LABELS = {0: "cat", 1: "dog", 2: "bird"}
IDS = {"id2label": LABELS, "label2id": {v: k for k, v in LABELS.items()}, "num_labels": 3}


def _family(kind: str) -> tuple[Any, Any, tuple[int, int]]:
    """A tiny model, its image processor and the raw map grid its default layer gives at 64 px."""
    if kind == "vit":
        config = transformers.ViTConfig(
            image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, **IDS,
        )  # fmt: skip
        return (
            transformers.ViTForImageClassification(config),
            transformers.ViTImageProcessor(size={"height": 64, "width": 64}),
            (4, 4),
        )
    if kind == "convnext":
        config = transformers.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], **IDS)
        return (
            transformers.ConvNextForImageClassification(config),
            transformers.ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.875),
            (2, 2),
        )
    if kind == "swin":
        config = transformers.SwinConfig(
            image_size=64, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4, **IDS
        )
        return (
            transformers.SwinForImageClassification(config),
            transformers.ViTImageProcessor(size={"height": 64, "width": 64}, resample=3),
            (8, 8),
        )
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], **IDS)
    return (
        transformers.ResNetForImageClassification(config),
        transformers.ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.875),
        (8, 8),
    )


def save_family(kind: str, folder: Path, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    model, processor, _ = _family(kind)
    model.eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model


def _png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["vit", "convnext", "swin", "resnet"])
def test_each_family_loads_with_its_processor_labels_and_a_grid_map(kind: str, tmp_path: Path) -> None:
    folder = tmp_path / kind
    reference = save_family(kind, folder)
    loaded = load_model(f"hf:{folder}")
    assert loaded.class_names == ["cat", "dog", "bird"] and loaded.num_classes == 3
    assert loaded.checkpoint_sha256 == file_sha256(folder / "model.safetensors")
    pre = loaded.preprocess
    pil_processor = transformers.AutoImageProcessor.from_pretrained(folder, backend="pil")
    fast_processor = transformers.AutoImageProcessor.from_pretrained(folder)
    for n, (width, height) in enumerate([(90, 64), (64, 97), (200, 130), (41, 33)]):
        data = _png(width, height, n)
        ours = normalise_batch(stack_pixels([decode_pixels(data, pre)]), pre.mean, pre.std)
        image = Image.open(io.BytesIO(data)).convert("RGB")
        theirs = pil_processor(images=image, return_tensors="pt")["pixel_values"]
        assert torch.equal(ours, theirs), f"{kind} {width}x{height}"
        # The default (torchvision tensor) backend resizes with its own antialiasing: close, not equal.
        fast = fast_processor(images=image, return_tensors="pt")["pixel_values"]
        assert ours.shape == fast.shape and float((ours - fast).abs().mean()) < 0.05
        with torch.no_grad():
            logits = loaded.model(ours)
            assert isinstance(logits, torch.Tensor)
            assert torch.equal(logits, reference(pixel_values=ours).logits)
    assert loaded.default_layer is not None
    engine = CamEngine(
        loaded.model, layers=[loaded.default_layer], methods=["gradcam"], reshape=loaded.reshape
    )
    result = engine(torch.randn(2, 3, *pre.size), targets=None)
    _, _, grid = _family(kind)
    assert result.raw["gradcam"][loaded.default_layer].shape == (2, 1, *grid)


def test_the_convnext_processor_crops_the_way_transformers_does(tmp_path: Path) -> None:
    save_family("convnext", tmp_path / "c")
    pre = load_model(f"hf:{tmp_path / 'c'}").preprocess
    # 64 / 0.875 -> 73: shorter side 73, centre crop 64 with the margin floored (9 -> 4, not 4.5 -> 4)
    assert (pre.resize, pre.fit, pre.size, pre.crop_rounding) == ("center-crop", (73, 73), (64, 64), "floor")
    assert pre.transform(146, 73).offset == (-41, -4)


def test_a_model_in_the_local_cache_is_found_by_name_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    save_family("vit", tmp_path / "saved")
    shutil.copytree(tmp_path / "saved", hf_snapshot(cache, "acme/tiny-vit"), dirs_exist_ok=True)
    loaded = load_model("hf:acme/tiny-vit")
    assert loaded.ref == "hf:acme/tiny-vit" and loaded.class_names == ["cat", "dog", "bird"]
    with pytest.raises(ModelLoadError, match=r"closest cached: acme/tiny-vit.*never downloads"):
        load_model("hf:acme/tiny-vt")


def test_folders_that_cannot_work_say_why(tmp_path: Path) -> None:
    save_family("vit", tmp_path / "no-processor")
    (tmp_path / "no-processor" / "preprocessor_config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"no preprocessor_config\.json"):
        load_model(f"hf:{tmp_path / 'no-processor'}")
    text_model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2))
    text_model.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ModelLoadError, match="'gpt2' model, not an image classifier"):
        load_model(f"hf:{tmp_path / 'gpt2'}")
    with pytest.raises(ModelLoadError, match="pass no checkpoint"):
        load_model(f"hf:{tmp_path / 'no-processor'}", checkpoint=__file__)


def test_a_run_of_a_hugging_face_model_answers_by_its_labels(tmp_path: Path) -> None:
    folder = tmp_path / "vit"
    save_family("vit", folder)
    manifest = make_dataset(tmp_path / "data", 3, seed=8)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    db, run = run_zoo_model(
        tmp_path, manifest, f"hf:{folder}", "--methods", "gradcam", "--targets", "all", "--patch-size", "16",
        env=env, done=3,
    )  # fmt: skip
    assert run.model_ref == f"hf:{folder.resolve()}"  # a folder is recorded by its absolute path
    assert run.class_names == ["cat", "dog", "bird"] and run.layers == ["vit.layers.1.layernorm_before"]
    assert run.preprocess["size"] == [64, 64] and run.config["weights"]["zoo"] == "hf"
    top = run_cli("top", "--run", run.id, "--class", "dog", "--method", "gradcam", "--json",
                  "--database-url", db)  # fmt: skip
    assert top.returncode == 0, top.stderr
    assert {r["class_name"] for r in json.loads(top.stdout)} == {"dog"}
