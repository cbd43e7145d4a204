"""results partitioned by run: items, heatmaps and patch_scores by LIST (run_id) on PostgreSQL

On PostgreSQL each of the three tables is rebuilt as a partitioned table from the existing
table's own columns (``LIKE … INCLUDING DEFAULTS INCLUDING CONSTRAINTS``), so columns added by
any earlier revision come along; every run recorded (and any run id found in the rows) gets
one partition per table, the rows are copied into them, and the old table's indexes and
constraints are re-created on the new parent (and so on every partition):

- primary keys become ``(id, run_id)``: a key of a partitioned table must hold ``run_id``
  (ids still come from the table's one sequence, so they stay unique in practice);
- unique constraints without ``run_id`` gain it in front, under the name the naming
  convention gives (``uq_heatmaps_run_id_item_id_method_layer_target_class``,
  ``uq_patch_scores_run_id_heatmap_id_rank``); the upserts name these keys;
- foreign keys from the three tables to ``runs`` are kept; the foreign keys among them and
  to ``shards`` (``items.shard_id``, ``heatmaps.item_id``, ``patch_scores.heatmap_id``)
  are dropped, on SQLite too, so both databases follow one model: a referenced partition
  could not be dropped without a check that scans the referencing table.

SQLite keeps plain tables: only the two unique keys and the three foreign keys change.
The downgrade restores plain tables, with their rows, the old keys and foreign keys.

Revision ID: 0012_partition_by_run
Revises: 0011_packed_layout
Create Date: 2026-11-30 09:30:00.000000
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from schema.partitions import ddl, partition_name

revision: str = "0012_partition_by_run"
down_revision: str | None = "0011_packed_layout"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Parents before children when rebuilding; the partition helpers name tables the same way.
TABLES = ("items", "heatmaps", "patch_scores")
# (table, name, column, referred table, referred column): the foreign keys among result tables.
INNER_FKS = (
    ("items", "fk_items_shard_id_shards", "shard_id", "shards", "id"),
    ("heatmaps", "fk_heatmaps_item_id_items", "item_id", "items", "id"),
    ("patch_scores", "fk_patch_scores_heatmap_id_heatmaps", "heatmap_id", "heatmaps", "id"),
)
# (table, old name, old columns): unique keys that gain run_id in front.
UNIQUE_KEYS = (
    (
        "heatmaps",
        "uq_heatmaps_item_id_method_layer_target_class",
        ("item_id", "method", "layer", "target_class"),
    ),
    ("patch_scores", "uq_patch_scores_heatmap_id_rank", ("heatmap_id", "rank")),
)


def _with_run(table: str, columns: Sequence[str]) -> tuple[str, tuple[str, ...]]:
    cols = ("run_id", *columns)
    return f"uq_{table}_{'_'.join(cols)}", cols


def _pg() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _columns(definition: str) -> list[str]:
    inside = re.search(r"\((.*?)\)", definition)
    return [c.strip().strip('"') for c in inside.group(1).split(",")] if inside else []


def _snapshot(table: str) -> tuple[list[str], list[tuple[str, str, str]]]:
    """The table's plain indexes (their DDL) and its constraints (name, type, definition)."""
    bind = op.get_bind()
    indexes = list(
        bind.execute(
            sa.text(
                "SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i WHERE i.indrelid = to_regclass(:t) "
                "AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid "
                "AND c.conrelid = i.indrelid) ORDER BY i.indexrelid"
            ),
            {"t": table},
        ).scalars()
    )
    constraints = [
        (str(name), str(kind), str(definition))
        for name, kind, definition in bind.execute(
            sa.text(
                "SELECT conname, contype, pg_get_constraintdef(oid) FROM pg_constraint "
                "WHERE conrelid = to_regclass(:t) AND contype IN ('p', 'u', 'f') AND conparentid = 0 "
                "ORDER BY contype, conname"
            ),
            {"t": table},
        )
    ]
    return indexes, constraints


def _sequences(table: str) -> list[tuple[str, str]]:
    """(column, sequence) for every column whose default draws from a sequence the table owns."""
    return [
        (str(col), str(seq))
        for col, seq in op.get_bind().execute(
            sa.text(
                "SELECT a.attname, pg_get_serial_sequence(:t, a.attname) FROM pg_attribute a "
                "WHERE a.attrelid = to_regclass(:t) AND a.attnum > 0 AND NOT a.attisdropped "
                "AND pg_get_serial_sequence(:t, a.attname) IS NOT NULL"
            ),
            {"t": table},
        )
    ]


