"""Binary, multi-label and custom scalar heads, end to end in embedded mode.

The models come from ``python:tests.heads:...`` factories with a checkpoint that carries the
class names; every run goes through the CLI like a user's.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import select

from scheduler.plan import PlanError, plan_run
from scheduler.query import prediction_name, top_regions
from scheduler.web import create_app
from schema.db import session_scope
from schema.models import Heatmap, Item, Run
from schema.payloads import RunSpec
from schema.settings import Settings
from tests.heads import SHAPES, binary_net, multilabel_net
from tests.test_e2e_embedded import run_cli
from workers.synth import make_dataset

METHODS = "gradcam,cam"


def _checkpoint(path: Path, model: torch.nn.Module, names: list[str]) -> Path:
    torch.save({"state_dict": model.state_dict(), "class_names": names, "input_size": [64, 64]}, path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("heads"), 8, seed=5, min_size=64, max_size=96)


def _run(tmp_path: Path, source: Path, model: str, checkpoint: Path, *extra: str) -> tuple[str, str]:
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    proc = run_cli(
        "run",
        "--source",
        str(source),
        "--model",
        model,
        "--checkpoint",
        str(checkpoint),
        "--methods",
        METHODS,
        "--layer",
        "features",
        "--database-url",
        db,
        "--storage-url",
        str(tmp_path / "out"),
        "--json",
        *extra,
    )
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["status"] == "finished", status
    return db, status["run_id"]


def _explained(db: str, run_id: str) -> tuple[Run, dict[int, Item], dict[int, dict[str, list[Heatmap]]]]:
    with session_scope(db) as s:
        run = s.get(Run, run_id)
        assert run is not None
        s.expunge(run)
        items = {i.id: i for i in s.execute(select(Item).where(Item.run_id == run_id)).scalars()}
        maps: dict[int, dict[str, list[Heatmap]]] = defaultdict(lambda: defaultdict(list))
        for h in s.execute(select(Heatmap).where(Heatmap.run_id == run_id)).scalars():
            maps[h.item_id][h.method].append(h)
        s.expunge_all()
    return run, items, maps


def _logit(probability: float) -> float:
    return math.log(probability / (1 - probability))


def test_binary_head_explains_its_positive_logit_by_default(data: Path, tmp_path: Path) -> None:
    checkpoint = _checkpoint(tmp_path / "binary.pt", binary_net(), ["lesion"])
    db, run_id = _run(tmp_path, data, "python:tests.heads:binary_net", checkpoint)
    run, items, maps = _explained(db, run_id)
    assert run.target_spec == "positive"
    assert run.class_names == ["lesion"]
    assert len(items) == 8 and all(i.status == "done" for i in items.values())
    for item in items.values():
        (prediction,) = item.predictions
        assert (prediction["class"], prediction["name"]) == (0, "lesion")
        assert 0 < prediction["prob"] < 1  # a sigmoid, not the softmax of one logit (always 1)
        for method in METHODS.split(","):
            (heatmap,) = maps[item.id][method]
            assert heatmap.target_class == 0
            assert heatmap.target_score == pytest.approx(_logit(prediction["prob"]), abs=1e-4)


@pytest.mark.slow
def test_a_binary_head_predicts_positive_exactly_when_its_logit_is_on_both_paths(
    data: Path, tmp_path: Path
) -> None:
    """``positive`` takes the serial path, ``top1`` the overlapped one: both give the sigmoid and
    the decision (class 1 when the logit is above 0), never the softmax of one logit (1.0)."""
    model = binary_net()
    with torch.no_grad():  # spread the logits around 0 so both decisions occur
        model.head.weight.mul_(50.0)
        model.head.bias.mul_(50.0).sub_(6.825)
    checkpoint = _checkpoint(tmp_path / "binary.pt", model, ["circle"])
    decided: dict[str, dict[str, tuple[int, float]]] = {}
    for spec in ("positive", "top1"):
        db, run_id = _run(
            tmp_path / spec, data, "python:tests.heads:binary_net", checkpoint, "--targets", spec
        )
        _, items, maps = _explained(db, run_id)
        decided[spec] = {}
        for item in items.values():
            (prediction,) = item.predictions
            logit = maps[item.id]["gradcam"][0].target_score
            assert prediction["prob"] == pytest.approx(1 / (1 + math.exp(-logit)), abs=1e-5)
            assert item.pred_class == int(logit > 0), (spec, logit, item.predictions)
            assert item.correct == ((logit > 0) == (item.label == "circle"))
            decided[spec][item.source_uri] = (item.pred_class, prediction["prob"])
        assert {pred for pred, _ in decided[spec].values()} == {0, 1}
        run = _explained(db, run_id)[0]
        assert (prediction_name(run, 1), prediction_name(run, 0)) == ("circle", "not circle")
        for asked, decision in (("circle", 1), ("0", 0)):  # the name means the positive decision
            regions = top_regions(db, run_id, 0, "gradcam", limit=100, predicted=asked)
            positives = sum(pred == decision for pred, _ in decided[spec].values())
            assert regions and all(r.pred_class == decision for r in regions)
            assert len({r.item_id for r in regions}) == positives
    web = TestClient(create_app(db), base_url="http://localhost")
    for item in _explained(db, run_id)[1].values():
        page = " ".join(web.get(f"/items/{item.id}").text.split())
        assert ("<b>Predicted</b>" + ("circle" if item.pred_class else "not circle")) in page
    for uri, (pred, prob) in decided["positive"].items():
        assert decided["top1"][uri][0] == pred
        assert decided["top1"][uri][1] == pytest.approx(prob, abs=1e-6)


def test_custom_scalar_target_from_a_python_function(data: Path, tmp_path: Path) -> None:
    checkpoint = _checkpoint(tmp_path / "binary.pt", binary_net(), ["lesion"])
    db, run_id = _run(
        tmp_path,
        data,
        "python:tests.heads:binary_net",
        checkpoint,
        "--methods",
        "gradcam",
        "--targets",
        "python:tests.heads:mean_logit",
    )
    run, items, maps = _explained(db, run_id)
    assert run.target_spec == "python:tests.heads:mean_logit"
    for item in items.values():
        (heatmap,) = maps[item.id]["gradcam"]
        assert heatmap.target_class == -1
        assert heatmap.target_score == pytest.approx(_logit(item.predictions[0]["prob"]), abs=1e-4)


@pytest.fixture(scope="module")
def multilabel_manifest(data: Path) -> tuple[Path, dict[str, list[str]]]:
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    labels: dict[str, list[str]] = {}
    for index, row in enumerate(rows):
        labels[row["uri"]] = [SHAPES[(index + k) % len(SHAPES)] for k in range(1 + index % 3)]
    labels[rows[-1]["uri"]] = ["circle", "hexagon"]
    manifest = data.parent / "multilabel.jsonl"
    manifest.write_text(
        "".join(json.dumps({"uri": uri, "label": names}) + "\n" for uri, names in labels.items())
    )
    return manifest, labels


def test_multilabel_head_explains_every_ground_truth_label(
    multilabel_manifest: tuple[Path, dict[str, list[str]]], tmp_path: Path
) -> None:
    manifest, labels = multilabel_manifest
    checkpoint = _checkpoint(tmp_path / "multi.pt", multilabel_net(), SHAPES)
    db, run_id = _run(
        tmp_path, manifest, "python:tests.heads:multilabel_net", checkpoint, "--targets", "labels"
    )
    _, items, maps = _explained(db, run_id)
    by_name = {Path(i.source_uri).name: i for i in items.values()}
    widths = set()
    for uri, names in labels.items():
        item = by_name[Path(uri).name]
        if "hexagon" in names:
            assert item.status == "failed" and "'hexagon' is not one of the model's classes" in item.error
            continue
        assert item.status == "done", item.error
        expected = sorted(SHAPES.index(name) for name in names)
        widths.add(len(expected))
        for method in METHODS.split(","):
            assert sorted(h.target_class for h in maps[item.id][method]) == expected
    assert widths == {1, 2, 3}  # a batch with rows of different lengths


def test_multilabel_head_explains_classes_above_a_threshold(data: Path, tmp_path: Path) -> None:
    checkpoint = _checkpoint(tmp_path / "multi.pt", multilabel_net(), SHAPES)
    db, run_id = _run(
        tmp_path,
        data,
        "python:tests.heads:multilabel_net",
        checkpoint,
        "--targets",
        "above:0.5",
        "--max-targets",
        "3",
    )
    run, items, maps = _explained(db, run_id)
    assert run.target_spec == "above:0.5"
    counts = []
    for item in items.values():
        assert item.status == "done", item.error
        probs = {p["class"]: p["prob"] for p in item.predictions}
        assert len(probs) == len(SHAPES)
        passing = sorted((c for c, p in probs.items() if p > 0.5), key=lambda c: -probs[c])
        counts.append(len(passing))
        for method in METHODS.split(","):
            chosen = sorted(maps[item.id][method], key=lambda h: -h.target_score)
            assert [h.target_class for h in chosen] == passing[:3]
    assert max(counts) > 3 and min(counts) < 3, counts  # the cap and a short row both happen


@pytest.mark.parametrize(
    ("targets", "words"),
    [
        ("python:tests.heads:mean_logits", "closest: mean_logit"),
        ("python:tests.no_such_module:fn", "cannot import module 'tests.no_such_module'"),
        ("python:tests.heads:SHAPES", "is a list, not a callable"),
        ("positive", "single logit of a binary head, but the model has 5 outputs"),
    ],
)
def test_bad_targets_fail_at_plan_time(data: Path, tmp_path: Path, targets: str, words: str) -> None:
    db = tmp_path / "runs.db"
    settings = Settings(database_url=f"sqlite:///{db}", storage_url=str(tmp_path / "out"))
    spec = RunSpec(source=str(data), model="demo", targets=targets)
    with pytest.raises(PlanError) as info:
        plan_run(spec, settings)
    assert words in str(info.value)
    assert not db.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("targets", ["above:1.5", "above:0", "above:half", "above:"])
def test_bad_threshold_is_refused(targets: str) -> None:
    with pytest.raises(ValidationError, match="strictly between 0 and 1"):
        RunSpec(source="x", targets=targets)
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        RunSpec(source="x", targets="above:0.5", max_targets=0)
    with pytest.raises(ValidationError, match="max_targets caps 'above:T' targets"):
        RunSpec(source="x", targets="topk:2", max_targets=2)
