"""Results partitioned by run on PostgreSQL: the migration keeps every row both ways, a run's
partitions come with its row and go with ``gc``, and queries read one partition."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, inspect, text

from scheduler.gc import gc_run
from scheduler.query import explain_top_regions
from schema.db import downgrade, get_engine, upgrade
from schema.models import Heatmap, PatchScore
from tests.test_results_pg import seed_run, shard_rows, snapshot, write_shard

BEFORE = "0011_packed_layout"
TABLES = ("items", "heatmaps", "patch_scores")
INNER_FKS = {
    "items": "fk_items_shard_id_shards",
    "heatmaps": "fk_heatmaps_item_id_items",
    "patch_scores": "fk_patch_scores_heatmap_id_heatmaps",
}


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'p.db'}"
    return str(request.getfixturevalue("postgres_url"))


def insert_results(database_url: str, run_id: str) -> None:
    """A run's heatmaps and patch scores as plain inserts: the upserts need the newer keys."""
    run = seed_run(database_url, run_id, n_items=3)
    with get_engine(database_url).begin() as conn:
        for shard_id in run.shard_ids:
            rows = shard_rows(run, shard_id)
            ids: dict[Any, int] = {}
            for heatmap in rows.heatmaps:
                key = (heatmap["item_id"], heatmap["method"], heatmap["layer"], heatmap["target_class"])
                ids[key] = conn.execute(insert(Heatmap.__table__).returning(Heatmap.id), heatmap).scalar_one()
            conn.execute(insert(PatchScore.__table__), [{"heatmap_id": ids[k], **r} for k, r in rows.patches])


def relkinds(database_url: str) -> dict[str, str]:
    with get_engine(database_url).connect() as conn:
        return {
            t: conn.execute(
                text("SELECT relkind FROM pg_class WHERE oid = to_regclass(:t)"), {"t": t}
            ).scalar_one()
            for t in TABLES
        }


def partitions(database_url: str) -> dict[str, list[str]]:
    """Each table's partitions, by the run id in their bound."""
    with get_engine(database_url).connect() as conn:
        return {
            t: sorted(
                conn.execute(
                    text(
                        "SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
                        "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass(:t)"
                    ),
                    {"t": t},
                ).scalars()
            )
            for t in TABLES
        }


def inner_fks(database_url: str) -> set[str]:
    engine = get_engine(database_url)
    found = {fk["name"] for t in TABLES for fk in inspect(engine).get_foreign_keys(t)}
    return found & set(INNER_FKS.values())


def test_partitioning_migrates_up_and_down_with_every_row(database_url: str) -> None:
    upgrade(database_url, BEFORE)
    insert_results(database_url, "r1")
    insert_results(database_url, "r2")
    before = snapshot(database_url)
    assert len(before["patch_scores"]) == 2 * 3 * 2 * 2 * 3 and inner_fks(database_url) == set(
        INNER_FKS.values()
    )

    upgrade(database_url)
    assert snapshot(database_url) == before
    assert inner_fks(database_url) == set()
    postgres = database_url.startswith("postgresql")
    if postgres:
        assert relkinds(database_url) == dict.fromkeys(TABLES, "p")
        assert partitions(database_url) == {
            key: ["FOR VALUES IN ('r1')", "FOR VALUES IN ('r2')"] for key in TABLES
        }
    # A re-run of a migrated shard upserts onto the migrated rows: same ids, no new rows.
    run = seed_run(database_url, "r3", n_items=3)
    shard = shard_rows(run, run.shard_ids[0])
    write_shard(database_url, shard)
    written = snapshot(database_url)
    write_shard(database_url, shard)
    assert snapshot(database_url) == written

    downgrade(database_url, BEFORE)
    assert snapshot(database_url) == written
    assert inner_fks(database_url) == set(INNER_FKS.values())
    if postgres:
        assert relkinds(database_url) == dict.fromkeys(TABLES, "r")
    upgrade(database_url)
    assert snapshot(database_url) == written


