"""packed layout: where a heatmap's PNG and npy bytes lie inside its shard's tar

Revision ID: 0011_packed_layout
Revises: 0010_groups
Create Date: 2026-11-30 09:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from schema.db import DowngradeRefused

revision: str = "0011_packed_layout"
down_revision: str | None = "0010_groups"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# NULL for maps stored one object each (the files layout, and every row written before this)
COLUMNS = ("object_offset", "object_length", "raw_offset", "raw_length")


def upgrade() -> None:
    with op.batch_alter_table("heatmaps") as batch:
        for name in COLUMNS:
            batch.add_column(sa.Column(name, sa.BigInteger(), nullable=True))


def downgrade() -> None:
    # Without its byte range a packed map's key names a whole tar: its readers would decode that.
    # Dropping every table (to base) keeps no row, so there is nothing to refuse.
    packed = op.get_bind().execute(
        sa.text("SELECT DISTINCT run_id FROM heatmaps WHERE object_offset IS NOT NULL LIMIT 5")
    )
    runs = [row[0] for row in packed]
    if runs and not op.get_context().config.attributes.get("downgrade_to_base"):
        raise DowngradeRefused(
            f"runs {', '.join(runs)} store their maps in the packed layout, which this schema "
            "version cannot read; delete them first (`camaudit gc --run RUN_ID`), then downgrade"
        )
    with op.batch_alter_table("heatmaps") as batch:
        for name in reversed(COLUMNS):
            batch.drop_column(name)
