"""class drift and run quality

Revision ID: 0003
Revises: 0001
Create Date: 2026-11-30 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "class_drift",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(length=32), nullable=False),
        sa.Column("baseline_run_id", sa.String(length=32), nullable=False),
        sa.Column("method", sa.String(length=40), nullable=False),
        sa.Column("layer", sa.String(length=200), nullable=False),
        sa.Column("target_class", sa.Integer(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("mean_correlation", sa.Float(), nullable=False),
        sa.Column("mean_iou", sa.Float(), nullable=False),
        sa.Column("centre_shift_px", sa.Float(), nullable=False),
        sa.Column("l1_shift", sa.Float(), nullable=False),
        sa.Column("drifted", sa.Boolean(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_class_drift_run_id_runs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["baseline_run_id"],
            ["runs.id"],
            name=op.f("fk_class_drift_baseline_run_id_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_class_drift")),
        sa.UniqueConstraint(
            "run_id", "baseline_run_id", "method", "layer", "target_class", name="uq_class_drift_key"
        ),
    )
    with op.batch_alter_table("class_drift", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_class_drift_baseline_run_id"), ["baseline_run_id"], unique=False)

    op.create_table(
        "run_quality",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(length=32), nullable=False),
        sa.Column("method", sa.String(length=40), nullable=False),
        sa.Column("layer", sa.String(length=200), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("pointing_game", sa.Float(), nullable=False),
        sa.Column("energy_in_box", sa.Float(), nullable=False),
        sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_run_quality_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_run_quality")),
        sa.UniqueConstraint("run_id", "method", "layer", name=op.f("uq_run_quality_run_id_method_layer")),
    )


def downgrade() -> None:
    op.drop_table("run_quality")
    with op.batch_alter_table("class_drift", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_class_drift_baseline_run_id"))
    op.drop_table("class_drift")
