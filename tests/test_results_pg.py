"""Shard writes are idempotent on SQLite and PostgreSQL, whichever statement carries them.

The helpers at the top (``seed_run``, ``shard_rows``, ``write_shard``) build a run's rows the
way the planner and the shard worker do, without a model, so the query, gc and render
tests can share them.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, insert, select, text

from schema.db import get_engine, session_scope, upgrade
from schema.models import Heatmap, Item, PatchScore, Run, RunStatus, Shard
from workers import results

CLASS_NAMES = ["circle", "square", "triangle", "star"]


@dataclass
class SeededRun:
    run_id: str
    database_url: str
    output_uri: str
    methods: list[str]
    layers: list[str]
    shard_ids: list[int]
    items_by_shard: dict[int, list[int]] = field(default_factory=dict)

    @property
    def item_ids(self) -> list[int]:
        return [i for ids in self.items_by_shard.values() for i in ids]


@dataclass
class Rows:
    items: list[dict[str, Any]]
    heatmaps: list[dict[str, Any]]
    patches: list[tuple[tuple[int, str, str, int], dict[str, Any]]]


def database_for(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """``sqlite`` or ``postgresql`` by the fixture param, migrated to the newest schema."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'results.db'}"
    else:
        url = str(request.getfixturevalue("postgres_url"))
    upgrade(url)
    return url


