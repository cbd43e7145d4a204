"""One partition per run of the result tables on PostgreSQL: made with the run, dropped with it.

On PostgreSQL ``items``, ``heatmaps`` and ``patch_scores`` are partitioned by ``LIST
(run_id)`` (migration ``0012_partition_by_run``). Every run owns one partition of each, so
deleting a run is ``DETACH`` + ``DROP`` of three tables: constant time, no dead tuples, no
vacuum debt, however many rows the run had. Queries that name ``run_id`` read one partition.

A run's partitions are created in the transaction that inserts its row (an ORM event on
``Run``, see ``schema/models.py``), so no writer can meet a run without them. They are made
as plain tables and then attached: ``ATTACH PARTITION`` takes only a SHARE UPDATE EXCLUSIVE
lock on the parent, which does not block the shard commits of other runs, where ``CREATE
TABLE … PARTITION OF`` would take an ACCESS EXCLUSIVE one.

SQLite keeps plain tables; every function here is a no-op there.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence

from sqlalchemy import Connection, text

__all__ = [
    "PARTITIONED_TABLES",
    "analyze_parents",
    "create_run_partitions",
    "ddl",
    "drop_run_partitions",
    "is_partitioned",
    "partition_name",
    "run_partitions",
]

# Children first: the order in which a run's partitions are dropped.
PARTITIONED_TABLES: tuple[str, ...] = ("patch_scores", "heatmaps", "items")

_SAFE = re.compile(r"[^a-z0-9_]")


def partition_name(table: str, run_id: str) -> str:
    """``{table}_r_{run_id}`` when the run id is a plain identifier, else with a hash of it.

    Run ids made by ``camaudit run`` are 16 hex digits; any other id still maps to one
    valid, distinct name of at most 63 bytes.
    """
    safe = _SAFE.sub("_", run_id.lower())
    if safe == run_id and len(table) + 3 + len(safe) <= 63:
        return f"{table}_r_{safe}"
    digest = hashlib.sha256(run_id.encode()).hexdigest()[:12]
    return f"{table}_r_{safe[: 63 - len(table) - 4 - 13]}_{digest}"


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def ddl(conn: Connection, sql: str) -> None:
    """Run one statement as is, in the connection's transaction: no bind or placeholder parsing.

    Partition bounds hold the run id as a literal, and a run id may contain ``:`` or ``%``,
    which ``text()`` or the driver would otherwise read as parameters.
    """
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(sql)
    finally:
        cursor.close()


def is_partitioned(conn: Connection, table: str) -> bool:
    """True on PostgreSQL when ``table`` is a partitioned table (relkind ``p``)."""
    if conn.dialect.name != "postgresql":
        return False
    kind = conn.execute(
        text("SELECT c.relkind FROM pg_class c WHERE c.oid = to_regclass(:t)"), {"t": table}
    ).scalar_one_or_none()
    return kind == "p"


def run_partitions(conn: Connection, table: str, run_id: str) -> list[str]:
    """The partitions of ``table`` that hold ``run_id`` (attached ones; found by their bound, not name)."""
    bound = (
        "FOR VALUES IN (" + conn.execute(text("SELECT quote_literal(:r)"), {"r": run_id}).scalar_one() + ")"
    )
    return list(
        conn.execute(
            text(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = to_regclass(:t) AND pg_get_expr(c.relpartbound, c.oid) = :bound"
            ),
            {"t": table, "bound": bound},
        ).scalars()
    )


def create_run_partitions(conn: Connection, run_id: str) -> list[str]:
    """Create and attach the run's partition of every partitioned result table; return their names.

    Runs inside the caller's transaction (the one inserting the run row). A table that is not
    partitioned (SQLite, or a database not yet migrated) is skipped.
    """
    made: list[str] = []
    for table in reversed(PARTITIONED_TABLES):
        if not is_partitioned(conn, table) or run_partitions(conn, table, run_id):
            continue
        name = partition_name(table, run_id)
        ddl(conn, f"CREATE TABLE {_quote(name)} (LIKE {table} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
        literal = conn.execute(text("SELECT quote_literal(:r)"), {"r": run_id}).scalar_one()
        # The CHECK lets ATTACH skip its validation scan (the table is empty anyway); it is
        # redundant once attached, so it goes again.
        check = _quote(name + "_run")
        ddl(conn, f"ALTER TABLE {_quote(name)} ADD CONSTRAINT {check} CHECK (run_id = {literal})")
        ddl(conn, f"ALTER TABLE {table} ATTACH PARTITION {_quote(name)} FOR VALUES IN ({literal})")
        ddl(conn, f"ALTER TABLE {_quote(name)} DROP CONSTRAINT {check}")
        made.append(name)
    return made


# Below this many rows (by the statistics) a partition's rows are counted exactly before the drop.
EXACT_BELOW = 100_000


def _rows_in(conn: Connection, name: str) -> tuple[int, bool]:
    """(rows, exact): the planner's estimate for a big analysed partition, else a count."""
    estimate = int(
        conn.execute(
            text("SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(:n)"), {"n": _quote(name)}
        ).scalar_one()
    )
    if estimate >= EXACT_BELOW:
        return estimate, False
    return int(conn.execute(text(f"SELECT count(*) FROM {_quote(name)}")).scalar_one()), True


def drop_run_partitions(
    conn: Connection,
    run_id: str,
    *,
    tables: Sequence[str] = PARTITIONED_TABLES,
    progress: Callable[[str, int], None] | None = None,
) -> tuple[dict[str, int], set[str]]:
    """DETACH and DROP the run's partitions, children first.

    Returns the rows each table lost and the tables whose figure is an estimate: a big
    partition's rows come from the planner's statistics (``pg_class.reltuples``) so the drop
    stays constant-time; small or never-analysed ones are counted.
    """
    dropped: dict[str, int] = {}
    estimated: set[str] = set()
    for table in tables:
        if not is_partitioned(conn, table):
            continue
        rows = 0
        for name in run_partitions(conn, table, run_id):
            count, exact = _rows_in(conn, name)
            if not exact:
                estimated.add(table)
            ddl(conn, f"ALTER TABLE {table} DETACH PARTITION {_quote(name)}")
            ddl(conn, f"DROP TABLE {_quote(name)}")
            rows += count
        dropped[table] = rows
        if progress is not None:
            progress(table, rows)
    return dropped, estimated


def analyze_parents(conn: Connection) -> list[str]:
    """``ANALYZE`` the partitioned result tables: their inherited statistics, which the planner
    uses for joins and sort groups over them, and which autovacuum never gathers.

    Without them a top-100 over one run of 10 M patch scores was planned at 170-350 ms
    instead of 0.7 ms (docs/PERFORMANCE.md). It samples every partition, so it is run once
    per finished run, not per query. Returns the tables analysed (none on SQLite).
    """
    tables = [t for t in PARTITIONED_TABLES if is_partitioned(conn, t)]
    if tables:
        ddl(conn, f"ANALYZE {', '.join(tables)}")
    return tables
