"""``top_regions`` and ``camaudit top``: filters give what a plain scan of the rows gives, via the index."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from scheduler.cli import app
from scheduler.query import QueryError, explain_top_regions, top_regions
from schema.db import get_engine
from tests.test_results_pg import CLASS_NAMES, SeededRun, database_for, seed_run, shard_rows, write_shard


class Written:
    """The rows a run got, kept in Python to compute expected answers independently of SQL."""

    def __init__(self, run: SeededRun, classes: tuple[int, ...] = (0, 1, 2)) -> None:
        self.run = run
        self.items: dict[int, dict[str, Any]] = {}
        self.patches: list[dict[str, Any]] = []
        for n, item_id in enumerate(run.item_ids):
            self.items[item_id] = {"label": CLASS_NAMES[n % len(CLASS_NAMES)]}
        for shard_id in run.shard_ids:
            rows = shard_rows(run, shard_id, classes=classes)
            write_shard(run.database_url, rows)
            for item in rows.items:
                self.items[item["id"]].update(pred_class=item["pred_class"], correct=item["correct"])
            self.patches.extend(row for _, row in rows.patches)

    def expected(
        self, target: int, method: str, limit: int = 10, **want: Any
    ) -> list[tuple[int, int, float]]:
        def keep(p: dict[str, Any]) -> bool:
            item = self.items[p["item_id"]]
            return (
                p["target_class"] == target
                and p["method"] == method
                and want.get("layer", p["layer"]) == p["layer"]
                and want.get("label", item["label"]) == item["label"]
                and want.get("pred_class", item["pred_class"]) == item["pred_class"]
                and want.get("correct", item["correct"]) == item["correct"]
                and want.get("min_score", p["score"]) <= p["score"] <= want.get("max_score", p["score"])
            )

        found = sorted((p for p in self.patches if keep(p)), key=lambda p: -p["score"])
        return [(p["item_id"], p["rank"], p["score"]) for p in found[:limit]]


def got(regions: list[Any]) -> list[tuple[int, int, float]]:
    return [(r.item_id, r.rank, r.score) for r in regions]


@pytest.fixture(params=["sqlite", "postgresql"])
def written(request: pytest.FixtureRequest, tmp_path: Path) -> Written:
    url = database_for(request, tmp_path)
    run = seed_run(url, "run-a", n_items=40, shard_size=16, layers=("layer3", "layer4"))
    other = seed_run(url, "run-b", n_items=8, shard_size=8)
    Written(other)  # rows of another run that no answer may include
    return Written(run)


def test_plain_question_returns_the_best_scores_of_one_class_and_method(written: Written) -> None:
    url = written.run.database_url
    regions = top_regions(url, "run-a", "square", "cam", limit=15)
    assert got(regions) == written.expected(1, "cam", limit=15)
    assert {r.class_name for r in regions} == {"square"}
    first = regions[0]
    assert first.label == written.items[first.item_id]["label"]
    assert first.pred_class == written.items[first.item_id]["pred_class"]
    assert first.correct == written.items[first.item_id]["correct"]


@pytest.mark.parametrize(
    ("filters", "want"),
    [
        ({"label": "star"}, {"label": "star"}),
        ({"predicted": "triangle"}, {"pred_class": 2}),
        ({"predicted": 3}, {"pred_class": 3}),
        ({"correct": True}, {"correct": True}),
        ({"correct": False}, {"correct": False}),
        ({"min_score": 0.1, "max_score": 0.2}, {"min_score": 0.1, "max_score": 0.2}),
        ({"layer": "layer3", "correct": False, "max_score": 0.25}, {"layer": "layer3", "correct": False}),
    ],
)
def test_filters_keep_exactly_the_matching_regions(
    written: Written, filters: dict[str, Any], want: dict[str, Any]
) -> None:
    if "max_score" in filters:
        want.setdefault("max_score", filters["max_score"])
    expected = written.expected(0, "gradcam", limit=12, **want)
    assert expected, "the fixture must have rows that pass this filter"
    regions = top_regions(written.run.database_url, "run-a", 0, "gradcam", limit=12, **filters)
    assert got(regions) == expected


def test_mistakes_are_answered_with_the_closest_valid_names(written: Written) -> None:
    url = written.run.database_url
    with pytest.raises(QueryError, match=r"no run 'run-c'.*did you mean run-[ab], run-[ab]"):
        top_regions(url, "run-c", "circle", "gradcam")
    with pytest.raises(
        QueryError, match=r"no method 'gradcm'; did you mean gradcam.*its methods: gradcam, cam"
    ):
        top_regions(url, "run-a", "circle", "gradcm")
    with pytest.raises(QueryError, match=r"unknown class 'sqare'; did you mean square"):
        top_regions(url, "run-a", "sqare", "gradcam")
    with pytest.raises(QueryError, match=r"unknown class 'trangle'; did you mean triangle"):
        top_regions(url, "run-a", "circle", "gradcam", predicted="trangle")
    with pytest.raises(QueryError, match=r"no layer 'layer5'; did you mean layer[34], layer[34]"):
        top_regions(url, "run-a", "circle", "gradcam", layer="layer5")
    with pytest.raises(QueryError, match=r"label 'strr'; did you mean star"):
        top_regions(url, "run-a", "circle", "gradcam", label="strr")
    with pytest.raises(QueryError, match=r"min score 0.5 is above max score 0.1"):
        top_regions(url, "run-a", "circle", "gradcam", min_score=0.5, max_score=0.1)
    with pytest.raises(QueryError, match=r"limit must be within 1\.\.100000, got 0"):
        top_regions(url, "run-a", "circle", "gradcam", limit=0)
    # A known label that no region passes is an empty answer, not an error.
    assert top_regions(url, "run-a", "circle", "gradcam", label="star", min_score=5.0) == []


def test_top_command_prints_json_and_csv(written: Written) -> None:
    url = written.run.database_url
    expected = written.expected(2, "gradcam", limit=5, correct=False)
    base = ["top", "--run", "run-a", "--class", "triangle", "--limit", "5", "--incorrect"]
    runner = CliRunner()

    as_json = runner.invoke(app, [*base, "--json", "--database-url", url])
    assert as_json.exit_code == 0, as_json.output
    rows = json.loads(as_json.stdout)
    assert [(r["item_id"], r["rank"], r["score"]) for r in rows] == expected
    assert all(r["correct"] is False and r["class_name"] == "triangle" for r in rows)

    as_csv = runner.invoke(app, [*base, "--csv", "--database-url", url])
    assert as_csv.exit_code == 0, as_csv.output
    table = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [(int(r["item_id"]), int(r["rank"]), float(r["score"])) for r in table] == expected

    both = runner.invoke(app, [*base, "--csv", "--json", "--database-url", url])
    assert both.exit_code == 2
    wrong = runner.invoke(app, [*base, "--method", "gradcm", "--database-url", url])
    assert wrong.exit_code == 2


def test_postgresql_answers_the_common_question_from_the_index(postgres_url: str) -> None:
    """Backward scan of ix_patch_scores_top, stopping at the limit: no sequential scan, no full sort.

    On PostgreSQL the index is the run's partition's copy of it, and no other partition is read.
    """
    from schema.db import upgrade

    upgrade(postgres_url)
    for run_id, n_items in (("big", 1200), ("other", 400)):
        run = seed_run(postgres_url, run_id, n_items=n_items, shard_size=400)
        for shard_id in run.shard_ids:
            write_shard(postgres_url, shard_rows(run, shard_id, top_patches=5, classes=(0, 1, 2, 3)))
    with get_engine(postgres_url).begin() as conn:
        conn.execute(text("ANALYZE"))
    plans = [
        explain_top_regions(postgres_url, "big", "circle", "gradcam", limit=100),
        explain_top_regions(postgres_url, "big", "circle", "gradcam", limit=100, min_score=0.05),
        explain_top_regions(postgres_url, "big", "circle", "gradcam", limit=10, correct=False),
    ]
    for plan in plans:
        index = "patch_scores_r_big_run_id_method_target_class_score_idx"
        assert f"Index Scan Backward using {index} on patch_scores_r_big patch_scores" in plan, plan
        assert "Seq Scan on patch_scores" not in plan, plan
        assert "_r_other" not in plan, plan
        assert "Presorted Key: patch_scores.score" in plan, plan
    measured = explain_top_regions(postgres_url, "big", "circle", "gradcam", limit=100, analyze=True)
    scanned = next(line for line in measured.splitlines() if "Index Scan Backward" in line)
    walked = re.search(r"actual time=\S+ rows=(\d+) loops=1", scanned)
    # The walk stops right after the limit (an extra row settles ties) of 6,000 rows of this class.
    assert walked is not None and 100 <= int(walked.group(1)) <= 110, measured


def test_explain_needs_postgresql(tmp_path: Path) -> None:
    from schema.db import upgrade

    url = f"sqlite:///{tmp_path / 'q.db'}"
    upgrade(url)
    seed_run(url, "r1", n_items=2)
    with pytest.raises(QueryError, match="reads PostgreSQL plans"):
        explain_top_regions(url, "r1", "circle", "gradcam")
