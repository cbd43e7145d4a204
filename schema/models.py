"""SQL tables: the contract between the scheduler, the workers and the query side.

Natural unique keys (run + index, run + item + method + layer + class, run + heatmap + rank)
are what make a re-run shard overwrite its own rows instead of adding new ones. They lead
with ``run_id`` because on PostgreSQL ``items``, ``heatmaps`` and ``patch_scores`` are
partitioned by run (``schema/partitions.py``) and a unique key there must hold the partition
key. For the same reason these three tables carry no foreign keys among themselves or to
``shards``: a run's rows are written by one planner and its shards, and deleted together, by
dropping its partitions (``scheduler/gc.py``); their ``run_id`` still references ``runs``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Connection,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    event,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Mapper, mapped_column

from schema.partitions import create_run_partitions

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL needs BIGINT for tens of millions of rows.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class RunStatus:
    PENDING = "pending"
    RUNNING = "running"
    FINISHED = "finished"
    PARTIAL = "partial"
    FAILED = "failed"
    # gc has started to delete the run: no shard of it may start or commit any more.
    DELETING = "deleting"
    TERMINAL = frozenset({FINISHED, PARTIAL, FAILED})


class ShardStatus:
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class ItemStatus:
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200))
    audit_name: Mapped[str | None] = mapped_column(String(200), index=True)
    status: Mapped[str] = mapped_column(String(16), default=RunStatus.PENDING)
    model_ref: Mapped[str] = mapped_column(String(500))
    checkpoint_uri: Mapped[str | None] = mapped_column(String(1000))
    checkpoint_sha256: Mapped[str | None] = mapped_column(String(64))
    methods: Mapped[list[Any]] = mapped_column(JSON)
    layers: Mapped[list[Any]] = mapped_column(JSON)
    target_spec: Mapped[str] = mapped_column(String(100))
    source_uri: Mapped[str] = mapped_column(String(1000))
    output_uri: Mapped[str] = mapped_column(String(1000))
    preprocess: Mapped[dict[str, Any]] = mapped_column(JSON)
    patch_size: Mapped[int] = mapped_column(Integer)
    top_patches: Mapped[int] = mapped_column(Integer)
    class_names: Mapped[list[Any] | None] = mapped_column(JSON)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    versions: Mapped[dict[str, Any]] = mapped_column(JSON)
    n_items: Mapped[int] = mapped_column(Integer, default=0)
    n_shards: Mapped[int] = mapped_column(Integer, default=0)
    n_done: Mapped[int] = mapped_column(Integer, default=0)
    n_failed: Mapped[int] = mapped_column(Integer, default=0)
    shards_done: Mapped[int] = mapped_column(Integer, default=0)
    shards_failed: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    baseline_run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"))


@event.listens_for(Run, "after_insert")
def _partition_new_run(mapper: Mapper[Run], connection: Connection, run: Run) -> None:
    """A run's result partitions come into being in the transaction that creates the run."""
    create_run_partitions(connection, run.id)


class Shard(Base):
    __tablename__ = "shards"
    __table_args__ = (UniqueConstraint("run_id", "index"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=ShardStatus.PENDING)
    n_items: Mapped[int] = mapped_column(Integer, default=0)
    n_done: Mapped[int] = mapped_column(Integer, default=0)
    n_failed: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200))
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The lease of the worker running the shard; ``attempts`` is its fencing token: only the
    # holder of the latest attempt may commit. Set while running, and while a retry is due.
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Workers lost while running the shard (their lease ran out), and the last one of them.
    lost_leases: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    lost_worker: Mapped[str | None] = mapped_column(String(200))
    lost_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # how the committed results were computed (workers/provenance.py)
    device_type: Mapped[str | None] = mapped_column(String(16))
    autocast_dtype: Mapped[str | None] = mapped_column(String(16))
    tf32_matmul: Mapped[bool | None] = mapped_column(Boolean)
    tf32_cudnn: Mapped[bool | None] = mapped_column(Boolean)
    torch_version: Mapped[str | None] = mapped_column(String(64))
    cudnn_version: Mapped[str | None] = mapped_column(String(16))