def _rebuild(table: str, *, partitioned: bool) -> None:
    """Recreate ``table`` (partitioned by run_id or plain) with its rows, indexes and constraints."""
    bind = op.get_bind()
    indexes, constraints = _snapshot(table)
    sequences = _sequences(table)
    old = f"{table}_before_0012"
    op.execute(f"ALTER TABLE {table} RENAME TO {old}")
    by = " PARTITION BY LIST (run_id)" if partitioned else ""
    op.execute(f"CREATE TABLE {table} (LIKE {old} INCLUDING DEFAULTS INCLUDING CONSTRAINTS){by}")
    for column, sequence in sequences:
        op.execute(f"ALTER SEQUENCE {sequence} OWNED BY {table}.{_q(column)}")
    if partitioned:
        runs = bind.execute(
            sa.text(f"SELECT id FROM runs UNION SELECT DISTINCT run_id FROM {old} ORDER BY 1")
        ).scalars()
        for run_id in runs:
            literal = bind.execute(sa.text("SELECT quote_literal(:r)"), {"r": run_id}).scalar_one()
            name = _q(partition_name(table, run_id))
            ddl(bind, f"CREATE TABLE {name} PARTITION OF {table} FOR VALUES IN ({literal})")
    op.execute(f"INSERT INTO {table} SELECT * FROM {old}")
    op.execute(f"DROP TABLE {old} CASCADE")
    swaps = {old_name: _with_run(t, cols) for t, old_name, cols in UNIQUE_KEYS if t == table}
    back = {
        new[0]: (old_name, cols)
        for t, old_name, cols in UNIQUE_KEYS
        if t == table
        for new in [_with_run(t, cols)]
    }
    for name, kind, definition in sorted(constraints, key=lambda c: "pfu".index(c[1])):
        if kind == "p":
            cols = [c for c in _columns(definition) if c != "run_id"]
            if partitioned:
                cols.append("run_id")
            op.execute(
                f"ALTER TABLE {table} ADD CONSTRAINT {_q(name)} PRIMARY KEY ({', '.join(map(_q, cols))})"
            )
        elif kind == "u":
            cols = _columns(definition)
            if partitioned and "run_id" not in cols:
                name, cols = swaps.get(name) or _with_run(table, cols)
            elif not partitioned and name in back:
                name, cols = back[name]
            op.execute(f"ALTER TABLE {table} ADD CONSTRAINT {_q(name)} UNIQUE ({', '.join(map(_q, cols))})")
        else:
            ddl(bind, f"ALTER TABLE {table} ADD CONSTRAINT {_q(name)} {definition}")
    for statement in indexes:
        ddl(bind, statement)


def _drop_foreign_keys_into_results() -> None:
    """Foreign keys of other tables into the three: a partitioned table's id alone is no key.

    None exist in camaudit's own schema beyond ``INNER_FKS``; any other found is named in the
    migration's log as it is dropped, so the loss of that check is never silent.
    """
    bind = op.get_bind()
    found = bind.execute(
        sa.text(
            "SELECT conrelid::regclass::text, conname, confrelid::regclass::text FROM pg_constraint "
            "WHERE contype = 'f' AND confrelid = ANY (CAST(:tables AS regclass[])) AND conparentid = 0"
        ),
        {"tables": list(TABLES)},
    ).all()
    for table, name, referred in found:
        logging.getLogger("alembic.runtime.migration").warning(
            "dropping foreign key %s of %s into %s: %s is partitioned by run from now on",
            name,
            table,
            referred,
            referred,
        )
        op.execute(f"ALTER TABLE {table} DROP CONSTRAINT {_q(name)}")


def upgrade() -> None:
    if not _pg():
        for table, name, *_ in INNER_FKS:
            with op.batch_alter_table(table) as batch:
                batch.drop_constraint(name, type_="foreignkey")
        for table, old_name, cols in UNIQUE_KEYS:
            new_name, new_cols = _with_run(table, cols)
            with op.batch_alter_table(table) as batch:
                batch.drop_constraint(old_name, type_="unique")
                batch.create_unique_constraint(new_name, list(new_cols))
        return
    for table, name, *_ in INNER_FKS:
        op.execute(f"ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {_q(name)}")
    _drop_foreign_keys_into_results()
    for table in TABLES:
        _rebuild(table, partitioned=True)


def downgrade() -> None:
    if not _pg():
        for table, old_name, cols in UNIQUE_KEYS:
            new_name, _ = _with_run(table, cols)
            with op.batch_alter_table(table) as batch:
                batch.drop_constraint(new_name, type_="unique")
                batch.create_unique_constraint(old_name, list(cols))
    else:
        for table in TABLES:
            _rebuild(table, partitioned=False)
    for table, name, column, referred, referred_column in INNER_FKS:
        with op.batch_alter_table(table) as batch:
            batch.create_foreign_key(name, referred, [column], [referred_column], ondelete="CASCADE")
