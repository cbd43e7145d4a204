"""per-heatmap localisation columns: energy in the labelled box, pointing hit, mass outside, border share

Revision ID: 0009_heatmap_localisation
Revises: 0008_shard_provenance
Create Date: 2026-11-30 06:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_heatmap_localisation"
down_revision: str | None = "0008_shard_provenance"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = ("box_energy", "outside_mass", "border_share")


def upgrade() -> None:
    with op.batch_alter_table("heatmaps") as batch:
        batch.add_column(sa.Column("box_energy", sa.Float(), nullable=True))
        batch.add_column(sa.Column("box_hit", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("outside_mass", sa.Float(), nullable=True))
        batch.add_column(sa.Column("border_share", sa.Float(), nullable=True))
    for column in _COLUMNS:
        op.create_index(f"ix_heatmaps_{column}", "heatmaps", ["run_id", "method", "target_class", column])


def downgrade() -> None:
    for column in _COLUMNS:
        op.drop_index(f"ix_heatmaps_{column}", table_name="heatmaps")
    with op.batch_alter_table("heatmaps") as batch:
        batch.drop_column("border_share")
        batch.drop_column("outside_mass")
        batch.drop_column("box_hit")
        batch.drop_column("box_energy")
