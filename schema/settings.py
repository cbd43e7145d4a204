"""Runtime settings shared by the scheduler and the workers.

Both sides must agree on where results land and how work travels, so they read one
settings object from the same environment variables (prefix ``CAMAUDIT_``).
"""

from __future__ import annotations

import difflib
from functools import lru_cache

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

AMP_CHOICES = ("auto", "bf16", "fp16", "off")
# Where a run's maps go (workers/packing.py): one tar per shard, method and layer, or one object per map.
LAYOUT_CHOICES = ("packed", "files")


def parse_layout(value: str) -> str:
    """A heatmap layout name (case and spaces ignored), or a ValueError naming the valid ones."""
    layout = str(value).strip().lower()
    if layout not in LAYOUT_CHOICES:
        raise ValueError(
            f"layout {layout!r} is not known; use packed or files "
            "(packed: one tar per shard, method and layer; files: one object per map)"
        )
    return layout


DEVICE_DECODE_CHOICES = ("auto", "on", "off")


def parse_device_decode(value: str) -> str:
    """``CAMAUDIT_DEVICE_DECODE``: auto, on or off (case-insensitive); anything else is refused."""
    mode = str(value).strip().lower()
    if mode in DEVICE_DECODE_CHOICES:
        return mode
    close = difflib.get_close_matches(mode, DEVICE_DECODE_CHOICES, n=1, cutoff=0.4)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"device_decode must be one of {', '.join(DEVICE_DECODE_CHOICES)} (auto: measure on a GPU "
        f"worker's first batch and keep the faster; on: decode JPEGs on the GPU; off: on the CPU), "
        f"not {value!r}{hint}"
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CAMAUDIT_", extra="ignore")

    database_url: str = "sqlite:///camaudit.db"
    storage_url: str = "camaudit-output"
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    broker_url: str | None = None
    result_backend: str | None = None
    device: str = "auto"
    amp: str = "auto"
    # The heatmap layout of runs that do not name one (`camaudit run --layout`, an audit's `layout`).
    layout: str = "packed"
    # Where a GPU worker decodes JPEGs: workers/device_decode.py (CPU workers always use the CPU).
    # off by default: nvJPEG's pixels differ from libjpeg-turbo's (up to 10 levels on an H200),
    # so maps would depend on which decoder a worker's timing picked.
    device_decode: str = "off"
    log_level: str = "INFO"
    # Threads per shard stage; unset = follow the cores (and S3 vs local folder for uploads).
    fetch_workers: int | None = None
    decode_workers: int | None = None
    upload_workers: int | None = None
    encode_workers: int | None = None
    # Threads building a shard's rows (localisation, patches) beside the model's; unset = one.
    row_workers: int | None = None
    # torch's CPU threads per process; unset = every core on a CPU worker, one on a GPU worker
    # (there the model does not use the CPU; workers/runtime.py apply_torch_threads).
    torch_threads: int | None = None
    # Worker processes sharing this machine's cores; each sizes the pools above to its share.
    # `camaudit worker` sets it from --concurrency (times the GPUs of --gpus) unless it is set.
    worker_processes: int = Field(1, ge=1)
    max_image_pixels: int = 144_000_000
    # Bytes read per source image at most (checked with stat / S3 ContentLength before reading).
    max_source_bytes: int = 256 * 1024 * 1024
    # Folders (separated by ':') manifests may name images in, besides their own and the source folder.
    source_roots: str | None = None
    metrics_port: int | None = None
    shard_time_limit_s: int = 3600
    # A message unacknowledged this long is handed to another worker (a crashed one never acks);
    # unset = twice the shard time limit, so a live worker is never doubled.
    visibility_timeout_s: int | None = None
    unacked_restore_interval_s: int = 10
    # Where people open the web UI; alert notifications link to runs under it when set.
    public_url: str | None = None
    # Webhook delivery of fired alerts: POSTs per notification, first back-off (doubling), timeout.
    alert_attempts: int = Field(5, ge=1)
    alert_backoff_s: float = Field(5.0, ge=0.0)
    alert_timeout_s: float = Field(10.0, gt=0.0)
    # A running shard holds a lease its worker renews every heartbeat; a lease that runs out
    # means the worker is gone, and a sweep on every worker enqueues the shard again. Worst
    # case from a kill to the shard being enqueued again: lease_s + lease_sweep_interval_s.
    lease_s: float = 60.0
    heartbeat_interval_s: float = 10.0
    lease_sweep_interval_s: float = 15.0
    # A shard whose worker is lost this many times is failed instead of enqueued again: it is
    # probably what kills its workers (memory, a hard time limit).
    max_lost_leases: int = 5

    @field_validator(
        "fetch_workers", "decode_workers", "upload_workers", "encode_workers", "row_workers", "torch_threads"
    )
    @classmethod
    def _check_workers(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"must be at least 1 thread (or unset to follow the cores), got {value}")
        return value

    @field_validator("max_source_bytes", "max_image_pixels")
    @classmethod
    def _check_positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be a positive number, got {value}")
        return value

    @field_validator("lease_s", "heartbeat_interval_s", "lease_sweep_interval_s")
    @classmethod
    def _check_positive_seconds(cls, value: float) -> float:
        if not value > 0 or value == float("inf"):
            raise ValueError(f"must be a positive number of seconds, got {value}")
        return value

    @field_validator("max_lost_leases")
    @classmethod
    def _check_max_lost_leases(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be at least 1 (a shard's first lost worker), got {value}")
        return value

    @model_validator(mode="after")
    def _check_lease_outlives_heartbeats(self) -> Settings:
        # Two heartbeats may fail (a database restart, a long pause) before a live worker loses its shard.
        if self.lease_s < 3 * self.heartbeat_interval_s:
            raise ValueError(
                f"lease_s ({self.lease_s:g}) must be at least 3 x heartbeat_interval_s "
                f"({self.heartbeat_interval_s:g}), e.g. CAMAUDIT_LEASE_S={3 * self.heartbeat_interval_s:g} "
                f"or CAMAUDIT_HEARTBEAT_INTERVAL_S={self.lease_s / 3:g}"
            )
        return self

    @field_validator("amp")
    @classmethod
    def _check_amp(cls, value: str) -> str:
        value = value.lower()
        if value not in AMP_CHOICES:
            raise ValueError(f"amp must be one of {', '.join(AMP_CHOICES)}, not {value!r}")
        return value

    @field_validator("layout")
    @classmethod
    def _check_layout(cls, value: str) -> str:
        return parse_layout(value)

    @field_validator("device_decode")
    @classmethod
    def _check_device_decode(cls, value: str) -> str:
        return parse_device_decode(value)

    @property
    def embedded(self) -> bool:
        """No broker means shards run in this process, through the same task functions."""
        return not self.broker_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