def test_gc_drops_the_runs_partitions_and_leaves_other_runs_alone(postgres_url: str, tmp_path: Path) -> None:
    upgrade(postgres_url)
    odd = "o'dd:%s-run"  # a quote, a colon and a percent sign: literals in DDL, not parameters
    runs = {}
    for run_id in ("r1", odd):
        runs[run_id] = seed_run(postgres_url, run_id, output_uri=str(tmp_path / "out"))
        for shard_id in runs[run_id].shard_ids:
            write_shard(postgres_url, shard_rows(runs[run_id], shard_id))
    bounds = partitions(postgres_url)
    assert bounds == {key: ["FOR VALUES IN ('o''dd:%s-run')", "FOR VALUES IN ('r1')"] for key in TABLES}
    with get_engine(postgres_url).connect() as conn:
        where = {
            t: sorted(
                conn.execute(text(f"SELECT DISTINCT tableoid::regclass::text, run_id FROM {t}")).all(),
                key=lambda r: r[1],
            )
            for t in TABLES
        }
    assert all(len(rows) == 2 and rows[0][0] != rows[1][0] for rows in where.values()), where
    r1_tables = [name for rows in where.values() for name, run_id in rows if run_id == "r1"]
    others = {k: [r for r in v if r[1] == odd] for k, v in snapshot(postgres_url).items()}

    report = gc_run(postgres_url, "r1")

    assert report.partitioned == set(TABLES)
    assert report.rows["patch_scores"] == 6 * 2 * 2 * 3 and report.rows["items"] == 6
    assert partitions(postgres_url) == {key: ["FOR VALUES IN ('o''dd:%s-run')"] for key in TABLES}
    with get_engine(postgres_url).connect() as conn:
        # The partitions' files are gone with them: no dead tuples are left to vacuum.
        assert [conn.execute(text("SELECT to_regclass(:n)"), {"n": n}).scalar() for n in r1_tables] == [
            None
        ] * 3
        for table in TABLES:
            assert conn.execute(text(f"SELECT count(*) FROM {table} WHERE run_id = 'r1'")).scalar_one() == 0
    assert {k: [r for r in v if r[1] == odd] for k, v in snapshot(postgres_url).items()} == others
    # The other run still takes writes into its own partition.
    write_shard(postgres_url, shard_rows(runs[odd], runs[odd].shard_ids[0], seed=5))


def test_top_regions_reads_one_partition(postgres_url: str) -> None:
    upgrade(postgres_url)
    for run_id in ("ra", "rb"):
        run = seed_run(postgres_url, run_id)
        for shard_id in run.shard_ids:
            write_shard(postgres_url, shard_rows(run, shard_id))
    plan = explain_top_regions(postgres_url, "ra", "circle", "gradcam", limit=100)
    assert "patch_scores_r_ra" in plan and "items_r_ra" in plan
    assert "_r_rb" not in plan, plan


def test_item_outcomes_written_with_their_run_touch_only_its_partition(postgres_url: str) -> None:
    """The shard commit names its run, so the COPY path's update reads and writes one partition."""
    from schema.db import session_scope
    from workers import results

    upgrade(postgres_url)
    mine, other = seed_run(postgres_url, "mine", n_items=3), seed_run(postgres_url, "other", n_items=3)
    rows = [{"id": i, "status": "done", "pred_class": 2} for i in (*mine.item_ids, other.item_ids[0])]
    with session_scope(postgres_url) as session:
        results.update_items(session, rows, mode="copy", run_id="mine")
    with get_engine(postgres_url).connect() as conn:
        done = conn.execute(text("SELECT run_id, count(*) FROM items WHERE status = 'done' GROUP BY 1")).all()
    assert done == [("mine", 3)]


def test_worst_maps_read_one_partition(postgres_url: str) -> None:
    """The statement worst_maps sends, explained as sent: only the asked run's partitions appear."""
    from scheduler.worst import worst_maps

    upgrade(postgres_url)
    for run_id in ("ra", "rb"):
        run = seed_run(postgres_url, run_id)
        for shard_id in run.shard_ids:
            write_shard(postgres_url, shard_rows(run, shard_id))
    found: list[Any] = []
    plans = plans_of(
        postgres_url, lambda: found.extend(worst_maps(postgres_url, "ra", "circle", "gradcam", limit=5))
    )
    assert found and len(plans) == 1
    assert "heatmaps_r_ra" in plans[0] and "items_r_ra" in plans[0]
    assert "_r_rb" not in plans[0], plans[0]


