"""Bulk, idempotent writes of one shard's results.

Every statement is an upsert on a natural key, so a shard that runs twice (a worker killed
after writing, a re-delivered message) leaves exactly the rows one run would have left.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Table, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from schema.models import Heatmap, Item, PatchScore

CHUNK = 2000


def _insert(session: Session, table: Table) -> Any:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise ValueError(f"unsupported database {dialect!r}; use PostgreSQL or SQLite")


def _chunks(rows: Sequence[dict[str, Any]], size: int = CHUNK) -> list[Sequence[dict[str, Any]]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def upsert_heatmaps(session: Session, rows: Sequence[dict[str, Any]]) -> dict[tuple[int, str, str, int], int]:
    """Insert or refresh heatmap rows; return their ids by (item, method, layer, class)."""
    table: Table = Heatmap.__table__  # type: ignore[assignment]
    key_cols = ("item_id", "method", "layer", "target_class")
    ids: dict[tuple[int, str, str, int], int] = {}
    for chunk in _chunks(rows):
        stmt = _insert(session, table)
        update = {c: stmt.excluded[c] for c in chunk[0] if c not in key_cols}
        stmt = stmt.on_conflict_do_update(index_elements=list(key_cols), set_=update).returning(
            table.c.id, *(table.c[c] for c in key_cols)
        )
        for row in session.execute(stmt, list(chunk)).all():
            ids[(row.item_id, row.method, row.layer, row.target_class)] = row.id
    return ids


def upsert_patch_scores(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    table: Table = PatchScore.__table__  # type: ignore[assignment]
    key_cols = ("heatmap_id", "rank")
    for chunk in _chunks(rows):
        stmt = _insert(session, table)
        update = {c: stmt.excluded[c] for c in chunk[0] if c not in key_cols}
        session.execute(stmt.on_conflict_do_update(index_elements=list(key_cols), set_=update), list(chunk))


def delete_stale_patch_scores(session: Session, heatmap_ids: Sequence[int], keep_ranks: int) -> None:
    """A re-run with fewer top patches must not leave the old extra ranks behind."""
    table: Table = PatchScore.__table__  # type: ignore[assignment]
    for i in range(0, len(heatmap_ids), CHUNK):
        chunk = list(heatmap_ids[i : i + CHUNK])
        session.execute(table.delete().where(table.c.heatmap_id.in_(chunk), table.c.rank >= keep_ranks))


def update_items(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Items exist from planning; only their outcome columns change."""
    for chunk in _chunks(rows):
        session.execute(update(Item), list(chunk))
