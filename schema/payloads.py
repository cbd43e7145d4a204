"""What a user asks for when starting a run, validated before any work is planned."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

TARGET_PATTERN = re.compile(r"^(top1|all|label|topk:[1-9]\d*|classes:\d+(,\d+)*)$")


class RunSpec(BaseModel):
    """Everything that decides a run's results; stored with the run so it can be reproduced."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    source: str
    model: str = "demo"
    checkpoint: str | None = None
    methods: list[str] = Field(default_factory=lambda: ["gradcam", "cam"])
    layers: list[str] | None = None
    targets: str = "top1"
    patch_size: int = Field(32, ge=1)
    top_patches: int = Field(5, ge=1)
    top_k_predictions: int = Field(5, ge=1)
    batch_size: int = Field(16, ge=1)
    shard_size: int = Field(256, ge=1)
    name: str | None = None
    audit_name: str | None = None
    overlay: bool = False
    group_fusion: Literal["mean", "max"] = "mean"
    views: list[str] | None = None
    missing_view: Literal["fail", "zeros"] = "fail"

    @field_validator("views")
    @classmethod
    def _views_distinct(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        value = [v.strip() for v in value if v.strip()]
        if len(value) < 2 or len(set(value)) != len(value):
            raise ValueError(f"views must name at least two distinct views in input order, got {value}")
        return value

    @field_validator("methods")
    @classmethod
    def _methods_not_empty(cls, value: list[str]) -> list[str]:
        value = [m.strip().lower() for m in value if m.strip()]
        if not value:
            raise ValueError("at least one CAM method is needed, e.g. gradcam,cam")
        return list(dict.fromkeys(value))

    @field_validator("targets")
    @classmethod
    def _targets_form(cls, value: str) -> str:
        value = value.strip().lower()
        if not TARGET_PATTERN.match(value):
            raise ValueError(
                f"targets {value!r} is not understood; use top1, topk:N, all, label, or classes:3,7"
            )
        return value
