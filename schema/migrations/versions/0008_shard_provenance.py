"""how each shard was computed: device, autocast dtype, TF32 flags, torch and cuDNN versions

Revision ID: 0008_shard_provenance
Revises: 0005_alerts
Create Date: 2026-11-30 06:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_shard_provenance"
down_revision: str | None = "0005_alerts"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = (
    ("device_type", sa.String(length=16)),
    ("autocast_dtype", sa.String(length=16)),
    ("tf32_matmul", sa.Boolean()),
    ("tf32_cudnn", sa.Boolean()),
    ("torch_version", sa.String(length=64)),
    ("cudnn_version", sa.String(length=16)),
)


def upgrade() -> None:
    with op.batch_alter_table("shards") as batch:
        for name, type_ in COLUMNS:
            batch.add_column(sa.Column(name, type_, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("shards") as batch:
        for name, _ in reversed(COLUMNS):
            batch.drop_column(name)
