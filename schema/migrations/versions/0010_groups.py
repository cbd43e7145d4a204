"""groups: per-case rows fused from the predictions of a group's items, and each item's view

Revision ID: 0010_groups
Revises: 0009_heatmap_localisation
Create Date: 2026-11-30 06:45:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_groups"
down_revision: str | None = "0009_heatmap_localisation"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "groups",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(length=32), nullable=False),
        sa.Column("group_id", sa.String(length=200), nullable=False),
        sa.Column("label", sa.String(length=200), nullable=True),
        sa.Column("n_items", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("fusion", sa.String(length=8), nullable=False),
        sa.Column("pred_class", sa.Integer(), nullable=True),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("correct", sa.Boolean(), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_groups_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_groups")),
        sa.UniqueConstraint("run_id", "group_id", name=op.f("uq_groups_run_id_group_id")),
    )
    op.create_index("ix_groups_run_pred_score", "groups", ["run_id", "pred_class", "score"])
    with op.batch_alter_table("items") as batch:
        batch.add_column(sa.Column("view", sa.String(length=100), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("items") as batch:
        batch.drop_column("view")
    op.drop_index("ix_groups_run_pred_score", table_name="groups")
    op.drop_table("groups")
