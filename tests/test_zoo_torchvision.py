"""``torchvision:NAME@WEIGHTS``: torchvision's weights API, from a planted hub cache, never a download."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

from scheduler.plan import plan_run
from schema.payloads import RunSpec
from schema.settings import Settings
from tests.test_e2e_embedded import run_cli
from tests.zoo_support import plant_torchvision, run_zoo_model
from workers.images import decode_pixels, normalise_batch, stack_pixels
from workers.models import ModelLoadError, clear_model_cache, file_sha256, load_model
from workers.runtime import CheckpointChangedError
from workers.shard import explain_shard
from workers.synth import make_dataset
from workers.zoo import tv_weights


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def test_pretrained_weights_bring_their_preprocessing_categories_and_file(torch_home: Path) -> None:
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    path, planted = plant_torchvision(torch_home, "resnet18", weights)
    loaded = load_model("torchvision:resnet18@DEFAULT")
    assert loaded.ref == "torchvision:resnet18@IMAGENET1K_V1"  # DEFAULT pinned to what it meant
    assert loaded.class_names is not None and loaded.class_names[207] == "golden retriever"
    assert loaded.checkpoint_sha256 == file_sha256(path)
    assert loaded.weights == {
        "zoo": "torchvision",
        "weights": "ResNet18_Weights.IMAGENET1K_V1",
        "file": str(path),
        "sha256": file_sha256(path),
        "url": weights.url,
    }
    assert loaded.default_layer == "layer4"
    pre = loaded.preprocess
    assert (pre.resize, pre.size, pre.fit, pre.interpolation) == (
        "center-crop",
        (224, 224),
        (256, 256),
        "bilinear",
    )
    # The whole path, decode to logits, equals the reference pipeline with the planted model.
    buffer = io.BytesIO()
    Image.effect_mandelbrot((300, 200), (-2, -1, 1, 1), 80).convert("RGB").save(buffer, format="PNG")
    ours = normalise_batch(stack_pixels([decode_pixels(buffer.getvalue(), pre)]), pre.mean, pre.std)
    theirs = weights.transforms()(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))[None]
    assert torch.equal(ours, theirs)
    with torch.no_grad():
        # (contiguous: the batch is channels-last, whose convolution kernels round differently)
        assert torch.equal(loaded.model(ours.contiguous()), planted(theirs))


def test_the_model_is_built_by_torchvision_with_its_weight_specific_arguments(torch_home: Path) -> None:
    # Inception with weights gets transform_input=True from torchvision's builder: built by hand
    # with weights=None it would not, and its outputs would differ.
    weights = torchvision.models.Inception_V3_Weights.IMAGENET1K_V1
    torch.manual_seed(0)
    reference = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    path = torch_home / "hub" / "checkpoints" / os.path.basename(weights.url)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(reference.state_dict(), path)
    loaded = load_model("torchvision:inception_v3@IMAGENET1K_V1")
    assert loaded.model.transform_input is True and loaded.preprocess.size == (299, 299)
    assert loaded.preprocess.fit == (342, 342)


def test_wrong_names_and_missing_files_fail_with_what_would_be_right(torch_home: Path) -> None:
    with pytest.raises(ModelLoadError, match="closest: resnet18"):
        load_model("torchvision:resnt18@DEFAULT")
    with pytest.raises(ModelLoadError, match=r"no weights 'IMAGENET1K_V3'; closest: IMAGENET1K_V1.*DEFAULT"):
        load_model("torchvision:resnet18@IMAGENET1K_V3")
    with pytest.raises(ModelLoadError, match="not weights of torchvision:resnet18"):
        load_model("torchvision:resnet18@ResNet50_Weights.IMAGENET1K_V2")
    expected = torch_home / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    with pytest.raises(ModelLoadError, match=f"expected {expected}. camaudit never downloads"):
        load_model("torchvision:resnet50@IMAGENET1K_V2")
    assert not expected.exists()
    with pytest.raises(ModelLoadError, match="either @WEIGHTS or a checkpoint"):
        load_model("torchvision:resnet18@DEFAULT", checkpoint=__file__)


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (str(self.marker),)


def test_a_hub_file_that_would_run_code_is_refused_unopened(torch_home: Path, tmp_path: Path) -> None:
    """torch.hub reads cached files with weights_only=False; camaudit forces the safe loader."""
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    path = tv_weights.weights_file(weights)
    path.parent.mkdir(parents=True, exist_ok=True)
    marker = tmp_path / "code-ran"
    torch.save({"fc.weight": torch.zeros(1), "payload": _RunsCodeWhenUnpickled(marker)}, path)
    with pytest.raises(ModelLoadError, match=r"cannot load weights ResNet18_Weights\.IMAGENET1K_V1"):
        load_model("torchvision:resnet18@IMAGENET1K_V1")
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # the switch is only on during the load


def test_a_run_with_pretrained_weights_records_them_and_answers_by_category(tmp_path: Path) -> None:
    home = tmp_path / "torch-home"
    path, _ = plant_torchvision(home, "resnet18", torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
    manifest = make_dataset(tmp_path / "data", 4, seed=3)
    env = {**os.environ, "TORCH_HOME": str(home)}
    db, run = run_zoo_model(
        tmp_path, manifest, "torchvision:resnet18@DEFAULT", "--methods", "gradcam,cam",
        "--targets", "classes:207,1", env=env, done=4,
    )  # fmt: skip
    assert run.model_ref == "torchvision:resnet18@IMAGENET1K_V1"
    assert run.checkpoint_sha256 == file_sha256(path)
    assert run.config["weights"]["weights"] == "ResNet18_Weights.IMAGENET1K_V1"
    assert run.preprocess["resize"] == "center-crop" and run.preprocess["resize_to"] == [256, 256]
    assert run.class_names is not None and len(run.class_names) == 1000
    top = run_cli(
        "top",
        "--run",
        run.id,
        "--class",
        "golden retriever",
        "--method",
        "cam",
        "--json",
        "--database-url",
        db,
        env=env,
    )
    assert top.returncode == 0, top.stderr
    regions = json.loads(top.stdout)
    assert regions and all(r["class_name"] == "golden retriever" for r in regions)
    wrong = run_cli("top", "--run", run.id, "--class", "golden retreiver", "--database-url", db)
    assert wrong.returncode != 0 and "golden retriever" in wrong.stderr + wrong.stdout


def test_a_worker_whose_cache_holds_other_weights_refuses_the_shard(torch_home: Path, tmp_path: Path) -> None:
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    plant_torchvision(torch_home, "resnet18", weights, seed=0)
    manifest = make_dataset(tmp_path / "data", 2, seed=4)
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'runs.db'}", storage_url=str(tmp_path / "maps"))
    planned = plan_run(
        RunSpec(source=str(manifest), model="torchvision:resnet18@DEFAULT", methods=["cam"]), settings
    )
    clear_model_cache()
    # this "worker" has other weights under the same name
    plant_torchvision(torch_home, "resnet18", weights, seed=1)
    with pytest.raises(CheckpointChangedError, match="planned with sha256"):
        explain_shard(planned.run_id, planned.shard_ids[0], settings)
