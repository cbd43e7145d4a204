"""Bulk, idempotent writes of one shard's results.

Every statement is an upsert on a natural key, so a shard that runs twice (a worker killed
after writing, a re-delivered message) leaves exactly the rows one run would have left.

On PostgreSQL, heatmaps and patch scores (the bulk: top-L per heatmap) travel by binary
``COPY`` into per-connection temporary staging tables and reach their tables with one
``INSERT … SELECT … ON CONFLICT`` each per shard. Multi-row ``VALUES`` statements are much
slower: Python builds their SQL text and parameters row by row, and the driver parses
thousands of placeholders on every call. Patch-score rows a re-run leaves unchanged are not
rewritten at all, so a retried shard adds no dead tuples. SQLite keeps the plain
``INSERT … ON CONFLICT`` statements, sent through the driver's ``executemany`` with tuples.

The conflict keys lead with ``run_id``: on PostgreSQL the tables are partitioned by run
(``schema/partitions.py``) and their unique keys must hold it. Statements that name a run
read and write only that run's partition; ``run_id`` is passed where a row alone lacks it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Literal

from sqlalchemy import BigInteger, Table, any_, bindparam, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from schema.models import Heatmap, Item, PatchScore

__all__ = [
    "CHUNK",
    "HEATMAP_COLUMNS",
    "PATCH_COLUMNS",
    "WriteMode",
    "delete_stale_patch_scores",
    "update_items",
    "upsert_heatmaps",
    "upsert_patch_scores",
]

CHUNK = 2000

WriteMode = Literal["auto", "copy", "values"]


def _quote(name: str) -> str:
    return f'"{name}"'


@dataclass(frozen=True)
class _Staged:
    """A table written through COPY into a temporary twin, then one ``INSERT … SELECT … ON CONFLICT``."""

    table: str
    columns: tuple[tuple[str, str], ...]  # (name, PostgreSQL type as binary COPY needs it exactly)
    key: tuple[str, ...]
    returning: tuple[str, ...] = ()  # when set, every row's values come back (updated or not)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.columns)

    @property
    def types(self) -> list[str]:
        return [kind for _, kind in self.columns]

    @property
    def stage(self) -> str:
        return f"camaudit_stage_{self.table}"

    def ddl(self) -> str:
        columns = ", ".join(f"{_quote(name)} {kind}" for name, kind in self.columns)
        # ON COMMIT DELETE ROWS: a pooled connection reuses the table, and a rolled-back shard
        # cannot leave staged rows behind for the next one.
        return f"CREATE TEMPORARY TABLE IF NOT EXISTS {self.stage} ({columns}) ON COMMIT DELETE ROWS"

    def copy_sql(self) -> str:
        return f"COPY {self.stage} ({', '.join(map(_quote, self.names))}) FROM STDIN (FORMAT BINARY)"

    def merge_sql(self) -> str:
        cols = ", ".join(map(_quote, self.names))
        values = [c for c in self.names if c not in self.key]
        assignments = ", ".join(f"{_quote(c)} = EXCLUDED.{_quote(c)}" for c in values)
        key = ", ".join(map(_quote, self.key))
        # Draining the stage in the same statement leaves it empty for the next call in this
        # transaction; the key order makes concurrent writers of one shard lock rows alike.
        sql = (
            f"WITH staged AS (DELETE FROM {self.stage} RETURNING *) "
            f"INSERT INTO {self.table} ({cols}) SELECT {cols} FROM staged ORDER BY {key} "
            f"ON CONFLICT ({key}) DO UPDATE SET {assignments}"
        )
        if self.returning:
            return sql + f" RETURNING {', '.join(map(_quote, self.returning))}"
        # Nothing to return: skip rows a re-run leaves unchanged, so they leave no dead tuples.
        current = ", ".join(f"{self.table}.{_quote(c)}" for c in values)
        incoming = ", ".join(f"EXCLUDED.{_quote(c)}" for c in values)
        return sql + f" WHERE ({current}) IS DISTINCT FROM ({incoming})"

    def check(self, rows: Sequence[dict[str, Any]], what: str) -> None:
        """One statement may not touch a row twice, and COPY needs every column: name the bad row."""
        missing = [c for c in self.names if c not in rows[0]]
        if missing:
            needed = ", ".join(self.names)
            raise ValueError(f"{what} rows lack {', '.join(missing)}; every row needs {needed}")
        try:
            keys = list(map(itemgetter(*self.key), rows))
        except KeyError as exc:
            raise ValueError(f"a {what} row lacks its key column {exc.args[0]!r}") from exc
        if len(set(keys)) == len(keys):
            return
        seen: set[Any] = set()
        for n, key in enumerate(keys):
            if key in seen:
                columns = ", ".join(self.key)
                raise ValueError(
                    f"{what} row {n} repeats ({columns}) = {key}; each key may appear once per write"
                )
            seen.add(key)

    def write(self, session: Session, rows: Sequence[dict[str, Any]]) -> list[tuple[Any, ...]]:
        # The session's own connection, so the rows commit or roll back with the rest of the shard.
        raw = session.connection().connection.driver_connection
        values = itemgetter(*self.names)
        with raw.cursor() as cur:
            cur.execute(self.ddl())
            with cur.copy(self.copy_sql()) as copy:
                copy.set_types(self.types)
                try:
                    for row in rows:
                        copy.write_row(values(row))
                except KeyError as exc:
                    raise ValueError(f"a {self.table} row lacks column {exc.args[0]!r}") from exc
            cur.execute(self.merge_sql())
            return cur.fetchall() if self.returning else []


_HEATMAPS = _Staged(
    table="heatmaps",
    columns=(
        ("item_id", "int8"),
        ("run_id", "text"),
        ("method", "text"),
        ("layer", "text"),
        ("target_class", "int4"),
        ("target_score", "float8"),
        ("object_key", "text"),
        ("raw_key", "text"),
        ("object_offset", "int8"),
        ("object_length", "int8"),
        ("raw_offset", "int8"),
        ("raw_length", "int8"),
        ("sha256", "text"),
        ("raw_max", "float8"),
        ("raw_mean", "float8"),
        ("map_mean", "float8"),
        ("top_patch_fraction", "float8"),
        ("box_energy", "float8"),
        ("box_hit", "bool"),
        ("outside_mass", "float8"),
        ("border_share", "float8"),
    ),
    key=("run_id", "item_id", "method", "layer", "target_class"),
    returning=("id", "item_id", "method", "layer", "target_class"),
)
_PATCHES = _Staged(
    table="patch_scores",
    columns=(
        ("heatmap_id", "int8"),
        ("run_id", "text"),
        ("item_id", "int8"),
        ("method", "text"),
        ("layer", "text"),
        ("target_class", "int4"),
        ("rank", "int4"),
        ("row", "int4"),
        ("col", "int4"),
        ("x0", "int4"),
        ("y0", "int4"),
        ("x1", "int4"),
        ("y1", "int4"),
        ("score", "float8"),
    ),
    key=("run_id", "heatmap_id", "rank"),
)
# Every patch-score row carries all of these.
PATCH_COLUMNS: tuple[str, ...] = _PATCHES.names
HEATMAP_COLUMNS: tuple[str, ...] = _HEATMAPS.names
_BYTE_RANGES = ("object_offset", "object_length", "raw_offset", "raw_length")
_NO_RANGES: dict[str, Any] = dict.fromkeys(_BYTE_RANGES)


def _dialect(session: Session) -> str:
    return session.get_bind().dialect.name


def _pick_mode(session: Session, mode: WriteMode) -> WriteMode:
    dialect = _dialect(session)
    if mode not in ("auto", "copy", "values"):
        raise ValueError(f"unknown write mode {mode!r}; use 'auto', 'copy' or 'values'")
    if mode == "auto":
        return "copy" if dialect == "postgresql" else "values"
    if mode == "copy" and dialect != "postgresql":
        raise ValueError(f"mode='copy' needs PostgreSQL, this session is on {dialect}; use 'values'")
    return mode


def _insert(session: Session, table: Table) -> Any:
    dialect = _dialect(session)
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise ValueError(f"unsupported database {dialect!r}; use PostgreSQL or SQLite")


def _chunks(rows: Sequence[dict[str, Any]], size: int = CHUNK) -> list[Sequence[dict[str, Any]]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def _values_upsert(
    session: Session, staged: _Staged, rows: Sequence[dict[str, Any]]
) -> list[tuple[Any, ...]]:
    """The same upsert as multi-row ``INSERT … VALUES … ON CONFLICT``: SQLite, and the baseline."""
    table: Table = {"heatmaps": Heatmap, "patch_scores": PatchScore}[staged.table].__table__  # type: ignore[assignment]
    returned: list[tuple[Any, ...]] = []
    for chunk in _chunks(rows):
        stmt = _insert(session, table)
        update = {c: stmt.excluded[c] for c in staged.names if c not in staged.key}
        stmt = stmt.on_conflict_do_update(index_elements=list(staged.key), set_=update)
        if staged.returning:
            stmt = stmt.returning(*(table.c[c] for c in staged.returning))
            returned.extend(tuple(r) for r in session.execute(stmt, list(chunk)).all())
        else:
            session.execute(stmt, list(chunk))
    return returned


def _upsert(
    session: Session, staged: _Staged, rows: Sequence[dict[str, Any]], mode: WriteMode, what: str
) -> list[tuple[Any, ...]]:
    mode = _pick_mode(session, mode)
    if not rows:
        return []
    staged.check(rows, what)
    if mode == "copy":
        return staged.write(session, rows)
    if _dialect(session) == "sqlite":
        return _sqlite_upsert(session, staged, rows, what)
    return _values_upsert(session, staged, rows)


def _sqlite_upsert(
    session: Session, staged: _Staged, rows: Sequence[dict[str, Any]], what: str
) -> list[tuple[Any, ...]]:
    """The ``values`` upsert on SQLite through the driver's ``executemany``, rows as tuples.

    SQLAlchemy builds every row's parameters in Python (about 9 µs a row, more than SQLite
    takes to write it), and a shard's commit holds its whole pipeline: a 512-image shard's
    rows took 106 ms that way and 62 ms this way (``bench/host_steps.py``). The statement is the
    same ``INSERT … ON CONFLICT DO UPDATE``; SQLite's ``executemany`` drops ``RETURNING``, so
    the ids are read back by their keys in the same transaction.
    """
    names = staged.names
    updated = [c for c in names if c not in staged.key]
    columns, marks = ", ".join(map(_quote, names)), ", ".join("?" * len(names))
    sql = (
        f"INSERT INTO {staged.table} ({columns}) VALUES ({marks}) "
        f"ON CONFLICT ({', '.join(map(_quote, staged.key))}) DO UPDATE SET "
        + ", ".join(f"{_quote(c)} = excluded.{_quote(c)}" for c in updated)
    )
    values = itemgetter(*names)
    try:
        params = [values(row) for row in rows]
    except KeyError as exc:
        raise ValueError(
            f"a {what} row lacks column {exc.args[0]!r}; every row needs {', '.join(names)}"
        ) from exc
    cursor = session.connection().connection.driver_connection.cursor()
    try:
        cursor.executemany(sql, params)
        return _sqlite_returned(cursor, staged, rows) if staged.returning else []
    finally:
        cursor.close()


def _sqlite_returned(cursor: Any, staged: _Staged, rows: Sequence[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """``staged.returning`` of exactly the rows just written, read back by run and item."""
    wanted = {tuple(row[c] for c in staged.key) for row in rows}
    by_run: dict[Any, set[Any]] = {}
    for row in rows:
        by_run.setdefault(row["run_id"], set()).add(row["item_id"])
    key_at = [staged.returning.index(c) for c in staged.key if c != "run_id"]
    returned: list[tuple[Any, ...]] = []
    select = f"SELECT {', '.join(map(_quote, staged.returning))} FROM {staged.table}"
    for run_id, items in by_run.items():
        ordered = sorted(items)
        for i in range(0, len(ordered), CHUNK):
            chunk = ordered[i : i + CHUNK]
            cursor.execute(
                f"{select} WHERE run_id = ? AND item_id IN ({', '.join('?' * len(chunk))})", [run_id, *chunk]
            )
            for found in cursor.fetchall():
                if (run_id, *(found[k] for k in key_at)) in wanted:
                    returned.append(tuple(found))
    return returned


def upsert_heatmaps(
    session: Session, rows: Sequence[dict[str, Any]], *, mode: WriteMode = "auto"
) -> dict[tuple[int, str, str, int], int]:
    """Insert or refresh heatmap rows; return their ids by (item, method, layer, class).

    ``mode`` as for :func:`upsert_patch_scores`. Rows without the packed layout's byte ranges
    (``object_offset`` ...) name whole objects: those columns are NULL.
    """
    if rows and any(column not in rows[0] for column in _BYTE_RANGES):
        rows = [{**_NO_RANGES, **row} for row in rows]
    returned = _upsert(session, _HEATMAPS, rows, mode, "heatmap")
    return {(item, method, layer, target): hid for hid, item, method, layer, target in returned}


def upsert_patch_scores(
    session: Session, rows: Sequence[dict[str, Any]], *, mode: WriteMode = "auto"
) -> None:
    """Insert or refresh patch scores keyed by (heatmap, rank).

    ``mode`` picks the statement: ``copy`` (PostgreSQL only) stages the rows with binary
    COPY, ``values`` sends multi-row ``INSERT … ON CONFLICT``; ``auto`` takes COPY where the
    database has it. Both leave the same rows.
    """
    _upsert(session, _PATCHES, rows, mode, "patch-score")


def delete_stale_patch_scores(
    session: Session, heatmap_ids: Sequence[int], keep_ranks: int, *, run_id: str | None = None
) -> None:
    """A re-run with fewer top patches must not leave the old extra ranks behind.

    ``run_id`` (the heatmaps' run) confines the delete to that run's partition; without it
    every partition's index is probed.
    """
    if not heatmap_ids:
        return
    table: Table = PatchScore.__table__  # type: ignore[assignment]
    run = [table.c.run_id == run_id] if run_id is not None else []
    if _dialect(session) == "postgresql":
        # One statement with an array parameter instead of thousands of IN placeholders.
        ids = bindparam("ids", list(heatmap_ids), type_=postgresql.ARRAY(BigInteger()))
        session.execute(
            table.delete().where(*run, table.c.heatmap_id == any_(ids), table.c.rank >= keep_ranks)
        )
        return
    for i in range(0, len(heatmap_ids), CHUNK):
        chunk = list(heatmap_ids[i : i + CHUNK])
        session.execute(table.delete().where(*run, table.c.heatmap_id.in_(chunk), table.c.rank >= keep_ranks))


# Outcome columns a shard sets on its items, with their staging types; JSON travels as text.
_ITEM_COLUMNS = {
    "status": "text",
    "error": "text",
    "width": "int4",
    "height": "int4",
    "predictions": "text",
    "pred_class": "int4",
    "correct": "bool",
}
_ITEM_STAGE = "camaudit_stage_items"


def _item_values(row: dict[str, Any], getter: itemgetter, json_at: int) -> list[Any]:
    """An item row's values for a driver: predictions as the text SQLAlchemy's JSON type would
    send (None becomes JSON null, as there)."""
    values = list(getter(row))
    if json_at >= 0:
        values[json_at] = json.dumps(values[json_at])
    return values


def _copy_update_items(
    session: Session, columns: tuple[str, ...], rows: Sequence[dict[str, Any]], run_id: str | None
) -> None:
    """COPY the rows into a stage, then one ``UPDATE … FROM`` of exactly these columns."""
    raw = session.connection().connection.driver_connection
    stage_cols = ", ".join(f"{_quote(c)} {t}" for c, t in {"id": "int8", **_ITEM_COLUMNS}.items())
    names = ("id", *columns)
    getter = itemgetter(*names)
    json_at = names.index("predictions") if "predictions" in names else -1
    sets = ", ".join(
        f"{_quote(c)} = CAST(staged.{_quote(c)} AS json)"
        if c == "predictions"
        else f"{_quote(c)} = staged.{_quote(c)}"
        for c in columns
    )
    with raw.cursor() as cur:
        cur.execute(
            f"CREATE TEMPORARY TABLE IF NOT EXISTS {_ITEM_STAGE} ({stage_cols}) ON COMMIT DELETE ROWS"
        )
        with cur.copy(
            f"COPY {_ITEM_STAGE} ({', '.join(map(_quote, names))}) FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["int8", *(_ITEM_COLUMNS[c] for c in columns)])
            for row in rows:
                copy.write_row(_item_values(row, getter, json_at))
        where = "items.id = staged.id" + (" AND items.run_id = %(run)s" if run_id is not None else "")
        cur.execute(
            f"WITH staged AS (DELETE FROM {_ITEM_STAGE} RETURNING *) "
            f"UPDATE items SET {sets} FROM staged WHERE {where}",
            {"run": run_id} if run_id is not None else None,
        )


def _sqlite_update_items(
    session: Session, columns: tuple[str, ...], rows: Sequence[dict[str, Any]], run_id: str | None
) -> None:
    """One ``UPDATE … WHERE id = ?`` through the driver's ``executemany`` (see :func:`_sqlite_upsert`)."""
    sets = ", ".join(f"{_quote(c)} = ?" for c in columns)
    where = "id = ?" + (" AND run_id = ?" if run_id is not None else "")
    getter = itemgetter(*columns, "id")
    json_at = columns.index("predictions") if "predictions" in columns else -1
    run = (run_id,) if run_id is not None else ()
    params = [(*_item_values(row, getter, json_at), *run) for row in rows]
    cursor = session.connection().connection.driver_connection.cursor()
    try:
        cursor.executemany(f"UPDATE items SET {sets} WHERE {where}", params)
    finally:
        cursor.close()


def update_items(
    session: Session, rows: Sequence[dict[str, Any]], *, mode: WriteMode = "auto", run_id: str | None = None
) -> None:
    """Items exist from planning; only their outcome columns change, and only those a row names.

    Rows may name different columns (a failed item carries only its status and error); each
    set of columns is one statement. ``run_id`` (the items' run) confines the COPY and SQLite
    paths' update to that run (on PostgreSQL, its partition); rows of another run are then left alone.
    """
    copy = _pick_mode(session, mode) == "copy"
    if not rows:
        return
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        if "id" not in row:
            raise ValueError(f"item rows need their 'id'; got columns {', '.join(sorted(row))}")
        groups.setdefault(tuple(sorted(c for c in row if c != "id")), []).append(row)
    if len({row["id"] for row in rows}) < len(rows):
        raise ValueError("item rows repeat an id; each item's outcome may appear once per write")
    for columns, group in groups.items():
        if not columns:
            continue  # a row naming only its id changes nothing
        unknown = [c for c in columns if c not in _ITEM_COLUMNS]
        if copy and not unknown:
            _copy_update_items(session, columns, group, run_id)
        elif _dialect(session) == "sqlite" and not unknown:
            _sqlite_update_items(session, columns, group, run_id)
        else:
            for chunk in _chunks(group):
                session.execute(update(Item), list(chunk))
