"""shard leases

A running shard holds a lease its worker renews; an expired lease means a lost worker.

Revision ID: 0004_shard_leases
Revises: 0003
Create Date: 2026-11-30 06:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_shard_leases"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("shards", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("lost_leases", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("lost_worker", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("lost_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(batch_op.f("ix_shards_lease_expires_at"), ["lease_expires_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("shards", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_shards_lease_expires_at"))
        batch_op.drop_column("lost_at")
        batch_op.drop_column("lost_worker")
        batch_op.drop_column("lost_leases")
        batch_op.drop_column("heartbeat_at")
        batch_op.drop_column("lease_expires_at")