def test_gc_behind_a_long_reader_stops_cleanly_and_finishes_later(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DETACH needs the parent to itself: behind an open reader gc gives up, the run stays 'deleting'."""
    from scheduler import gc
    from scheduler.gc import GcError
    from scheduler.query import DELETING
    from schema.db import session_scope
    from schema.models import Run

    monkeypatch.setattr(gc, "LOCK_TIMEOUT_S", 1)
    upgrade(postgres_url)
    run = seed_run(postgres_url, "r1", output_uri=str(tmp_path / "out"))
    write_shard(postgres_url, shard_rows(run, run.shard_ids[0]))
    reader = get_engine(postgres_url).connect()
    try:
        reader.execute(text("SELECT count(*) FROM patch_scores"))  # its transaction stays open
        with pytest.raises(GcError, match=r"could not lock patch_scores within 1s .* run gc again later"):
            gc_run(postgres_url, "r1")
    finally:
        reader.close()
    with session_scope(postgres_url) as session:
        assert session.get(Run, "r1").status == DELETING  # type: ignore[union-attr]
    assert gc_run(postgres_url, "r1").resumed
    assert partitions(postgres_url) == {t: [] for t in TABLES}


def test_the_partitioned_parents_get_inherited_statistics(postgres_url: str, tmp_path: Path) -> None:
    """Autovacuum never analyses a partitioned parent: the finalisation's ANALYZE must."""
    from schema.partitions import analyze_parents

    upgrade(postgres_url)
    run = seed_run(postgres_url, "r1")
    write_shard(postgres_url, shard_rows(run, run.shard_ids[0]))
    query = text("SELECT count(*) FROM pg_stats WHERE tablename = 'patch_scores' AND inherited")
    with get_engine(postgres_url).begin() as conn:
        assert conn.execute(query).scalar_one() == 0
        assert analyze_parents(conn) == ["patch_scores", "heatmaps", "items"]
        assert conn.execute(query).scalar_one() > 0
    sqlite_url = f"sqlite:///{tmp_path / 's.db'}"
    upgrade(sqlite_url)
    with get_engine(sqlite_url).begin() as conn:
        assert analyze_parents(conn) == []


def plans_of(postgres_url: str, call: Any) -> list[str]:
    """EXPLAIN of every statement ``call`` sends that reads a result table, as it was sent."""
    from sqlalchemy import event

    engine = get_engine(postgres_url)
    sent: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        if any(f"FROM {t}" in statement or f"JOIN {t}" in statement for t in TABLES):
            sent.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        call()
    finally:
        event.remove(engine, "before_cursor_execute", record)
    with engine.connect() as conn:
        return ["\n".join(conn.exec_driver_sql("EXPLAIN " + s, p).scalars()) for s, p in sent]


def test_gallery_filters_and_export_pages_read_one_partition(postgres_url: str) -> None:
    """The gallery's filtered page and an export's pages name the run on every table they join."""
    from scheduler.exports.common import MapChoice, iter_maps
    from scheduler.web.data import GalleryQuery, gallery
    from schema.db import session_scope
    from schema.models import Run

    upgrade(postgres_url)
    for run_id in ("ra", "rb"):
        run = seed_run(postgres_url, run_id)
        for shard_id in run.shard_ids:
            write_shard(postgres_url, shard_rows(run, shard_id))
    with session_scope(postgres_url) as session:
        run = session.get(Run, "ra")
        assert run is not None
        session.expunge(run)
    query = GalleryQuery(target=0, method="gradcam", label="circle")
    plans = plans_of(postgres_url, lambda: gallery(postgres_url, run, query, size=4))
    plans += plans_of(
        postgres_url, lambda: list(iter_maps(postgres_url, MapChoice(run, "gradcam", "layer4", None)))
    )
    assert len(plans) >= 2
    for plan in plans:
        assert "_r_ra" in plan and "_r_rb" not in plan, plan