class Item(Base):
    __tablename__ = "items"
    __table_args__ = (UniqueConstraint("run_id", "ordinal"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    shard_id: Mapped[int] = mapped_column(BigId, index=True)
    ordinal: Mapped[int] = mapped_column(Integer)
    source_uri: Mapped[str] = mapped_column(String(2000))
    label: Mapped[str | None] = mapped_column(String(200))
    box: Mapped[list[Any] | None] = mapped_column(JSON)
    group_id: Mapped[str | None] = mapped_column(String(200))
    view: Mapped[str | None] = mapped_column(String(100))
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=ItemStatus.PENDING)
    error: Mapped[str | None] = mapped_column(Text)
    predictions: Mapped[list[Any] | None] = mapped_column(JSON)
    pred_class: Mapped[int | None] = mapped_column(Integer)
    correct: Mapped[bool | None] = mapped_column(Boolean)


class Heatmap(Base):
    __tablename__ = "heatmaps"
    __table_args__ = (
        UniqueConstraint("run_id", "item_id", "method", "layer", "target_class"),
        Index("ix_heatmaps_run_method_class", "run_id", "method", "target_class"),
        Index("ix_heatmaps_box_energy", "run_id", "method", "target_class", "box_energy"),
        Index("ix_heatmaps_outside_mass", "run_id", "method", "target_class", "outside_mass"),
        Index("ix_heatmaps_border_share", "run_id", "method", "target_class", "border_share"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    item_id: Mapped[int] = mapped_column(BigId)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    method: Mapped[str] = mapped_column(String(40))
    layer: Mapped[str] = mapped_column(String(200))
    target_class: Mapped[int] = mapped_column(Integer)
    target_score: Mapped[float] = mapped_column(Float)
    object_key: Mapped[str] = mapped_column(String(1000))
    raw_key: Mapped[str] = mapped_column(String(1000))
    # Packed layout (workers/packing.py): the PNG's and the npy's bytes inside the shard's tar
    # ``object_key`` (= ``raw_key``); NULL in the files layout, where each key is a whole object.
    object_offset: Mapped[int | None] = mapped_column(BigInteger)
    object_length: Mapped[int | None] = mapped_column(BigInteger)
    raw_offset: Mapped[int | None] = mapped_column(BigInteger)
    raw_length: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    raw_max: Mapped[float] = mapped_column(Float)
    raw_mean: Mapped[float] = mapped_column(Float)
    map_mean: Mapped[float] = mapped_column(Float)
    top_patch_fraction: Mapped[float] = mapped_column(Float)
    # Localisation against the item's labelled box (NULL without one): workers/localisation.py.
    box_energy: Mapped[float | None] = mapped_column(Float)
    box_hit: Mapped[bool | None] = mapped_column(Boolean)
    outside_mass: Mapped[float | None] = mapped_column(Float)
    border_share: Mapped[float | None] = mapped_column(Float)


class PatchScore(Base):
    __tablename__ = "patch_scores"
    __table_args__ = (
        UniqueConstraint("run_id", "heatmap_id", "rank"),
        Index("ix_patch_scores_top", "run_id", "method", "target_class", "score"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    heatmap_id: Mapped[int] = mapped_column(BigId)
    run_id: Mapped[str] = mapped_column(String(32))
    item_id: Mapped[int] = mapped_column(BigId)
    method: Mapped[str] = mapped_column(String(40))
    layer: Mapped[str] = mapped_column(String(200))
    target_class: Mapped[int] = mapped_column(Integer)
    rank: Mapped[int] = mapped_column(Integer)
    row: Mapped[int] = mapped_column(Integer)
    col: Mapped[int] = mapped_column(Integer)
    x0: Mapped[int] = mapped_column(Integer)
    y0: Mapped[int] = mapped_column(Integer)
    x1: Mapped[int] = mapped_column(Integer)
    y1: Mapped[int] = mapped_column(Integer)
    score: Mapped[float] = mapped_column(Float)


class ClassDrift(Base):
    """How far one class's attention moved between a run and its baseline run.

    Written when a run with a baseline is finalised (and by ``camaudit diff --save``); one row
    per (method, layer, class) the two runs share, so a nightly audit's drift is a cheap query
    instead of a re-read of every stored map. ``drifted`` was decided with ``threshold``.
    """

    __tablename__ = "class_drift"
    __table_args__ = (
        UniqueConstraint(
            "run_id", "baseline_run_id", "method", "layer", "target_class", name="uq_class_drift_key"
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    baseline_run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    method: Mapped[str] = mapped_column(String(40))
    layer: Mapped[str] = mapped_column(String(200))
    target_class: Mapped[int] = mapped_column(Integer)
    n: Mapped[int] = mapped_column(Integer)
    mean_correlation: Mapped[float] = mapped_column(Float)
    mean_iou: Mapped[float] = mapped_column(Float)
    centre_shift_px: Mapped[float] = mapped_column(Float)
    l1_shift: Mapped[float] = mapped_column(Float)
    drifted: Mapped[bool] = mapped_column(Boolean)
    threshold: Mapped[float] = mapped_column(Float)
    computed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RunQuality(Base):
    """Localisation quality of a run's maps per method and layer, for trends across nightly runs.

    Only items with a label and an object box count; ``n`` says how many did.
    """

    __tablename__ = "run_quality"
    __table_args__ = (UniqueConstraint("run_id", "method", "layer"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    method: Mapped[str] = mapped_column(String(40))
    layer: Mapped[str] = mapped_column(String(200))
    n: Mapped[int] = mapped_column(Integer)
    pointing_game: Mapped[float] = mapped_column(Float)
    energy_in_box: Mapped[float] = mapped_column(Float)
    computed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AlertState:
    FIRED = "fired"
    OK = "ok"
    SKIPPED = "skipped"


class Alert(Base):
    """One alert rule of an audit, evaluated once when a run is finalised.

    Rules that held (``ok``) and rules that could not be judged (``skipped``, e.g. drift on an
    audit's first run) are kept too, so a run shows what was checked. The delivery columns of
    a fired rule describe the run's notification: the webhook URL is never stored here, and
    ``last_error`` says what went wrong without quoting it.
    """

    __tablename__ = "alerts"
    __table_args__ = (UniqueConstraint("run_id", "rule"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    rule: Mapped[str] = mapped_column(String(40))
    state: Mapped[str] = mapped_column(String(16))
    value: Mapped[float | None] = mapped_column(Float)
    threshold: Mapped[float | None] = mapped_column(Float)
    message: Mapped[str] = mapped_column(Text)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)
    evaluated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    fired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)


class Group(Base):
    """One case of a run whose items share a ``group_id``: its views' predictions fused into one.

    Written when the run is finalised (``scheduler/groups.py``); ``status`` is ``failed`` when
    any of its items failed, with the reason in ``error``.
    """

    __tablename__ = "groups"
    __table_args__ = (
        UniqueConstraint("run_id", "group_id"),
        Index("ix_groups_run_pred_score", "run_id", "pred_class", "score"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    group_id: Mapped[str] = mapped_column(String(200))
    label: Mapped[str | None] = mapped_column(String(200))
    n_items: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    fusion: Mapped[str] = mapped_column(String(8))
    pred_class: Mapped[int | None] = mapped_column(Integer)
    score: Mapped[float | None] = mapped_column(Float)
    correct: Mapped[bool | None] = mapped_column(Boolean)
