"""initial tables

Revision ID: 0001
Revises:
Create Date: 2026-11-23 09:01:35.662525
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table(
        "runs",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("audit_name", sa.String(length=200), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("model_ref", sa.String(length=500), nullable=False),
        sa.Column("checkpoint_uri", sa.String(length=1000), nullable=True),
        sa.Column("checkpoint_sha256", sa.String(length=64), nullable=True),
        sa.Column("methods", sa.JSON(), nullable=False),
        sa.Column("layers", sa.JSON(), nullable=False),
        sa.Column("target_spec", sa.String(length=100), nullable=False),
        sa.Column("source_uri", sa.String(length=1000), nullable=False),
        sa.Column("output_uri", sa.String(length=1000), nullable=False),
        sa.Column("preprocess", sa.JSON(), nullable=False),
        sa.Column("patch_size", sa.Integer(), nullable=False),
        sa.Column("top_patches", sa.Integer(), nullable=False),
        sa.Column("class_names", sa.JSON(), nullable=True),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("versions", sa.JSON(), nullable=False),
        sa.Column("n_items", sa.Integer(), nullable=False),
        sa.Column("n_shards", sa.Integer(), nullable=False),
        sa.Column("n_done", sa.Integer(), nullable=False),
        sa.Column("n_failed", sa.Integer(), nullable=False),
        sa.Column("shards_done", sa.Integer(), nullable=False),
        sa.Column("shards_failed", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("baseline_run_id", sa.String(length=32), nullable=True),
        sa.ForeignKeyConstraint(
            ["baseline_run_id"], ["runs.id"], name=op.f("fk_runs_baseline_run_id_runs"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
    )
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_runs_audit_name"), ["audit_name"], unique=False)

    op.create_table(
        "shards",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("run_id", sa.String(length=32), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("n_items", sa.Integer(), nullable=False),
        sa.Column("n_done", sa.Integer(), nullable=False),
        sa.Column("n_failed", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(length=200), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_shards_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_shards")),
        sa.UniqueConstraint("run_id", "index", name=op.f("uq_shards_run_id_index")),
    )
    with op.batch_alter_table("shards", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_shards_run_id"), ["run_id"], unique=False)

    op.create_table(
        "items",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("run_id", sa.String(length=32), nullable=False),
        sa.Column("shard_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("ordinal", sa.Integer(), nullable=False),
        sa.Column("source_uri", sa.String(length=2000), nullable=False),
        sa.Column("label", sa.String(length=200), nullable=True),
        sa.Column("box", sa.JSON(), nullable=True),
        sa.Column("group_id", sa.String(length=200), nullable=True),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("predictions", sa.JSON(), nullable=True),
        sa.Column("pred_class", sa.Integer(), nullable=True),
        sa.Column("correct", sa.Boolean(), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_items_run_id_runs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["shard_id"], ["shards.id"], name=op.f("fk_items_shard_id_shards"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_items")),
        sa.UniqueConstraint("run_id", "ordinal", name=op.f("uq_items_run_id_ordinal")),
    )
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_items_shard_id"), ["shard_id"], unique=False)

    op.create_table(
        "heatmaps",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("item_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("run_id", sa.String(length=32), nullable=False),
        sa.Column("method", sa.String(length=40), nullable=False),
        sa.Column("layer", sa.String(length=200), nullable=False),
        sa.Column("target_class", sa.Integer(), nullable=False),
        sa.Column("target_score", sa.Float(), nullable=False),
        sa.Column("object_key", sa.String(length=1000), nullable=False),
        sa.Column("raw_key", sa.String(length=1000), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("raw_max", sa.Float(), nullable=False),
        sa.Column("raw_mean", sa.Float(), nullable=False),
        sa.Column("map_mean", sa.Float(), nullable=False),
        sa.Column("top_patch_fraction", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["item_id"], ["items.id"], name=op.f("fk_heatmaps_item_id_items"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_heatmaps_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_heatmaps")),
        sa.UniqueConstraint(
            "item_id",
            "method",
            "layer",
            "target_class",
            name=op.f("uq_heatmaps_item_id_method_layer_target_class"),
        ),
    )
    with op.batch_alter_table("heatmaps", schema=None) as batch_op:
        batch_op.create_index(
            "ix_heatmaps_run_method_class", ["run_id", "method", "target_class"], unique=False
        )

    op.create_table(
        "patch_scores",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("heatmap_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("run_id", sa.String(length=32), nullable=False),
        sa.Column("item_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("method", sa.String(length=40), nullable=False),
        sa.Column("layer", sa.String(length=200), nullable=False),
        sa.Column("target_class", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("row", sa.Integer(), nullable=False),
        sa.Column("col", sa.Integer(), nullable=False),
        sa.Column("x0", sa.Integer(), nullable=False),
        sa.Column("y0", sa.Integer(), nullable=False),
        sa.Column("x1", sa.Integer(), nullable=False),
        sa.Column("y1", sa.Integer(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["heatmap_id"],
            ["heatmaps.id"],
            name=op.f("fk_patch_scores_heatmap_id_heatmaps"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_patch_scores")),
        sa.UniqueConstraint("heatmap_id", "rank", name=op.f("uq_patch_scores_heatmap_id_rank")),
    )
    with op.batch_alter_table("patch_scores", schema=None) as batch_op:
        batch_op.create_index(
            "ix_patch_scores_top", ["run_id", "method", "target_class", "score"], unique=False
        )


def downgrade() -> None:

    with op.batch_alter_table("patch_scores", schema=None) as batch_op:
        batch_op.drop_index("ix_patch_scores_top")

    op.drop_table("patch_scores")
    with op.batch_alter_table("heatmaps", schema=None) as batch_op:
        batch_op.drop_index("ix_heatmaps_run_method_class")

    op.drop_table("heatmaps")
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_items_shard_id"))

    op.drop_table("items")
    with op.batch_alter_table("shards", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_shards_run_id"))

    op.drop_table("shards")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_runs_audit_name"))

    op.drop_table("runs")
