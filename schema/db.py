"""Database engines, sessions and migrations, one place for both sides of the queue."""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).with_name("migrations")

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def normalise_url(url: str) -> str:
    """Accept the plain ``postgresql://`` spelling and route it to psycopg 3, the driver we ship."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def new_engine(url: str, **options: Any) -> Engine:
    """An engine of its own, outside the shared registry (a worker's background thread uses one,
    so a pool child forked meanwhile never inherits a pool that thread was using)."""
    url = normalise_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30}, **options)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, insertmanyvalues_page_size=2000, **options)


def get_engine(url: str) -> Engine:
    """One pooled engine per URL per process: workers reuse connections across shards."""
    url = normalise_url(url)
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = new_engine(url)
        return engine


def _reset_lock_in_child() -> None:
    """A child forked while another thread held the registry's lock must not inherit it held."""
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_lock_in_child)


def dispose_engines() -> None:
    """Forked worker children must not share the parent's sockets."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    session = sessionmaker(get_engine(url), expire_on_commit=False)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["database_url"] = normalise_url(url)
    return cfg


@contextmanager
def _migration_lock(url: str) -> Iterator[None]:
    """One migration at a time per SQLite file: two `camaudit run` on a fresh file both create tables.

    A lock file beside the database (``<file>.migrate-lock``), held with ``flock`` for the
    migration; PostgreSQL serialises with an advisory lock inside the migration's transaction
    instead (``schema/migrations/env.py``).
    """
    parsed = make_url(normalise_url(url))
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        yield
        return
    lock_path = Path(parsed.database + ".migrate-lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def upgrade(url: str, revision: str = "head") -> None:
    """Safe to run from several processes at once: they take turns, and the later ones find it done."""
    with _migration_lock(url):
        command.upgrade(alembic_config(url), revision)


class DowngradeRefused(RuntimeError):
    """A downgrade would keep rows the older schema cannot read; the message says what to do."""


def downgrade(url: str, revision: str = "base") -> None:
    config = alembic_config(url)
    # A migration may refuse to keep rows its older schema cannot read; to base, nothing is kept.
    config.attributes["downgrade_to_base"] = revision == "base"
    with _migration_lock(url):
        command.downgrade(config, revision)


def dialect_name(session: Session) -> str:
    return session.get_bind().dialect.name