def seed_run(
    database_url: str,
    run_id: str,
    *,
    output_uri: str = "camaudit-output",
    n_items: int = 6,
    shard_size: int = 3,
    methods: Sequence[str] = ("gradcam", "cam"),
    layers: Sequence[str] = ("layer4",),
    source_uri: str = "data/{n}.png",
    labels: Sequence[str] = CLASS_NAMES,
    status: str = RunStatus.FINISHED,
) -> SeededRun:
    """A run with its shards and items, as ``scheduler.plan`` writes them."""
    n_shards = (n_items + shard_size - 1) // shard_size
    with session_scope(database_url) as session:
        session.add(
            Run(
                id=run_id,
                name=f"test {run_id}",
                status=status,
                model_ref="demo",
                methods=list(methods),
                layers=list(layers),
                target_spec="top1",
                source_uri=os.path.dirname(source_uri) or "data",
                output_uri=output_uri,
                preprocess={"size": [32, 32]},
                patch_size=8,
                top_patches=3,
                class_names=list(CLASS_NAMES),
                config={},
                versions={},
                n_items=n_items,
                n_shards=n_shards,
            )
        )
        session.flush()
        shard_ids = list(
            session.execute(
                insert(Shard).returning(Shard.id, sort_by_parameter_order=True),
                [
                    {"run_id": run_id, "index": s, "n_items": min(shard_size, n_items - s * shard_size)}
                    for s in range(n_shards)
                ],
            ).scalars()
        )
        item_ids = list(
            session.execute(
                insert(Item).returning(Item.id, sort_by_parameter_order=True),
                [
                    {
                        "run_id": run_id,
                        "shard_id": shard_ids[n // shard_size],
                        "ordinal": n,
                        "source_uri": source_uri.format(n=n),
                        "label": labels[n % len(labels)],
                    }
                    for n in range(n_items)
                ],
            ).scalars()
        )
    seeded = SeededRun(run_id, database_url, output_uri, list(methods), list(layers), shard_ids)
    for n, item_id in enumerate(item_ids):
        seeded.items_by_shard.setdefault(shard_ids[n // shard_size], []).append(item_id)
    return seeded


def shard_rows(
    run: SeededRun,
    shard_id: int,
    *,
    top_patches: int = 3,
    seed: int = 0,
    classes: Sequence[int] = (0, 1),
    packed: bool = False,
) -> Rows:
    """Rows shaped like ``workers.shard`` builds them: every item explained for ``classes``."""
    rng = random.Random(f"{run.run_id}:{shard_id}:{seed}")
    rows = Rows(items=[], heatmaps=[], patches=[])
    for item_id in run.items_by_shard[shard_id]:
        pred = rng.randrange(len(CLASS_NAMES))
        rows.items.append(
            {
                "id": item_id,
                "status": "done",
                "error": None,
                "width": 64,
                "height": 48,
                "predictions": [{"class": pred, "name": CLASS_NAMES[pred], "prob": rng.random()}],
                "pred_class": pred,
                "correct": rng.random() < 0.5,
            }
        )
        for method in run.methods:
            for layer in run.layers:
                for target in classes:
                    key = f"runs/{run.run_id}/{method}/{layer}/{item_id}/{target}"
                    rows.heatmaps.append(
                        {
                            "item_id": item_id,
                            "run_id": run.run_id,
                            "method": method,
                            "layer": layer,
                            "target_class": target,
                            "target_score": rng.gauss(0, 3),
                            "object_key": key + ".png",
                            "raw_key": key + ".npy",
                            "sha256": f"{rng.getrandbits(256):064x}",
                            "raw_max": rng.random() * 10,
                            "raw_mean": rng.random(),
                            "map_mean": rng.random(),
                            "top_patch_fraction": rng.random(),
                            "box_energy": rng.random(),
                            "box_hit": rng.random() < 0.5,
                            "outside_mass": rng.random(),
                            "border_share": rng.random(),
                        }
                    )
                    if packed:  # byte ranges in a packed tar (the objects themselves are not written)
                        rows.heatmaps[-1].update(
                            object_offset=rng.randrange(1 << 40),
                            object_length=rng.randrange(1, 1 << 20),
                            raw_offset=rng.randrange(1 << 40),
                            raw_length=rng.randrange(1, 1 << 20),
                        )
                    scores = sorted((rng.random() / 3 for _ in range(top_patches)), reverse=True)
                    for rank, score in enumerate(scores):
                        row, col = rng.randrange(4), rng.randrange(4)
                        rows.patches.append(
                            (
                                (item_id, method, layer, target),
                                {
                                    "run_id": run.run_id,
                                    "item_id": item_id,
                                    "method": method,
                                    "layer": layer,
                                    "target_class": target,
                                    "rank": rank,
                                    "row": row,
                                    "col": col,
                                    "x0": col * 16,
                                    "y0": row * 12,
                                    "x1": col * 16 + 16,
                                    "y1": row * 12 + 12,
                                    "score": score,
                                },
                            )
                        )
    return rows


def write_shard(
    database_url: str, rows: Rows, *, top_patches: int = 3, mode: results.WriteMode = "auto"
) -> dict[tuple[int, str, str, int], int]:
    """The result writes of ``workers.shard.commit_shard``, in its order, in one transaction."""
    with session_scope(database_url) as session:
        results.update_items(session, rows.items)
        ids = results.upsert_heatmaps(session, rows.heatmaps)
        run_id = rows.heatmaps[0]["run_id"] if rows.heatmaps else None
        results.delete_stale_patch_scores(session, list(ids.values()), top_patches, run_id=run_id)
        results.upsert_patch_scores(
            session, [{"heatmap_id": ids[key], **row} for key, row in rows.patches], mode=mode
        )
    return ids


def snapshot(database_url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every column of every result row, in id order."""
    tables = {"items": Item, "heatmaps": Heatmap, "patch_scores": PatchScore}
    with get_engine(database_url).connect() as conn:
        return {
            name: [tuple(r) for r in conn.execute(select(model.__table__).order_by(model.id))]
            for name, model in tables.items()
        }


def one_shard(database_url: str, n_items: int = 3) -> tuple[SeededRun, Rows]:
    """A migrated database holding run ``r1`` of ``n_items`` items, and its first shard's rows."""
    upgrade(database_url)
    run = seed_run(database_url, "r1", n_items=n_items)
    return run, shard_rows(run, run.shard_ids[0])


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return database_for(request, tmp_path)


def _modes(database_url: str) -> list[results.WriteMode]:
    return ["copy", "values"] if database_url.startswith("postgresql") else ["values"]


def test_writing_a_shard_twice_leaves_byte_identical_rows(database_url: str) -> None:
    run = seed_run(database_url, "r1")
    rows = [shard_rows(run, shard_id) for shard_id in run.shard_ids]
    for shard in rows:
        write_shard(database_url, shard)
    first = snapshot(database_url)
    expected_heatmaps = sum(len(r.heatmaps) for r in rows)
    expected_patches = sum(len(r.patches) for r in rows)
    assert len(first["heatmaps"]) == expected_heatmaps
    assert len(first["patch_scores"]) == expected_patches

    for mode in _modes(database_url):
        for shard in rows:
            write_shard(database_url, shard, mode=mode)
        assert snapshot(database_url) == first, f"a second write via {mode} changed rows"


def test_stored_patch_scores_equal_what_was_written(database_url: str) -> None:
    """Floats survive the trip bit for bit (binary COPY on PostgreSQL), strings and ints too."""
    run = seed_run(database_url, "r1", n_items=3)
    shard = shard_rows(run, run.shard_ids[0])
    ids = write_shard(database_url, shard)
    sent = {(ids[key], row["rank"]): {"heatmap_id": ids[key], **row} for key, row in shard.patches}
    with get_engine(database_url).connect() as conn:
        stored = conn.execute(select(PatchScore.__table__)).mappings().all()
    assert len(stored) == len(sent)
    for row in stored:
        expected = sent[(row["heatmap_id"], row["rank"])]
        assert {c: row[c] for c in results.PATCH_COLUMNS} == expected


def test_a_rerun_updates_changed_scores_in_place_and_drops_stale_ranks(database_url: str) -> None:
    run = seed_run(database_url, "r1", n_items=3)
    shard_id = run.shard_ids[0]
    write_shard(database_url, shard_rows(run, shard_id, top_patches=3))
    before = {(r[1], r[7]): r[0] for r in snapshot(database_url)["patch_scores"]}  # (heatmap, rank) -> id

    changed = shard_rows(run, shard_id, top_patches=2, seed=1)
    write_shard(database_url, changed, top_patches=2)
    after = snapshot(database_url)["patch_scores"]
    assert len(after) == len(changed.patches)
    assert {r[7] for r in after} == {0, 1}
    for r in after:
        assert r[0] == before[(r[1], r[7])], "an updated patch score must keep its id"
    new_scores = sorted(row["score"] for _, row in changed.patches)
    assert sorted(r[-1] for r in after) == new_scores


def test_dropping_stale_ranks_leaves_other_heatmaps_alone(database_url: str) -> None:
    """A shard re-run with fewer top patches trims its own heatmaps, not those of other shards."""
    run = seed_run(database_url, "r1", n_items=6, shard_size=3)
    first, second = run.shard_ids
    for shard_id in (first, second):
        write_shard(database_url, shard_rows(run, shard_id, top_patches=3))
    write_shard(database_url, shard_rows(run, first, top_patches=2, seed=1), top_patches=2)
    with get_engine(database_url).connect() as conn:
        ranks = conn.execute(select(PatchScore.item_id, PatchScore.rank)).all()
    by_shard = {
        shard_id: sorted(rank for item, rank in ranks if item in run.items_by_shard[shard_id])
        for shard_id in (first, second)
    }
    per_shard = 3 * len(run.methods) * 2  # items x methods x classes
    assert by_shard[first] == sorted(list(range(2)) * per_shard)
    assert by_shard[second] == sorted(list(range(3)) * per_shard)


def test_stale_ranks_are_dropped_in_chunks_and_across_every_chunk(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without PostgreSQL's array parameter the ids go in chunks: every chunk is trimmed once."""
    monkeypatch.setattr(results, "CHUNK", 2)
    run = seed_run(database_url, "r1", n_items=5, shard_size=5)
    shard_id = run.shard_ids[0]
    write_shard(database_url, shard_rows(run, shard_id, top_patches=3))
    write_shard(database_url, shard_rows(run, shard_id, top_patches=1, seed=1), top_patches=1)
    with get_engine(database_url).connect() as conn:
        ranks = conn.execute(select(PatchScore.heatmap_id, PatchScore.rank)).all()
        heatmaps = conn.execute(select(func.count()).select_from(Heatmap)).scalar_one()
    assert heatmaps > 2 * 2  # more heatmaps than two chunks of two
    assert sorted(ranks) == sorted((heatmap, 0) for heatmap, _ in ranks)
    assert len(ranks) == heatmaps


def test_no_heatmap_rows_and_one_row_write_as_such(database_url: str) -> None:
    run = seed_run(database_url, "r1", n_items=3)
    shard = shard_rows(run, run.shard_ids[0])
    with session_scope(database_url) as session:
        assert results.upsert_heatmaps(session, []) == {}
        one = results.upsert_heatmaps(session, shard.heatmaps[:1])
    row = shard.heatmaps[0]
    assert list(one) == [(row["item_id"], row["method"], row["layer"], row["target_class"])]


def test_a_rerun_refreshes_every_heatmap_and_patch_column(database_url: str) -> None:
    """After two writes of one shard with different values, every stored column is the second's."""
    run = seed_run(database_url, "r1", n_items=3)
    shard_id = run.shard_ids[0]
    for n, mode in enumerate(_modes(database_url)):
        write_shard(database_url, shard_rows(run, shard_id, seed=10 + 2 * n, packed=True))
        second = shard_rows(run, shard_id, seed=11 + 2 * n, packed=True)
        with session_scope(database_url) as session:
            ids = results.upsert_heatmaps(session, second.heatmaps, mode=mode)
            results.delete_stale_patch_scores(session, list(ids.values()), 3)
            results.upsert_patch_scores(
                session, [{"heatmap_id": ids[key], **row} for key, row in second.patches], mode=mode
            )
        with get_engine(database_url).connect() as conn:
            heatmaps = conn.execute(select(Heatmap.__table__)).mappings().all()
            patches = conn.execute(select(PatchScore.__table__)).mappings().all()
        key = itemgetter("item_id", "method", "layer", "target_class")
        stored = {key(row): {c: row[c] for c in results.HEATMAP_COLUMNS} for row in heatmaps}
        assert stored == {key(row): row for row in second.heatmaps}, f"a rerun via {mode} left stale columns"
        stored_patches = {(row["heatmap_id"], row["rank"]): dict(row) for row in patches}
        assert len(stored_patches) == len(second.patches)
        for hkey, row in second.patches:
            got = stored_patches[(ids[hkey], row["rank"])]
            assert {c: got[c] for c in results.PATCH_COLUMNS} == {"heatmap_id": ids[hkey], **row}


def test_two_writes_in_one_transaction_and_a_rollback_leave_no_staged_rows(database_url: str) -> None:
    run = seed_run(database_url, "r1")
    first, second = (shard_rows(run, shard_id) for shard_id in run.shard_ids)
    with pytest.raises(RuntimeError, match="worker died"), session_scope(database_url) as session:
        ids = results.upsert_heatmaps(session, first.heatmaps)
        results.upsert_patch_scores(session, [{"heatmap_id": ids[k], **row} for k, row in first.patches])
        raise RuntimeError("worker died before the commit")
    assert snapshot(database_url)["patch_scores"] == []

    with session_scope(database_url) as session:
        for shard in (first, second):
            ids = results.upsert_heatmaps(session, shard.heatmaps)
            results.upsert_patch_scores(session, [{"heatmap_id": ids[k], **row} for k, row in shard.patches])
    with session_scope(database_url) as session:
        count = session.execute(select(func.count()).select_from(PatchScore)).scalar_one()
        distinct = session.execute(
            select(func.count()).select_from(
                select(PatchScore.heatmap_id, PatchScore.rank).distinct().subquery()
            )
        ).scalar_one()
    assert count == distinct == len(first.patches) + len(second.patches)


def test_bad_patch_rows_are_refused_with_the_reason(database_url: str) -> None:
    run = seed_run(database_url, "r1", n_items=3)
    shard = shard_rows(run, run.shard_ids[0])
    with session_scope(database_url) as session:
        ids = results.upsert_heatmaps(session, shard.heatmaps)
        key, row = shard.patches[0]
        twice = [{"heatmap_id": ids[key], **row}, {"heatmap_id": ids[key], **row}]
        with pytest.raises(ValueError, match=r"^patch-score row 1 repeats \(run_id, heatmap_id, rank\) = "):
            results.upsert_patch_scores(session, twice)
        partial = {"heatmap_id": ids[key], **row}
        del partial["score"]
        with pytest.raises(ValueError, match=r"^patch-score rows lack score; every row needs heatmap_id, "):
            results.upsert_patch_scores(session, [partial])
        twin = r"heatmap row 1 repeats \(run_id, item_id, method, layer, target_class\)"
        with pytest.raises(ValueError, match=twin):
            results.upsert_heatmaps(session, [shard.heatmaps[0], shard.heatmaps[0]])
        with pytest.raises(ValueError, match="unknown write mode"):
            results.upsert_patch_scores(session, twice[:1], mode="fast")  # type: ignore[arg-type]


def test_copy_mode_is_refused_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    _, shard = one_shard(url)
    with pytest.raises(ValueError, match="needs PostgreSQL"):
        write_shard(url, shard, mode="copy")


def test_copy_names_the_column_a_later_row_lacks(postgres_url: str) -> None:
    """The up-front check reads the first row's columns; COPY names a column a later row lacks."""
    _, shard = one_shard(postgres_url)
    with session_scope(postgres_url) as session:
        ids = results.upsert_heatmaps(session, shard.heatmaps)
        rows = [{"heatmap_id": ids[key], **row} for key, row in shard.patches[:2]]
        del rows[1]["score"]
        with pytest.raises(ValueError, match=r"^a patch_scores row lacks column 'score'$"):
            results.upsert_patch_scores(session, rows, mode="copy")


def test_copy_writes_go_through_the_staging_tables(postgres_url: str) -> None:
    """The PostgreSQL path really is COPY + merge: the stages exist on the writer's connection, empty."""
    _, shard = one_shard(postgres_url)
    with session_scope(postgres_url) as session:
        ids = results.upsert_heatmaps(session, shard.heatmaps)
        results.upsert_patch_scores(session, [{"heatmap_id": ids[k], **row} for k, row in shard.patches])
        for stage in ("camaudit_stage_heatmaps", "camaudit_stage_patch_scores"):
            assert session.execute(text(f"SELECT to_regclass('pg_temp.{stage}')")).scalar_one() is not None
            assert session.execute(text(f"SELECT count(*) FROM {stage}")).scalar_one() == 0
    assert len(ids) == len(shard.heatmaps)


def test_heatmap_ids_come_back_for_new_and_unchanged_rows(database_url: str) -> None:
    """A re-run needs every heatmap's id, also for rows whose values did not change."""
    run = seed_run(database_url, "r1", n_items=3)
    shard = shard_rows(run, run.shard_ids[0])
    for mode in _modes(database_url):
        with session_scope(database_url) as session:
            first = results.upsert_heatmaps(session, shard.heatmaps, mode=mode)
        with session_scope(database_url) as session:
            again = results.upsert_heatmaps(session, shard.heatmaps, mode=mode)
        assert first == again
        assert set(first) == {
            (h["item_id"], h["method"], h["layer"], h["target_class"]) for h in shard.heatmaps
        }
    with get_engine(database_url).connect() as conn:
        stored = dict(conn.execute(select(Heatmap.object_key, Heatmap.id)).all())
    assert {first[(h["item_id"], h["method"], h["layer"], h["target_class"])] for h in shard.heatmaps} == set(
        stored.values()
    )


def item_outcomes(database_url: str, run_id: str) -> list[tuple[Any, ...]]:
    """Item outcome columns as the database stores them (JSON as its text)."""
    with get_engine(database_url).connect() as conn:
        return [
            tuple(r)
            for r in conn.execute(
                text(
                    "SELECT ordinal, status, error, width, height, CAST(predictions AS TEXT), pred_class,"
                    " correct FROM items WHERE run_id = :run ORDER BY ordinal"
                ),
                {"run": run_id},
            )
        ]


def test_item_outcomes_are_the_same_text_whichever_statement_writes_them(database_url: str) -> None:
    """A failed item keeps the columns its row does not name; JSON is stored as SQLAlchemy would."""
    outcomes: dict[str, list[tuple[Any, ...]]] = {}
    template: list[dict[str, Any]] = []
    for mode in _modes(database_url):
        run = seed_run(database_url, f"run-{mode}", n_items=3)
        template = template or shard_rows(run, run.shard_ids[0], seed=7).items
        items = [{**row, "id": item_id} for row, item_id in zip(template, run.item_ids, strict=True)]
        failed = {"id": run.item_ids[1], "status": "failed", "error": "cannot decode image: truncated"}
        with session_scope(database_url) as session:
            results.update_items(session, items, mode=mode)
        with session_scope(database_url) as session:
            results.update_items(session, [items[0], failed], mode=mode)
        outcomes[mode] = item_outcomes(database_url, run.run_id)
        kept = outcomes[mode][1]
        assert kept[1:3] == ("failed", "cannot decode image: truncated")
        assert kept[3:5] == (64, 48), "columns a failed row does not name stay as they were"
    assert len({tuple(map(tuple, rows)) for rows in outcomes.values()}) == 1, outcomes
    with pytest.raises(ValueError, match="repeat an id"), session_scope(database_url) as session:
        results.update_items(session, [failed, failed])


def _sqlalchemy_statements(monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite writes through SQLAlchemy's own statements, as before the driver-level path."""

    def upsert(session: Any, staged: Any, rows: Any, what: str) -> list[tuple[Any, ...]]:
        return results._values_upsert(session, staged, rows)

    def update_items(session: Any, columns: Any, rows: Any, run_id: Any) -> None:
        session.execute(results.update(Item), list(rows))

    monkeypatch.setattr(results, "_sqlite_upsert", upsert)
    monkeypatch.setattr(results, "_sqlite_update_items", update_items)


def test_sqlite_driver_writes_leave_the_rows_sqlalchemys_statements_leave(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """executemany with tuples stores every column as SQLAlchemy did, JSON text and ids included."""
    snapshots, outcomes, returned = [], [], []
    for name in ("driver", "sqlalchemy"):
        url = f"sqlite:///{tmp_path / name}.db"
        upgrade(url)
        run = seed_run(url, "r1", n_items=6, methods=("gradcam", "cam"))
        shards = [shard_rows(run, shard_id, seed=shard_id) for shard_id in run.shard_ids]
        with monkeypatch.context() as patched:
            if name == "sqlalchemy":
                _sqlalchemy_statements(patched)
            for shard in shards:
                returned.append(write_shard(url, shard))
            again = shard_rows(run, run.shard_ids[0], seed=99, top_patches=2)  # a re-run: new values
            returned.append(write_shard(url, again, top_patches=2))
        snapshots.append(snapshot(url))
        outcomes.append(item_outcomes(url, run.run_id))
    assert snapshots[0] == snapshots[1]
    assert outcomes[0] == outcomes[1]
    half = len(returned) // 2
    assert returned[:half] == returned[half:]
    assert len(snapshots[0]["patch_scores"]) < sum(len(s.patches) for s in shards)  # ranks 2+ dropped


def test_sqlite_upsert_returns_the_ids_of_exactly_the_rows_it_wrote(tmp_path: Path) -> None:
    """Other heatmaps of the same items (another method) are read back by item but not returned."""
    url = f"sqlite:///{tmp_path / 'r.db'}"
    _, shard = one_shard(url)
    cam = [h for h in shard.heatmaps if h["method"] == "cam"]
    gradcam = [h for h in shard.heatmaps if h["method"] == "gradcam"]
    with session_scope(url) as session:
        first = results.upsert_heatmaps(session, cam)
    with session_scope(url) as session:
        second = results.upsert_heatmaps(session, gradcam)
    assert set(first) == {(h["item_id"], "cam", h["layer"], h["target_class"]) for h in cam}
    assert set(second) == {(h["item_id"], "gradcam", h["layer"], h["target_class"]) for h in gradcam}
    with get_engine(url).connect() as conn:
        stored = {
            (r.item_id, r.method, r.layer, r.target_class): r.id
            for r in conn.execute(
                select(Heatmap.item_id, Heatmap.method, Heatmap.layer, Heatmap.target_class, Heatmap.id)
            )
        }
    assert stored == {**first, **second}


def test_sqlite_upsert_names_the_column_a_later_row_lacks(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    _, shard = one_shard(url)
    with session_scope(url) as session:
        ids = results.upsert_heatmaps(session, shard.heatmaps)
        rows = [{"heatmap_id": ids[key], **row} for key, row in shard.patches[:2]]
        del rows[1]["score"]
        with pytest.raises(ValueError) as refused:
            results.upsert_patch_scores(session, rows)
    needed = ", ".join(results.PATCH_COLUMNS)
    assert str(refused.value) == f"a patch-score row lacks column 'score'; every row needs {needed}"


def test_sqlite_item_updates_stay_within_the_named_run(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    upgrade(url)
    mine, other = seed_run(url, "mine", n_items=2), seed_run(url, "other", n_items=2)
    rows = [{"id": item_id, "status": "failed", "error": "x"} for item_id in mine.item_ids + other.item_ids]
    with session_scope(url) as session:
        results.update_items(session, rows, run_id="mine")
    with get_engine(url).connect() as conn:
        status = dict(
            conn.execute(select(Item.run_id, func.group_concat(Item.status)).group_by(Item.run_id)).all()
        )
    assert status == {"mine": "failed,failed", "other": "pending,pending"}
