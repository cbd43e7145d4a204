"""Alembic environment: the URL comes from the caller, never from an ini file."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool, text

from schema.models import Base

config = context.config
target_metadata = Base.metadata
# pg_advisory_xact_lock key of camaudit's migrations ("camaudit" in ASCII, as a 64-bit integer):
# concurrent upgrades of one PostgreSQL database take turns; the later ones find nothing to do.
MIGRATION_LOCK_KEY = int.from_bytes(b"camaudit", "big") - 2**63


def _url() -> str:
    url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL given to the migrations")
    return str(url)


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connectable = create_engine(_url(), poolclass=pool.NullPool)
    with connectable.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
